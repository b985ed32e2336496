//! The CLIP text transformer (Radford et al., "Learning Transferable Visual
//! Models From Natural Language Supervision", 2021), as transformers'
//! `CLIPTextModel` and `CLIPTextModelWithProjection` store it: the text
//! encoders of Stable Diffusion 1.x, 2.x and SDXL.
//!
//! Tensor names follow transformers (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
//! `text_projection.weight`), read from `text_encoder/config.json`.

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::{Embedding, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::nn::{
    attention, merge_heads, split_heads, Activation, LayerNorm, Linear, LoraRegistry, Pass,
};

fn default_vocab() -> usize {
    49408
}
fn default_hidden() -> usize {
    512
}
fn default_intermediate() -> usize {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    8
}
fn default_max_pos() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

/// `text_encoder/config.json` (a transformers `CLIPTextConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Width of the transformer.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Width of the MLPs.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Output width of `text_projection` (with projection models).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Number of transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Length of the position table (77).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP, SD 1.x) or `gelu` (OpenCLIP, SD 2.x/XL).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text token: the pooled output is read there. transformers'
    /// legacy rule applies when it is 2: the position of the highest token id.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// `architectures` from config.json, used to tell projection models apart.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

impl ClipTextConfig {
    /// Reads a config.json. The nested `text_config` of a full `CLIPConfig` is
    /// accepted too.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        match v.get("text_config") {
            Some(tc) if v.get("vision_config").is_some() => serde_json::from_value(tc.clone()),
            _ => serde_json::from_value(v),
        }
    }

    /// True for `CLIPTextModelWithProjection` checkpoints.
    pub fn has_projection(&self) -> bool {
        self.architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|n| n.contains("WithProjection")))
    }
}

/// One pre-norm CLIP transformer layer (self-attention, then MLP), shared by
/// the text and vision towers: transformers' `CLIPEncoderLayer`.
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    /// Loads a layer of width `d`, MLP width `i` and `heads` heads from `vb`
    /// (`self_attn.{q,k,v,out}_proj`, `layer_norm{1,2}`, `mlp.fc{1,2}`),
    /// registering LoRA slots for its projections in `lora`.
    pub fn new(
        d: usize,
        i: usize,
        heads: usize,
        eps: f64,
        act: Activation,
        vb: VarBuilder,
        lora: &LoraRegistry,
    ) -> Result<Self> {
        let a = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            q_proj: Linear::new_lora(d, d, true, a.pp("q_proj"), lora)?,
            k_proj: Linear::new_lora(d, d, true, a.pp("k_proj"), lora)?,
            v_proj: Linear::new_lora(d, d, true, a.pp("v_proj"), lora)?,
            out_proj: Linear::new_lora(d, d, true, a.pp("out_proj"), lora)?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            fc1: Linear::new_lora(d, i, true, vb.pp("mlp.fc1"), lora)?,
            fc2: Linear::new_lora(i, d, true, vb.pp("mlp.fc2"), lora)?,
            heads,
            act,
        })
    }

    /// The `n` layers `{vb}.{i}` of a tower of width `d` (shared by the text
    /// and vision towers).
    #[allow(clippy::too_many_arguments)]
    pub fn stack(
        n: usize,
        d: usize,
        i: usize,
        heads: usize,
        eps: f64,
        act: Activation,
        vb: VarBuilder,
        lora: &LoraRegistry,
    ) -> Result<Vec<Self>> {
        (0..n)
            .map(|k| Self::new(d, i, heads, eps, act, vb.pp(k), lora))
            .collect()
    }

    /// Applies the layer to `[b, n, d]`; `mask` is added to the attention
    /// scores (the text tower's causal mask), none for the vision tower.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, pass: Pass) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x, pass)?;
        let head_dim = h.dim(D::Minus1)? / self.heads;
        let q = split_heads(&self.q_proj.forward(&h, pass)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(&h, pass)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(&h, pass)?, self.heads)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let o = attention(&q, &k, &v, scale, mask, false, pass)?;
        let x = (x + self.out_proj.forward(&merge_heads(&o, self.heads)?, pass)?)?;
        let h = self.layer_norm2.forward(&x, pass)?;
        let h = self.act.forward(&self.fc1.forward(&h, pass)?)?;
        x + self.fc2.forward(&h, pass)?
    }
}

/// Output of [`ClipTextModel::forward`].
#[derive(Clone, Debug)]
pub struct ClipTextOutput {
    /// Hidden states after the requested layer, with the final layer norm
    /// applied when requested: `[b, seq, hidden]`.
    pub hidden: Tensor,
    /// The final-layer-norm output at the end-of-text token, projected by
    /// `text_projection` for projection models: `[b, dim]`.
    pub pooled: Option<Tensor>,
}

/// Which hidden states a pipeline takes from the text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextLayer {
    /// The last layer, final layer norm applied (SD 1.x/2.x default).
    Last,
    /// diffusers' `clip_skip = n`: the output `n` layers before the last,
    /// final layer norm applied.
    Skip(usize),
    /// The penultimate layer's output without the final layer norm (SDXL).
    PenultimateRaw,
    /// transformers' `hidden_states[-(n + 1)]`, without the final layer norm
    /// (SDXL with clip skip: `RawSkip(clip_skip + 1)`).
    RawSkip(usize),
}

/// transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    lora: LoraRegistry,
    dtype: DType,
    device: Device,
}

impl ClipTextModel {
    /// Builds the model, reading `text_model.*` (and `text_projection` when
    /// `with_projection`) from `vb`.
    pub fn new(cfg: &ClipTextConfig, with_projection: bool, vb: VarBuilder) -> Result<Self> {
        let act = Activation::from_name(&cfg.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "text encoder config: unknown hidden_act `{}`",
                cfg.hidden_act
            ))
        })?;
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            candle_core::bail!(
                "text encoder config: hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        // transformers >= 5 saves CLIPTextModel without the `text_model.`
        // prefix; older checkpoints (and every SD release) have it.
        let tm = if !vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            && vb.contains_tensor("embeddings.token_embedding.weight")
        {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let emb = tm.pp("embeddings");
        let tok = emb.pp("token_embedding").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.,
                stdev: 0.5,
            },
        )?;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.,
                stdev: 0.1,
            },
        )?;
        let lora = LoraRegistry::new();
        let layers = EncoderLayer::stack(
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.layer_norm_eps,
            act,
            tm.pp("encoder.layers"),
            &lora,
        )?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            tm.pp("final_layer_norm"),
        )?;
        let text_projection = if with_projection {
            let dim = cfg.projection_dim.unwrap_or(cfg.hidden_size);
            Some(Linear::new(
                cfg.hidden_size,
                dim,
                false,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            token_embedding: Embedding::new(tok, cfg.hidden_size),
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            lora,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// LoRA slots of every attention projection and MLP layer, by module path
    /// (`text_model.encoder.layers.0.self_attn.q_proj`, ...; without the
    /// `text_model.` prefix for checkpoints saved without it).
    pub fn lora(&self) -> &LoraRegistry {
        &self.lora
    }

    /// Encodes `input_ids` (`[b, seq]`, u32) and returns the hidden states of
    /// `layer` plus the pooled output.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        layer: TextLayer,
        pass: Pass,
    ) -> Result<ClipTextOutput> {
        let (b, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder: {seq} tokens but at most {} positions",
                self.config.max_position_embeddings
            );
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max_id >= self.config.vocab_size {
            candle_core::bail!(
                "text encoder: token id {max_id} is outside the vocabulary of {} (tokenizer and text encoder do not match)",
                self.config.vocab_size
            );
        }
        let tok = pass.weight(self.token_embedding.embeddings());
        let x = tok
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, seq, ()))?;
        let pos = pass.weight(&self.position_embedding).narrow(0, 0, seq)?;
        let mut x = x.broadcast_add(&pos)?;
        let mask = causal_mask(seq, &self.device)?.to_dtype(self.dtype)?;

        let n = self.layers.len();
        let stop = match layer {
            TextLayer::Last => n,
            TextLayer::Skip(k) => n.checked_sub(k).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "clip skip {k} is larger than the text encoder's {n} layers"
                ))
            })?,
            TextLayer::PenultimateRaw => n.saturating_sub(1),
            TextLayer::RawSkip(k) => n.checked_sub(k).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "clip skip {k} is larger than the text encoder's {n} layers"
                ))
            })?,
        };
        let mut at_stop = if stop == 0 { Some(x.clone()) } else { None };
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x, Some(&mask), pass)?;
            if i + 1 == stop {
                at_stop = Some(x.clone());
            }
        }
        let last = self.final_layer_norm.forward(&x, pass)?;
        let chosen = at_stop.unwrap_or_else(|| x.clone());
        let hidden = match layer {
            TextLayer::Last => last.clone(),
            TextLayer::Skip(_) => self.final_layer_norm.forward(&chosen, pass)?,
            TextLayer::PenultimateRaw | TextLayer::RawSkip(_) => chosen,
        };
        let eos_pos = self.eos_positions(&ids)?;
        let rows = (0..b)
            .map(|i| last.i((i, eos_pos[i]))?.unsqueeze(0))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::cat(&rows, 0)?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&pooled, pass)?,
            None => pooled,
        };
        Ok(ClipTextOutput {
            hidden,
            pooled: Some(pooled),
        })
    }

    fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        Ok(rows
            .iter()
            .map(|r| {
                if self.config.eos_token_id == 2 {
                    // transformers' legacy rule: the highest id is the eos token.
                    let mut best = 0;
                    for (i, &t) in r.iter().enumerate() {
                        if t > r[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    r.iter()
                        .position(|&t| t == self.config.eos_token_id)
                        .unwrap_or(r.len() - 1)
                }
            })
            .collect())
    }
}

fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)
}
