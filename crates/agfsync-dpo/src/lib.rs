//! Diffusion-DPO training of agfsync (issue 7's core): the paper's loss
//! ([`loss`]), a resumable LoRA / full-UNet trainer ([`trainer`]), atomic
//! checkpoints ([`checkpoint`]), LoRA export in the diffusers/PEFT and kohya
//! layouts and merged UNets ([`export`]), and metrics as JSONL and
//! TensorBoard event files ([`tensorboard`]).
//!
//! The CLI calls [`train`]:
//!
//! ```no_run
//! use std::path::Path;
//! use agfsync_dpo::{train, ModelSpec, PairDataset, ResumeFrom, TrainConfig};
//!
//! # fn main() -> Result<(), agfsync_dpo::DpoError> {
//! let device = candle_core::Device::Cpu;
//! let spec = ModelSpec::from_pipeline_dir(Path::new("models/sd15"))?;
//! let data = PairDataset::load(Path::new("pairs.safetensors"), &device)?;
//! let cfg = TrainConfig { steps: 500, lr: 1e-4, ..TrainConfig::default() };
//! let summary = train(
//!     &spec,
//!     &data,
//!     &cfg,
//!     Path::new("out/dpo"),
//!     Some(ResumeFrom::Latest).filter(|_| Path::new("out/dpo/checkpoints/latest").exists()),
//!     &device,
//!     &mut |m| eprintln!("step {} loss {:.4} acc {:?}", m.step, m.loss, m.implicit_acc),
//! )?;
//! println!("LoRA written to {}", summary.output.display());
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod export;
pub mod loss;
pub mod optim;
pub mod pickapic;
pub mod safetensors_io;
pub mod tensorboard;
pub mod trainer;

pub use checkpoint::ResumeFrom;
pub use data::PairDataset;
pub use error::DpoError;
pub use pickapic::{import_parquet, ImportOptions, ImportReport};
pub use trainer::{
    train, train_until, ModelSpec, StepMetrics, TrainConfig, TrainDtype, TrainSummary, Trainer,
};
