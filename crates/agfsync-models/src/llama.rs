//! A decoder-only causal language model in the Llama family: Llama 1/2
//! (Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
//! 2023; "Llama 2", 2023), the Vicuna LM inside LLaVA-1.5, and Qwen2 /
//! Qwen2.5 (Qwen Team, "Qwen2 Technical Report", 2024), which is the same
//! network with biases on the q/k/v projections, and Qwen3 (Qwen Team,
//! "Qwen3 Technical Report", 2025): no q/k/v biases, an RMSNorm over each
//! query and key head before RoPE (`q_norm`, `k_norm`), and a head width
//! set apart from `hidden_size / num_attention_heads`.
//!
//! Reference: transformers 5.24 `models/llama/modeling_llama.py`
//! (`LlamaForCausalLM`), `models/qwen2/modeling_qwen2.py`
//! (`Qwen2ForCausalLM`) and `models/qwen3/modeling_qwen3.py`
//! (`Qwen3ForCausalLM`; `self_attn.{q,k}_norm.weight`). Tensor names are the checkpoints':
//! `model.embed_tokens.weight`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
//! `model.layers.N.mlp.{gate,up,down}_proj`,
//! `model.layers.N.{input,post_attention}_layernorm.weight`,
//! `model.norm.weight` and `lm_head.weight` (absent when the embeddings are
//! tied). [`CausalLm::new`] takes the decoder body and the head as two
//! [`VarBuilder`]s because multimodal checkpoints keep them under different
//! prefixes (LLaVA: `language_model.model.*` and `language_model.lm_head.*`
//! on the hub, `model.language_model.*` and `lm_head.*` in transformers 5).
//!
//! Inference only: the fused RMSNorm and softmax kernels are used and no
//! LoRA slots exist. The forward takes token ids or ready-made input
//! embeddings (so a VLM can splice image features in), a padding mask for
//! the new tokens (left padding, or padding anywhere: a cached image prefix
//! followed by left-padded questions), and a [`KvCache`] that remembers the
//! keys, values, padding and per-row positions of everything seen so far.
//! Positions count real tokens only, per row, as transformers' `generate`
//! derives them (`cumsum(attention_mask) - 1`), so a padded batch computes
//! exactly what each row computes alone.

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde_json::Value;

use crate::nn::{Activation, Linear, Pass};

/// A `LlamaConfig` / `Qwen2Config` (the `config.json` of a causal LM, or the
/// `text_config` of a VLM). Missing fields take transformers' defaults for
/// the `model_type`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `qwen2` or `qwen3` (decides defaults, the q/k/v biases and
    /// the per-head query/key norms).
    pub model_type: String,
    /// Vocabulary size (rows of the embedding and the head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query
    /// heads).
    pub num_key_value_heads: usize,
    /// Width of one head (`hidden_size / num_attention_heads` unless given).
    pub head_dim: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest sequence the model was trained for (informational).
    pub max_position_embeddings: usize,
    /// The head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (always true for Qwen2).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` sets both).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The MLP activation (`silu`).
    pub hidden_act: String,
    /// End-of-sequence token ids from the config, if any.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id from the config, if any.
    pub bos_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Parses a causal LM `config.json`.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Self::from_value(&v)
    }

    /// Reads a config object (a whole `config.json` or a VLM's
    /// `text_config`). Accepts transformers 4's `rope_theta` and
    /// transformers 5's `rope_parameters: {rope_theta, rope_type}`; RoPE
    /// scalings other than `default` are refused rather than silently run
    /// without scaling.
    pub fn from_value(v: &Value) -> std::result::Result<Self, String> {
        if !v.is_object() {
            return Err("a causal LM config must be a JSON object".into());
        }
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        let qwen3 = model_type == "qwen3";
        // Qwen2 and Qwen3 share transformers' vocabulary, size and token
        // defaults; they differ in biases and the per-head norms.
        let qwen2 = model_type == "qwen2" || qwen3;
        if !matches!(model_type.as_str(), "llama" | "qwen2" | "qwen3") {
            return Err(format!(
                "model_type `{model_type}` is not a supported decoder (llama, qwen2, qwen3)"
            ));
        }
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(
                "`use_sliding_window: true` is not implemented (sliding-window attention)".into(),
            );
        }
        let uint = |key: &str, default: usize| -> std::result::Result<usize, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{key}` must be a non-negative integer, got {x}")),
            }
        };
        let float = |key: &str, default: f64| -> std::result::Result<f64, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| format!("`{key}` must be a number, got {x}")),
            }
        };
        let boolean = |key: &str, default: bool| -> std::result::Result<bool, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| format!("`{key}` must be true or false, got {x}")),
            }
        };
        // transformers' defaults (LlamaConfig, Qwen2Config).
        let (d_vocab, d_hidden, d_inter, d_maxpos) = if qwen2 {
            (151_936, 4096, 22_016, 32_768)
        } else {
            (32_000, 4096, 11_008, 2048)
        };
        let num_attention_heads = uint("num_attention_heads", 32)?;
        let hidden_size = uint("hidden_size", d_hidden)?;
        if num_attention_heads == 0 {
            return Err("`num_attention_heads` must be positive".into());
        }
        let num_key_value_heads = uint("num_key_value_heads", num_attention_heads)?;
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of \
                 num_key_value_heads {num_key_value_heads}"
            ));
        }
        // Qwen3Config's head_dim defaults to 128 whatever the width.
        let head_dim = uint(
            "head_dim",
            if qwen3 {
                128
            } else {
                hidden_size / num_attention_heads
            },
        )?;
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!("head_dim {head_dim} must be even and positive"));
        }
        let mut rope_theta = float("rope_theta", 10_000.0)?;
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some(rp) = v.get(key).filter(|x| !x.is_null()) {
                if let Some(t) = rp.get("rope_theta").and_then(Value::as_f64) {
                    rope_theta = t;
                }
                let kind = rp
                    .get("rope_type")
                    .or_else(|| rp.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if kind != "default" {
                    return Err(format!(
                        "`{key}` asks for RoPE scaling `{kind}`, which agfsync does not \
                         implement yet (only `default`)"
                    ));
                }
            }
        }
        let attention_bias = boolean("attention_bias", false)?;
        let ids = |key: &str| -> Vec<u32> {
            match v.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut eos_token_ids = ids("eos_token_id");
        if v.get("eos_token_id").is_none() && !qwen2 {
            eos_token_ids = vec![2];
        }
        let bos_token_id = match v.get("bos_token_id") {
            None if !qwen2 => Some(1),
            Some(x) => x.as_u64().map(|x| x as u32),
            None => None,
        };
        Ok(Self {
            vocab_size: uint("vocab_size", d_vocab)?,
            hidden_size,
            intermediate_size: uint("intermediate_size", d_inter)?,
            num_hidden_layers: uint("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: float("rms_norm_eps", 1e-6)?,
            rope_theta,
            max_position_embeddings: uint("max_position_embeddings", d_maxpos)?,
            tie_word_embeddings: boolean("tie_word_embeddings", false)?,
            qkv_bias: (qwen2 && !qwen3) || attention_bias,
            o_bias: attention_bias,
            mlp_bias: boolean("mlp_bias", false)?,
            qk_norm: qwen3,
            hidden_act: v
                .get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("silu")
                .to_string(),
            eos_token_ids,
            bos_token_id,
            model_type,
        })
    }
}

/// RMSNorm with a learned scale (`weight * x / sqrt(mean(x^2) + eps)`).
#[derive(Clone, Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}

#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head norms of the queries and keys.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Clone, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

#[derive(Clone, Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// What the model reads: token ids (`[b, t]`, u32) or input embeddings
/// (`[b, t, hidden]`).
#[derive(Clone, Copy, Debug)]
pub enum LmInput<'a> {
    /// Token ids, looked up in `embed_tokens`.
    Ids(&'a Tensor),
    /// Ready-made input embeddings (image features spliced in).
    Embeds(&'a Tensor),
}

/// Which positions [`CausalLm::forward`] returns logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsAt {
    /// None: only fill the cache (a shared prefix).
    Nothing,
    /// The last new position of each row: `[b, vocab]`.
    Last,
    /// Every new position: `[b, t, vocab]`.
    All,
}

/// Keys and values of everything a batch has seen, with each row's padding
/// and next position.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row, per cached position: a real token (true) or padding.
    real: Vec<Vec<bool>>,
    /// Per row, the position id of its next real token.
    next_pos: Vec<usize>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cached positions per row (padding included).
    pub fn len(&self) -> usize {
        self.real.first().map_or(0, Vec::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows in the cache (0 when empty).
    pub fn batch_size(&self) -> usize {
        self.real.len()
    }

    /// The cache of a one-row batch repeated `n` times: a shared prefix
    /// (an image) computed once and continued by `n` different suffixes.
    pub fn repeat_rows(&self, n: usize) -> Result<Self> {
        if self.real.len() != 1 {
            candle_core::bail!(
                "repeat_rows needs a one-row cache, this one has {} rows",
                self.real.len()
            );
        }
        let rep = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[0] = n;
            t.broadcast_as(dims.as_slice())?.contiguous()
        };
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((rep(k)?, rep(v)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            real: vec![self.real[0].clone(); n],
            next_pos: vec![self.next_pos[0]; n],
        })
    }
}

/// A Llama / Qwen2 causal language model (`LlamaForCausalLM`,
/// `Qwen2ForCausalLM`).
#[derive(Clone, Debug)]
pub struct CausalLm {
    config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`: `lm_head.weight`, or the embeddings when tied.
    lm_head: Tensor,
    /// RoPE inverse frequencies, f32, `head_dim / 2` of them.
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

impl CausalLm {
    /// Builds the model from `body` (holding `embed_tokens`, `layers.N.*`,
    /// `norm`) and `head` (holding `lm_head`'s `weight`). With tied
    /// embeddings, or when `head` has no `weight` and the config ties, the
    /// head reuses `embed_tokens`.
    pub fn new(cfg: &LlamaConfig, body: VarBuilder, head: VarBuilder) -> Result<Self> {
        let act = Activation::from_name(&cfg.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "causal LM config: unknown hidden_act `{}`",
                cfg.hidden_act
            ))
        })?;
        let h = cfg.hidden_size;
        let embed_tokens = body.pp("embed_tokens").get_with_hints(
            (cfg.vocab_size, h),
            "weight",
            Init::Randn {
                mean: 0.,
                stdev: 0.02,
            },
        )?;
        // Biases the config does not announce but the checkpoint holds
        // (a Qwen2-style model saved under another model_type) are used.
        let qkv_bias = cfg.qkv_bias || body.contains_tensor("layers.0.self_attn.q_proj.bias");
        let o_bias = cfg.o_bias || body.contains_tensor("layers.0.self_attn.o_proj.bias");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lv = body.pp(format!("layers.{i}"));
            let av = lv.pp("self_attn");
            let (q, kv) = (
                cfg.num_attention_heads * cfg.head_dim,
                cfg.num_key_value_heads * cfg.head_dim,
            );
            let self_attn = Attention {
                q_proj: Linear::new(h, q, qkv_bias, av.pp("q_proj"))?,
                k_proj: Linear::new(h, kv, qkv_bias, av.pp("k_proj"))?,
                v_proj: Linear::new(h, kv, qkv_bias, av.pp("v_proj"))?,
                o_proj: Linear::new(q, h, o_bias, av.pp("o_proj"))?,
                q_norm: cfg
                    .qk_norm
                    .then(|| RmsNorm::new(cfg.head_dim, cfg.rms_norm_eps, av.pp("q_norm")))
                    .transpose()?,
                k_norm: cfg
                    .qk_norm
                    .then(|| RmsNorm::new(cfg.head_dim, cfg.rms_norm_eps, av.pp("k_norm")))
                    .transpose()?,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            };
            let mv = lv.pp("mlp");
            let i_size = cfg.intermediate_size;
            let mlp = Mlp {
                gate_proj: Linear::new(h, i_size, cfg.mlp_bias, mv.pp("gate_proj"))?,
                up_proj: Linear::new(h, i_size, cfg.mlp_bias, mv.pp("up_proj"))?,
                down_proj: Linear::new(i_size, h, cfg.mlp_bias, mv.pp("down_proj"))?,
                act,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: RmsNorm::new(h, cfg.rms_norm_eps, lv.pp("input_layernorm"))?,
                post_attention_layernorm: RmsNorm::new(
                    h,
                    cfg.rms_norm_eps,
                    lv.pp("post_attention_layernorm"),
                )?,
            });
        }
        let norm = RmsNorm::new(h, cfg.rms_norm_eps, body.pp("norm"))?;
        // transformers does not save `lm_head.weight` for tied models; a
        // checkpoint that has one anyway (saved untied) is honoured.
        let lm_head = if cfg.tie_word_embeddings && !head.contains_tensor("weight") {
            embed_tokens.clone()
        } else {
            head.get_with_hints(
                (cfg.vocab_size, h),
                "weight",
                Init::Randn {
                    mean: 0.,
                    stdev: 0.02,
                },
            )?
        };
        let d = cfg.head_dim;
        // transformers: 1 / base ** (arange(0, d, 2).float() / d), in f32.
        let inv_freq = (0..d / 2)
            .map(|i| 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        Ok(Self {
            config: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            dtype: body.dtype(),
            device: body.device().clone(),
        })
    }

    /// Loads a plain `LlamaForCausalLM` / `Qwen2ForCausalLM` layout
    /// (`model.*` and `lm_head.*`).
    pub fn new_causal_lm(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb.pp("model"), vb.pp("lm_head"))
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Looks token ids (`[b, t]`) up in `embed_tokens`: `[b, t, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.to_dtype(DType::U32)?.flatten_all()?;
        self.embed_tokens
            .index_select(&flat, 0)?
            .reshape((b, t, self.config.hidden_size))
    }

    /// Runs the new tokens `input` of a batch through the model, appending
    /// them to `cache`. `mask` (`[b, t]`, 1 for real tokens, 0 for padding;
    /// any integer or float dtype) covers the new tokens only: the cache
    /// remembers the padding of earlier ones. `None` means no padding.
    /// Returns f32 logits as `at` asks (an empty tensor for
    /// [`LogitsAt::Nothing`]).
    pub fn forward(
        &self,
        input: LmInput<'_>,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let x = match input {
            LmInput::Ids(ids) => self.embed(&ids.to_device(&self.device)?)?,
            LmInput::Embeds(e) => e.to_device(&self.device)?.to_dtype(self.dtype)?,
        };
        let (b, t, _) = x.dims3()?;
        if t == 0 {
            candle_core::bail!("causal LM: empty input");
        }
        if !cache.is_empty() && cache.batch_size() != b {
            candle_core::bail!(
                "causal LM: the cache holds {} rows but the input has {b}",
                cache.batch_size()
            );
        }
        let new_real: Vec<Vec<bool>> = match mask {
            Some(m) => {
                let m = m.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                if m.dims() != [b, t] {
                    candle_core::bail!(
                        "causal LM: the mask is {:?} but the input is [{b}, {t}]",
                        m.dims()
                    );
                }
                m.to_vec2::<f32>()?
                    .into_iter()
                    .map(|row| row.into_iter().map(|x| x != 0.0).collect())
                    .collect()
            }
            None => vec![vec![true; t]; b],
        };
        if cache.is_empty() {
            cache.layers = vec![None; self.layers.len()];
            cache.real = vec![Vec::new(); b];
            cache.next_pos = vec![0; b];
        }
        let past = cache.len();
        // Per-row positions: real tokens count up; padding repeats the
        // current position (its value is never attended to).
        let half = self.config.head_dim / 2;
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for (r, row) in new_real.iter().enumerate() {
            for &real in row {
                let p = cache.next_pos[r] as f32;
                for &f in &self.inv_freq {
                    let a = p * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
                if real {
                    cache.next_pos[r] += 1;
                }
            }
            cache.real[r].extend_from_slice(row);
        }
        let cos = Tensor::from_vec(cos, (b, t, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), &self.device)?.to_dtype(self.dtype)?;
        // Additive mask [b, 1, t, past + t]: a query sees earlier and own
        // positions that hold real tokens. A padding query also sees itself,
        // so no row is fully masked (which would make NaNs that the real
        // tokens' keys and values would then carry).
        let total = past + t;
        let mut bias = vec![0f32; b * t * total];
        for r in 0..b {
            for i in 0..t {
                let q_abs = past + i;
                let row = &mut bias[(r * t + i) * total..(r * t + i + 1) * total];
                for (j, slot) in row.iter_mut().enumerate() {
                    let visible = j <= q_abs && (cache.real[r][j] || j == q_abs);
                    if !visible {
                        *slot = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, total), &self.device)?;
        let mut x = x;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, &bias, slot)?;
        }
        let x = match at {
            LogitsAt::Nothing => return Tensor::zeros(0, DType::F32, &self.device),
            LogitsAt::Last => x.i((.., t - 1, ..))?,
            LogitsAt::All => x,
        };
        let x = self.norm.forward(&x)?;
        let w = self.lm_head.detach();
        let logits = match at {
            LogitsAt::All => x
                .reshape((b * t, self.config.hidden_size))?
                .matmul(&w.t()?)?
                .reshape((b, t, self.config.vocab_size))?,
            _ => x.matmul(&w.t()?)?,
        };
        logits.to_dtype(DType::F32)
    }

    /// Greedy decoding for a batch: feeds `input` (with `mask`, see
    /// [`CausalLm::forward`]) after whatever `cache` holds, then appends the
    /// arg-max token up to `max_new_tokens` times. A row stops at its first
    /// token in `eos` (not included in its output). Returns each row's new
    /// tokens and the f32 logits of the first new position (`[b, vocab]`,
    /// what P(yes) is read from).
    pub fn generate_greedy(
        &self,
        input: LmInput<'_>,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        max_new_tokens: usize,
        eos: &[u32],
    ) -> Result<(Vec<Vec<u32>>, Tensor)> {
        let first = self.forward(input, mask, cache, LogitsAt::Last)?;
        let b = first.dim(0)?;
        let mut out = vec![Vec::new(); b];
        let mut done = vec![false; b];
        let mut logits = first.clone();
        for step in 0..max_new_tokens {
            let next: Vec<u32> = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?;
            for (r, &tok) in next.iter().enumerate() {
                if done[r] {
                    continue;
                }
                if eos.contains(&tok) {
                    done[r] = true;
                } else {
                    out[r].push(tok);
                }
            }
            if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
                break;
            }
            // Finished rows keep decoding (their tokens are dropped): a
            // ragged batch would need per-row caches.
            let ids = Tensor::from_vec(next, (b, 1), &self.device)?;
            logits = self.forward(LmInput::Ids(&ids), None, cache, LogitsAt::Last)?;
        }
        Ok((out, first))
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, bias, cache)?;
        let x = (x + h)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + m
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = Pass::INFERENCE;
        let g = self.act.forward(&self.gate_proj.forward(x, p)?)?;
        let u = self.up_proj.forward(x, p)?;
        self.down_proj.forward(&(g * u)?, p)
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let p = Pass::INFERENCE;
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        let shape = |y: Tensor, heads: usize| -> Result<Tensor> {
            y.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let q = shape(self.q_proj.forward(x, p)?, self.heads)?;
        let k = shape(self.k_proj.forward(x, p)?, self.kv_heads)?;
        let v = shape(self.v_proj.forward(x, p)?, self.kv_heads)?;
        // Qwen3 normalises every head over its width (the last axis in
        // either layout) before the rotation.
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        // Llama's rotate-half RoPE (not the interleaved variant).
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let total = k.dim(2)?;
        // Grouped-query attention without copying keys: the query heads that
        // share a key/value head are stacked along the sequence axis.
        let rep = self.heads / self.kv_heads;
        let qg = q.reshape((b, self.kv_heads, rep * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (qg
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            * scale)?;
        let scores = scores
            .reshape((b, self.heads, t, total))?
            .broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?
            .reshape((b, self.kv_heads, rep * t, total))?
            .to_dtype(v.dtype())?;
        let y = probs
            .matmul(&v.contiguous()?)?
            .reshape((b, self.heads, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * d))?;
        self.o_proj.forward(&y, p)
    }
}
