//! Neural networks of agfsync, on candle: our own UNet (per-sample timesteps,
//! a differentiable training pass, LoRA slots), the CLIP text encoder, the KL
//! autoencoder, a Llama/Qwen2 decoder (`llama`), the BERT encoder of
//! sentence-embedding models (`bert`), and loading of Hugging Face layouts (diffusers pipeline folders,
//! transformers folders, the hub cache).
//!
//! Model code returns `candle_core::Result`; loading returns [`ModelError`],
//! which names the file at fault and how to fix it.

pub mod autoencoder_kl;
pub mod bert;
pub mod clip_text;
pub mod clip_tokenizer;
pub mod cpu_act;
pub mod cpu_conv;
pub mod cpu_norm;
pub mod error;
pub mod grad_checkpoint;
pub mod hub;
pub mod llama;
pub mod lora;
pub mod nn;
pub mod single_file;
pub mod stable_diffusion;
pub mod tiny;
pub mod unet_2d_condition;
pub mod vjp;
pub mod weights;

pub use error::{ModelError, Result};
