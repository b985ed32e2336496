//! The Diffusion-DPO trainer: LoRA (reference = the same UNet with adapters
//! off) or the full UNet (reference = a frozen copy), AdamW, LR schedules,
//! gradient accumulation and clipping, per-step metrics as JSONL, and
//! checkpoints that resume bit for bit.
//!
//! Randomness is counter-based: the timesteps and noise of micro-batch `k`
//! come from a generator seeded with `(seed, k)`, and the pair order of epoch
//! `e` from `(seed, e)`. The whole random state of a run is therefore its seed
//! and its position, which checkpoints record.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use agfsync_diffusion::rng::Generator;
use agfsync_diffusion::schedulers::{PredictionType, SchedulerConfig};
use agfsync_models::grad_checkpoint::Tape;
use agfsync_models::nn::{LoraAdapter, Pass};
use agfsync_models::unet_2d_condition::{
    AddedCondition, UNet2DConditionConfig, UNet2DConditionModel,
};
use agfsync_models::weights::open_safetensors;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, ModelIdentity, ResumeFrom};
use crate::data::{mix, Batch, PairDataset};
use crate::error::DpoError;
use crate::loss::{self, Target};
use crate::optim::{clip_grad_norm, AdamW, AdamWParams, LrScheduler};

/// Name under which the trained adapter is attached to the UNet's slots.
pub const ADAPTER_NAME: &str = "dpo";

/// The pass of the reference model during training: adapters off, computed
/// with the same (composed, differentiable) kernels as the trained model's
/// [`Pass::TRAIN`] so that at the start of a LoRA run (adapters at zero) the
/// two agree exactly: `inside = 0`, loss = ln 2, implicit accuracy 0.5. No
/// graph is recorded: the base weights are not variables, and the result is
/// detached.
pub const REFERENCE_PASS: Pass = Pass {
    differentiable: true,
    adapters: false,
};

const TAG_NOISE: u64 = 0x0015_e000;
const TAG_INIT: u64 = 0x1a17_0000;

fn default_steps() -> usize {
    1000
}
fn default_lr() -> f64 {
    1e-5
}
fn default_beta() -> f64 {
    5000.0
}
fn default_rank() -> usize {
    4
}
fn default_targets() -> Vec<String> {
    ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn one() -> usize {
    1
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_weight_decay() -> f64 {
    1e-2
}
fn default_checkpoint_every() -> usize {
    250
}
fn default_keep() -> usize {
    2
}
fn default_lr_scheduler() -> LrScheduler {
    LrScheduler::Constant
}

/// Settings of a training run. Every field has a default
/// ([`TrainConfig::default`]); JSON with missing fields fills them in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps to run (default 1000).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Peak learning rate (default 1e-5); must be positive.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// DPO beta (default 5000, the paper's value with the 0.5 factor);
    /// must be positive (also checked, though unused, with `sft`).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// LoRA rank (default 4).
    #[serde(default = "default_rank")]
    pub lora_rank: usize,
    /// LoRA alpha; `None` means alpha = rank (scale 1).
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// Module names (or dotted suffixes of module paths) that get adapters
    /// (default `to_q`, `to_k`, `to_v`, `to_out.0`).
    #[serde(default = "default_targets")]
    pub lora_targets: Vec<String>,
    /// Train the whole UNet against a frozen copy instead of LoRA adapters.
    #[serde(default)]
    pub full: bool,
    /// Train the SFT baseline (plain denoising loss on the winners) instead
    /// of DPO.
    #[serde(default)]
    pub sft: bool,
    /// Pairs per micro-batch (default 1).
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (default 1).
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Learning-rate schedule (default constant).
    #[serde(default = "default_lr_scheduler")]
    pub lr_scheduler: LrScheduler,
    /// Linear warm-up steps of the schedule (default 0).
    #[serde(default)]
    pub warmup_steps: usize,
    /// Global gradient-norm clip (default 1; 0 disables clipping).
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// AdamW decoupled weight decay (default 0.01).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Seed of the adapter init, pair order, timesteps and noise (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Write a checkpoint every this many steps (default 250; 0: only at
    /// the end). The final step always gets one.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Complete checkpoints to keep (default 2, at least 1).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Recompute each UNet block's activations during the backward pass
    /// instead of keeping them (default off): most of the activation memory
    /// for about one extra forward pass of compute. Gradients are the same
    /// up to float summation order.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Precision of the UNet's forward and backward passes (default f32).
    /// With bf16 or f16 the frozen weights are held in that precision, while
    /// everything trained (adapters, or the full UNet's master weights), the
    /// gradients, the optimizer state and the loss stay f32.
    #[serde(default)]
    pub dtype: TrainDtype,
}

/// Precision of the UNet during training ([`TrainConfig::dtype`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainDtype {
    /// Everything in f32.
    #[default]
    F32,
    /// bfloat16 compute with f32 master weights.
    Bf16,
    /// float16 compute with f32 master weights (prefer bf16: f16's range is
    /// narrow for gradients).
    F16,
}

impl TrainDtype {
    /// The candle dtype of the UNet's compute.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// Parses `f32`, `bf16` or `f16`.
    pub fn parse(s: &str) -> Result<Self, DpoError> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            other => Err(DpoError::Config(format!(
                "unknown training dtype `{other}`: use f32, bf16 or f16"
            ))),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            lr: default_lr(),
            beta: default_beta(),
            lora_rank: default_rank(),
            lora_alpha: None,
            lora_targets: default_targets(),
            full: false,
            sft: false,
            batch_size: 1,
            grad_accum: 1,
            lr_scheduler: LrScheduler::Constant,
            warmup_steps: 0,
            max_grad_norm: default_max_grad_norm(),
            weight_decay: default_weight_decay(),
            seed: 0,
            checkpoint_every: default_checkpoint_every(),
            keep_checkpoints: default_keep(),
            gradient_checkpointing: false,
            dtype: TrainDtype::F32,
        }
    }
}

impl TrainConfig {
    /// Refuses settings that cannot train: beta <= 0, lr <= 0, zero steps,
    /// batch size, accumulation or rank, no LoRA targets, and non-finite or
    /// negative numbers.
    pub fn validate(&self) -> Result<(), DpoError> {
        let bad = |m: String| Err(DpoError::Config(m));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad(format!(
                "beta must be a positive number, got {} (the paper uses 5000)",
                self.beta
            ));
        }
        if self.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size and grad_accum must be at least 1".into());
        }
        if !self.full {
            if self.lora_rank == 0 {
                return bad("lora_rank must be at least 1".into());
            }
            if let Some(a) = self.lora_alpha {
                if !(a.is_finite() && a > 0.0) {
                    return bad(format!("lora_alpha must be positive, got {a}"));
                }
            }
            if self.lora_targets.is_empty() {
                return bad("lora_targets is empty".into());
            }
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(format!(
                "max_grad_norm must be >= 0 (0 disables clipping), got {}",
                self.max_grad_norm
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints must be at least 1".into());
        }
        Ok(())
    }

    /// LoRA alpha (alpha = rank when unset).
    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(self.lora_rank as f64)
    }
}

/// Where a [`ModelSpec`]'s UNet weights are.
#[derive(Clone, Debug)]
pub enum UNetWeights {
    /// safetensors files: one, or the shards of one checkpoint
    /// (memory-mapped when loaded).
    Files(Vec<PathBuf>),
    /// Tensors already in memory, named as the checkpoint keys: weights
    /// drawn on the device for `agfsync bench`, never written to disk.
    Tensors(std::sync::Arc<std::collections::HashMap<String, Tensor>>),
}

/// The model to train: a diffusers UNet (config and safetensors weights) and
/// the noise schedule of its scheduler.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// The UNet config.
    pub unet_config: UNet2DConditionConfig,
    /// The UNet config file's text (hashed into the model identity).
    pub unet_config_json: String,
    /// The UNet's weights.
    pub weights: UNetWeights,
    /// `alphas_cumprod` of the training schedule (f32 values, widened).
    pub alphas_cumprod: Vec<f64>,
    /// Epsilon or v target, from the scheduler's `prediction_type`.
    pub target: Target,
}

/// The training schedule and target of a scheduler config.
fn schedule(scheduler: &SchedulerConfig) -> Result<(Vec<f64>, Target), DpoError> {
    let alphas_cumprod = scheduler
        .alphas_cumprod()
        .map_err(|e| DpoError::Config(format!("scheduler: {e}")))?;
    let target = match scheduler.prediction_type {
        PredictionType::Epsilon => Target::Epsilon,
        PredictionType::VPrediction => Target::Velocity,
        PredictionType::Sample => return Err(DpoError::Config(
            "prediction_type `sample` is not supported for Diffusion-DPO (epsilon or v_prediction)"
                .into(),
        )),
    };
    Ok((alphas_cumprod, target))
}

fn read_text(path: &Path) -> Result<String, DpoError> {
    std::fs::read_to_string(path).map_err(|e| DpoError::io(path, e))
}

impl ModelSpec {
    /// A diffusers pipeline folder: `unet/config.json`, the UNet's
    /// safetensors and `scheduler/scheduler_config.json`.
    pub fn from_pipeline_dir(dir: &Path) -> Result<Self, DpoError> {
        let sched_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = SchedulerConfig::from_file(&sched_path)
            .map_err(|e| DpoError::Config(format!("{}: {e}", sched_path.display())))?;
        Self::from_unet_dir(&dir.join("unet"), &scheduler)
    }

    /// A diffusers `unet/` folder (`config.json` and
    /// `diffusion_pytorch_model.safetensors`, or its shards) and the
    /// scheduler config giving the noise schedule and prediction type.
    pub fn from_unet_dir(unet_dir: &Path, scheduler: &SchedulerConfig) -> Result<Self, DpoError> {
        let cfg_path = unet_dir.join("config.json");
        let json = read_text(&cfg_path)?;
        let unet_config = UNet2DConditionConfig::from_json(&json)
            .map_err(|e| DpoError::Config(format!("{}: {e}", cfg_path.display())))?;
        let single = unet_dir.join("diffusion_pytorch_model.safetensors");
        let weights = if single.exists() {
            vec![single]
        } else {
            let mut shards: Vec<PathBuf> = std::fs::read_dir(unet_dir)
                .map_err(|e| DpoError::io(unet_dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with("diffusion_pytorch_model")
                            && n.ends_with(".safetensors")
                            && !n.contains(".fp16.")
                    })
                })
                .collect();
            shards.sort();
            if shards.is_empty() {
                let mut present: Vec<String> = std::fs::read_dir(unet_dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                present.sort();
                return Err(DpoError::io(
                    &single,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!(
                            "the UNet's weights are missing: no diffusion_pytorch_model.safetensors \
                             nor its shards in {}; files present: {}",
                            unet_dir.display(),
                            if present.is_empty() {
                                "none".to_string()
                            } else {
                                present.join(", ")
                            }
                        ),
                    ),
                ));
            }
            shards
        };
        let (alphas_cumprod, target) = schedule(scheduler)?;
        Ok(Self {
            unet_config,
            unet_config_json: json,
            weights: UNetWeights::Files(weights),
            alphas_cumprod,
            target,
        })
    }

    /// A UNet whose weights are already in memory (`tensors`, named as the
    /// checkpoint keys), with its config as JSON text and the scheduler
    /// config giving the noise schedule and prediction type.
    pub fn from_tensors(
        config_json: &str,
        tensors: std::collections::HashMap<String, Tensor>,
        scheduler: &SchedulerConfig,
    ) -> Result<Self, DpoError> {
        let unet_config = UNet2DConditionConfig::from_json(config_json)
            .map_err(|e| DpoError::Config(format!("unet config: {e}")))?;
        let (alphas_cumprod, target) = schedule(scheduler)?;
        Ok(Self {
            unet_config,
            unet_config_json: config_json.to_string(),
            weights: UNetWeights::Tensors(std::sync::Arc::new(tensors)),
            alphas_cumprod,
            target,
        })
    }

    /// Every weight tensor, on `device`, in its stored dtype.
    pub fn read_weights(
        &self,
        device: &Device,
    ) -> Result<std::collections::HashMap<String, Tensor>, DpoError> {
        match &self.weights {
            UNetWeights::Files(files) => {
                let mut tensors = std::collections::HashMap::new();
                for f in files {
                    tensors.extend(crate::safetensors_io::read_safetensors(f, device)?);
                }
                Ok(tensors)
            }
            UNetWeights::Tensors(map) => map
                .iter()
                .map(|(k, t)| Ok((k.clone(), t.to_device(device)?)))
                .collect(),
        }
    }

    /// The identity checkpoints record: a hash of the UNet config, the
    /// weight files' names and sizes, and the training target.
    pub fn identity(&self) -> ModelIdentity {
        ModelIdentity::new(self)
    }

    /// Loads the UNet from its files (memory-mapped, not trainable) as f32.
    pub fn load_unet(&self, device: &Device) -> Result<UNet2DConditionModel, DpoError> {
        self.load_unet_as(device, DType::F32)
    }

    /// Loads the UNet from its files (not trainable) in `dtype`.
    pub fn load_unet_as(
        &self,
        device: &Device,
        dtype: DType,
    ) -> Result<UNet2DConditionModel, DpoError> {
        let vb = match &self.weights {
            UNetWeights::Files(files) => open_safetensors(files, dtype, device)?,
            UNetWeights::Tensors(map) => {
                VarBuilder::from_tensors(map.as_ref().clone(), dtype, device)
            }
        };
        Ok(UNet2DConditionModel::new(&self.unet_config, vb)?)
    }
}

/// Metrics of one optimizer step (one JSONL line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step just completed (1-based).
    pub step: usize,
    /// The training loss (DPO, or the SFT loss with `sft`).
    pub loss: f64,
    /// Implicit accuracy over the step's pairs (`None` for SFT).
    pub implicit_acc: Option<f64>,
    /// Mean reward margin, `mean(inside)` (`None` for SFT).
    pub reward_margin: Option<f64>,
    /// The model's mean denoising error on winners and losers.
    pub model_loss: f64,
    /// The reference's mean denoising error (`None` for SFT).
    pub ref_loss: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Throughput of this step.
    pub pairs_per_sec: f64,
}

impl StepMetrics {
    /// The metrics as `(TensorBoard tag, value)` pairs (`train/loss`, ...;
    /// SFT runs have no accuracy, margin or reference loss).
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("train/loss", self.loss),
            ("train/model_loss", self.model_loss),
            ("train/grad_norm", self.grad_norm),
            ("train/lr", self.lr),
            ("train/pairs_per_sec", self.pairs_per_sec),
        ];
        if let Some(a) = self.implicit_acc {
            v.push(("train/implicit_acc", a));
        }
        if let Some(m) = self.reward_margin {
            v.push(("train/reward_margin", m));
        }
        if let Some(r) = self.ref_loss {
            v.push(("train/ref_loss", r));
        }
        v
    }
}

/// One trainable tensor with its checkpoint name.
#[derive(Clone, Debug)]
pub struct Trainable {
    /// For LoRA, `<module>.lora_A.weight` / `<module>.lora_B.weight`; for
    /// full training the UNet's own tensor name.
    pub name: String,
    /// The variable.
    pub var: Var,
}

/// A Diffusion-DPO training session over one model.
pub struct Trainer {
    cfg: TrainConfig,
    spec: ModelSpec,
    device: Device,
    unet: UNet2DConditionModel,
    reference: Option<UNet2DConditionModel>,
    trainables: Vec<Trainable>,
    /// Full training below f32: the master variables by checkpoint name,
    /// from which a low-precision working UNet is cast at every step.
    masters: Option<VarMap>,
    opt: AdamW,
    step: usize,
    data_pos: u64,
}

/// A UNet prediction on a gradient-checkpointing tape: the tape, the
/// detached prediction it produced, and the leaf variable the loss is
/// computed from (its gradient starts the tape's backward pass).
struct TapedPred<'a> {
    tape: Tape<'a>,
    pred: Tensor,
    leaf: Var,
}

fn matches_target(path: &str, target: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

impl Trainer {
    /// Builds the model(s), the trainable variables and a fresh optimizer.
    pub fn new(spec: &ModelSpec, cfg: &TrainConfig, device: &Device) -> Result<Self, DpoError> {
        cfg.validate()?;
        let low = cfg.dtype.dtype();
        let mut masters = None;
        let (unet, reference, trainables) = if cfg.full {
            let tensors = spec.read_weights(device)?;
            let vm = VarMap::new();
            {
                let mut data = vm
                    .data()
                    .lock()
                    .map_err(|_| DpoError::Config("variable map lock poisoned".into()))?;
                for (name, t) in tensors {
                    data.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
                }
            }
            let unet = UNet2DConditionModel::new(
                &spec.unet_config,
                VarBuilder::from_varmap(&vm, DType::F32, device),
            )?;
            // Only the tensors the model uses are trained (files may hold
            // extra entries).
            let mut trainables: Vec<Trainable> = vm
                .data()
                .lock()
                .map_err(|_| DpoError::Config("variable map lock poisoned".into()))?
                .iter()
                .map(|(k, v)| Trainable {
                    name: k.clone(),
                    var: v.clone(),
                })
                .collect();
            trainables.sort_by(|a, b| a.name.cmp(&b.name));
            let reference = spec.load_unet_as(device, low)?;
            if low != DType::F32 {
                masters = Some(vm);
            }
            (unet, Some(reference), trainables)
        } else {
            // The frozen base weights in the compute precision; the adapters
            // (f32 variables) are cast where they are applied, so their
            // gradients arrive in f32.
            let unet = spec.load_unet_as(device, low)?;
            let trainables = attach_lora(&unet, cfg, device)?;
            (unet, None, trainables)
        };
        let opt = AdamW::new(
            trainables.iter().map(|t| t.var.clone()).collect(),
            AdamWParams {
                weight_decay: cfg.weight_decay,
                ..AdamWParams::default()
            },
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            spec: spec.clone(),
            device: device.clone(),
            unet,
            reference,
            trainables,
            masters,
            opt,
            step: 0,
            data_pos: 0,
        })
    }

    /// The trained UNet (with the adapter attached in LoRA mode).
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The config of the run.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The model of the run.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The trainable variables, sorted by name.
    pub fn trainables(&self) -> &[Trainable] {
        &self.trainables
    }

    /// Optimizer steps completed.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Pairs consumed so far (the data position).
    pub fn data_position(&self) -> u64 {
        self.data_pos
    }

    pub(crate) fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub(crate) fn restore_state(
        &mut self,
        values: &std::collections::HashMap<String, Tensor>,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
        opt_steps: usize,
        step: usize,
        data_pos: u64,
    ) -> Result<(), DpoError> {
        for t in &self.trainables {
            let val = values.get(&t.name).ok_or_else(|| DpoError::Checkpoint {
                path: PathBuf::new(),
                reason: format!("no tensor `{}`", t.name),
            })?;
            t.var
                .set(&val.to_dtype(t.var.dtype())?.to_device(&self.device)?)?;
        }
        let m = m
            .into_iter()
            .map(|t| t.to_device(&self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = v
            .into_iter()
            .map(|t| t.to_device(&self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.opt.restore(m, v, opt_steps)?;
        self.step = step;
        self.data_pos = data_pos;
        Ok(())
    }

    /// Checks that `data` fits the model: latent channels, text embedding
    /// width, and SDXL's added conditioning when the UNet needs it.
    pub fn check_data(&self, data: &PairDataset) -> Result<(), DpoError> {
        let cfg = &self.spec.unet_config;
        let bad = |reason: String| DpoError::Data {
            path: data.source.clone(),
            reason,
        };
        let (c, _, _) = data.latent_shape();
        if c != cfg.in_channels {
            return Err(bad(format!(
                "latents have {c} channels but the UNet takes {}",
                cfg.in_channels
            )));
        }
        let d = data.prompt_embeds.dim(2)?;
        let n = cfg.block_out_channels.len();
        let cross = cfg
            .cross_attention_dim
            .expand(n, "cross_attention_dim")?
            .first()
            .copied()
            .unwrap_or(d);
        if d != cross {
            return Err(bad(format!(
                "prompt_embeds are {d} wide but the UNet's cross_attention_dim is {cross} (embeddings of another text encoder?)"
            )));
        }
        let needs_added = cfg.addition_embed_type.as_deref() == Some("text_time");
        if needs_added && data.added.is_none() {
            return Err(bad(
                "this SDXL UNet needs add_text_embeds and add_time_ids with every pair".into(),
            ));
        }
        Ok(())
    }

    /// The learning rate of the next step.
    pub fn current_lr(&self) -> f64 {
        self.cfg.lr_scheduler.lr_at(
            self.cfg.lr,
            self.step,
            self.cfg.warmup_steps,
            self.cfg.steps,
        )
    }

    /// Draws the timesteps (one per pair) and noise (one per pair, shared by
    /// winner and loser) of micro-batch `counter`.
    fn draw(
        &self,
        counter: u64,
        b: usize,
        shape: (usize, usize, usize),
    ) -> Result<(Vec<u32>, Tensor), DpoError> {
        let mut rng = Generator::new(mix(self.cfg.seed, TAG_NOISE, counter));
        let t_max = self.spec.alphas_cumprod.len() as u32;
        let ts: Vec<u32> = (0..b).map(|_| rng.gen_range(0..t_max)).collect();
        let noise = rng.randn((b, shape.0, shape.1, shape.2), DType::F32, &self.device)?;
        Ok((ts, noise))
    }

    /// The low-precision working copy of the full UNet for this step (cast
    /// from the f32 master variables, so gradients reach the masters), or
    /// `None` when the trained UNet itself is used.
    fn working_unet(&self) -> Result<Option<UNet2DConditionModel>, DpoError> {
        let Some(vm) = &self.masters else {
            return Ok(None);
        };
        let low = self.cfg.dtype.dtype();
        let data = vm
            .data()
            .lock()
            .map_err(|_| DpoError::Config("variable map lock poisoned".into()))?;
        let mut cast = std::collections::HashMap::with_capacity(data.len());
        for (k, v) in data.iter() {
            cast.insert(k.clone(), v.as_tensor().to_dtype(low)?);
        }
        drop(data);
        let vb = VarBuilder::from_tensors(cast, low, &self.device);
        Ok(Some(UNet2DConditionModel::new(&self.spec.unet_config, vb)?))
    }

    /// The trained model's prediction, in f32: through the ordinary graph,
    /// or on a checkpointing tape (then the prediction is a leaf variable and
    /// the tape is returned for the backward pass).
    fn model_pred<'a>(
        &self,
        unet: &'a UNet2DConditionModel,
        x: &Tensor,
        t: &Tensor,
        ehs: &Tensor,
        added: Option<&AddedCondition>,
    ) -> Result<(Tensor, Option<TapedPred<'a>>), DpoError> {
        if !self.cfg.gradient_checkpointing {
            let pred = unet.forward(x, t, ehs, added, Pass::TRAIN)?;
            return Ok((pred.to_dtype(DType::F32)?, None));
        }
        let mut tape = Tape::new();
        let pred = unet.forward_checkpointed(&mut tape, x, t, ehs, added, Pass::TRAIN)?;
        let leaf = Var::from_tensor(&pred.to_dtype(DType::F32)?)?;
        Ok((
            leaf.as_tensor().clone(),
            Some(TapedPred { tape, pred, leaf }),
        ))
    }

    /// Forward of one micro-batch on `unet` (the trained UNet or its
    /// working copy): the loss and its metrics.
    fn forward<'a>(
        &self,
        unet: &'a UNet2DConditionModel,
        batch: &Batch,
        ts: &[u32],
        noise: &Tensor,
    ) -> Result<MicroOut<'a>, DpoError> {
        let b = ts.len();
        let abar: Vec<f64> = ts
            .iter()
            .map(|&t| self.spec.alphas_cumprod[t as usize])
            .collect();
        let target = self.spec.target;
        let xw = loss::noisy_latents(&batch.latents_w, noise, &abar)?;
        let tw = loss::training_target(target, &batch.latents_w, noise, &abar)?;
        let t_w = Tensor::from_vec(ts.to_vec(), b, &self.device)?;
        if self.cfg.sft {
            let (pred, taped) =
                self.model_pred(unet, &xw, &t_w, &batch.prompt_embeds, batch.added.as_ref())?;
            let l = loss::sft_loss(&pred, &tw)?;
            let v = f64::from(l.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            return Ok(MicroOut {
                loss: l,
                loss_value: v,
                acc: None,
                margin: None,
                model_loss: v,
                ref_loss: None,
                taped,
            });
        }
        let xl = loss::noisy_latents(&batch.latents_l, noise, &abar)?;
        let tl = loss::training_target(target, &batch.latents_l, noise, &abar)?;
        let x = Tensor::cat(&[&xw, &xl], 0)?;
        let t2 = Tensor::cat(&[&t_w, &t_w], 0)?;
        let (ehs, added) = batch.doubled_condition()?;
        let (pred, taped) = self.model_pred(unet, &x, &t2, &ehs, added.as_ref())?;
        let reference = self.reference.as_ref().unwrap_or(&self.unet);
        let rpred = reference
            .forward(&x, &t2, &ehs, added.as_ref(), REFERENCE_PASS)?
            .to_dtype(DType::F32)?
            .detach();
        let out = loss::dpo_loss(
            &pred.narrow(0, 0, b)?,
            &pred.narrow(0, b, b)?,
            &rpred.narrow(0, 0, b)?,
            &rpred.narrow(0, b, b)?,
            &tw,
            &tl,
            self.cfg.beta,
        )?;
        let v = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(MicroOut {
            loss: out.loss,
            loss_value: v,
            acc: Some(out.implicit_acc),
            margin: Some(out.reward_margin),
            model_loss: out.model_loss,
            ref_loss: Some(out.ref_loss),
            taped,
        })
    }

    /// The loss and gradients of the next optimizer step (`grad_accum`
    /// micro-batches of `batch_size` pairs, losses divided by `grad_accum`),
    /// without updating anything. Gradients are in the order of
    /// [`Trainer::trainables`], unclipped.
    pub fn gradients(&self, data: &PairDataset) -> Result<StepGradients, DpoError> {
        let accum = self.cfg.grad_accum;
        let bs = self.cfg.batch_size;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.trainables.len()];
        let mut pos = self.data_pos;
        let (mut loss_sum, mut model_sum) = (0.0, 0.0);
        let (mut acc_sum, mut margin_sum, mut ref_sum) = (0.0, 0.0, 0.0);
        let mut dpo = false;
        let working = self.working_unet()?;
        let unet = working.as_ref().unwrap_or(&self.unet);
        let params: Vec<&Tensor> = self.trainables.iter().map(|t| t.var.as_tensor()).collect();
        for micro in 0..accum {
            let counter = (self.step * accum + micro) as u64;
            let idx = data.indices(self.cfg.seed, pos, bs);
            pos += bs as u64;
            let batch = data.batch(&idx, &self.device, DType::F32)?;
            let (ts, noise) = self.draw(counter, bs, data.latent_shape())?;
            let out = self.forward(unet, &batch, &ts, &noise)?;
            if !out.loss_value.is_finite() {
                return Err(self.non_finite("loss", out.loss_value));
            }
            let scaled = (&out.loss / accum as f64)?;
            let g = scaled.backward()?;
            let micro_grads: Vec<Option<Tensor>> = match &out.taped {
                None => params.iter().map(|p| g.get(p).cloned()).collect(),
                Some(taped) => {
                    let Some(gp) = g.get(taped.leaf.as_tensor()) else {
                        return Err(DpoError::Config(
                            "checkpointing: the loss does not depend on the prediction".into(),
                        ));
                    };
                    taped.tape.backward(&taped.pred, gp, &params)?
                }
            };
            for (slot, gr) in grads.iter_mut().zip(micro_grads) {
                if let Some(gr) = gr {
                    // Master weights are f32 whatever the compute precision.
                    let gr = gr.detach().to_dtype(DType::F32)?;
                    *slot = Some(match slot.take() {
                        Some(prev) => (prev + gr)?,
                        None => gr,
                    });
                }
            }
            loss_sum += out.loss_value;
            model_sum += out.model_loss;
            if let (Some(a), Some(m), Some(r)) = (out.acc, out.margin, out.ref_loss) {
                dpo = true;
                acc_sum += a;
                margin_sum += m;
                ref_sum += r;
            }
        }
        let n = accum as f64;
        Ok(StepGradients {
            grads,
            loss: loss_sum / n,
            implicit_acc: dpo.then_some(acc_sum / n),
            reward_margin: dpo.then_some(margin_sum / n),
            model_loss: model_sum / n,
            ref_loss: dpo.then_some(ref_sum / n),
            next_data_position: pos,
        })
    }

    /// Runs one optimizer step (`grad_accum` micro-batches of `batch_size`
    /// pairs, global-norm clipping, AdamW). A non-finite loss or gradient
    /// norm returns [`DpoError::NonFinite`] before anything is updated.
    pub fn train_step(&mut self, data: &PairDataset) -> Result<StepMetrics, DpoError> {
        let start = Instant::now();
        let lr = self.current_lr();
        let mut g = self.gradients(data)?;
        let norm = clip_grad_norm(&mut g.grads, self.cfg.max_grad_norm)?;
        if !norm.is_finite() {
            return Err(self.non_finite("grad norm", norm));
        }
        self.opt.step(&g.grads, lr)?;
        self.step += 1;
        self.data_pos = g.next_data_position;
        let pairs = (self.cfg.grad_accum * self.cfg.batch_size) as f64;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        Ok(StepMetrics {
            step: self.step,
            loss: g.loss,
            implicit_acc: g.implicit_acc,
            reward_margin: g.reward_margin,
            model_loss: g.model_loss,
            ref_loss: g.ref_loss,
            grad_norm: norm,
            lr,
            pairs_per_sec: pairs / secs,
        })
    }

    fn non_finite(&self, what: &'static str, value: f64) -> DpoError {
        DpoError::NonFinite {
            what,
            value,
            step: self.step + 1,
            last_checkpoint: None,
        }
    }

    /// Diffusion-DPO statistics of the current model on `indices` of
    /// `data`, with `draws` fixed (timestep, noise) draws per pair from
    /// `seed` (independent of the training stream): implicit accuracy and
    /// mean reward margin. Nothing is trained.
    pub fn evaluate(
        &self,
        data: &PairDataset,
        indices: &[usize],
        draws: usize,
        seed: u64,
    ) -> Result<EvalMetrics, DpoError> {
        let mut insides = Vec::new();
        let working = self.working_unet()?;
        let unet = working.as_ref().unwrap_or(&self.unet);
        for (k, &i) in indices.iter().enumerate() {
            let batch = data.batch(&[i], &self.device, DType::F32)?;
            for d in 0..draws {
                let mut rng = Generator::new(mix(seed, k as u64, d as u64));
                let t_max = self.spec.alphas_cumprod.len() as u32;
                let t: u32 = rng.gen_range(0..t_max);
                let (c, h, w) = data.latent_shape();
                let noise = rng.randn((1, c, h, w), DType::F32, &self.device)?;
                let abar = [self.spec.alphas_cumprod[t as usize]];
                let target = self.spec.target;
                let xw = loss::noisy_latents(&batch.latents_w, &noise, &abar)?;
                let xl = loss::noisy_latents(&batch.latents_l, &noise, &abar)?;
                let tw = loss::training_target(target, &batch.latents_w, &noise, &abar)?;
                let tl = loss::training_target(target, &batch.latents_l, &noise, &abar)?;
                let x = Tensor::cat(&[&xw, &xl], 0)?;
                let ts = Tensor::new(&[t, t], &self.device)?;
                let (ehs, added) = batch.doubled_condition()?;
                let pred = unet
                    .forward(&x, &ts, &ehs, added.as_ref(), Pass::INFERENCE)?
                    .to_dtype(DType::F32)?;
                let reference = self.reference.as_ref().unwrap_or(&self.unet);
                let rpred = reference
                    .forward(&x, &ts, &ehs, added.as_ref(), Pass::REFERENCE)?
                    .to_dtype(DType::F32)?;
                let out = loss::dpo_loss(
                    &pred.narrow(0, 0, 1)?,
                    &pred.narrow(0, 1, 1)?,
                    &rpred.narrow(0, 0, 1)?,
                    &rpred.narrow(0, 1, 1)?,
                    &tw,
                    &tl,
                    self.cfg.beta,
                )?;
                insides.push(out.inside.to_dtype(DType::F64)?.to_vec1::<f64>()?[0]);
            }
        }
        let n = insides.len().max(1) as f64;
        let acc = insides
            .iter()
            .map(|&v| {
                if v > 0.0 {
                    1.0
                } else if v == 0.0 {
                    0.5
                } else {
                    0.0
                }
            })
            .sum::<f64>()
            / n;
        Ok(EvalMetrics {
            implicit_acc: acc,
            reward_margin: insides.iter().sum::<f64>() / n,
            samples: insides.len(),
        })
    }
}

/// What [`Trainer::gradients`] computed for one optimizer step.
#[derive(Clone, Debug)]
pub struct StepGradients {
    /// Summed gradients of the micro-batch losses divided by `grad_accum`,
    /// one per trainable (`None`: the loss does not depend on it).
    pub grads: Vec<Option<Tensor>>,
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Mean implicit accuracy (`None` for SFT).
    pub implicit_acc: Option<f64>,
    /// Mean reward margin (`None` for SFT).
    pub reward_margin: Option<f64>,
    /// Mean model error.
    pub model_loss: f64,
    /// Mean reference error (`None` for SFT).
    pub ref_loss: Option<f64>,
    /// The data position after this step.
    pub next_data_position: u64,
}

/// What [`Trainer::evaluate`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Fraction of (pair, draw) samples with `inside > 0`, ties 0.5.
    pub implicit_acc: f64,
    /// Mean `inside`.
    pub reward_margin: f64,
    /// Number of (pair, draw) samples.
    pub samples: usize,
}

struct MicroOut<'a> {
    loss: Tensor,
    loss_value: f64,
    acc: Option<f64>,
    margin: Option<f64>,
    model_loss: f64,
    ref_loss: Option<f64>,
    taped: Option<TapedPred<'a>>,
}

/// Creates PEFT-initialised adapter variables (`lora_A`: uniform in
/// `±1/sqrt(in)`, PyTorch's kaiming-uniform with `a = sqrt(5)`; `lora_B`:
/// zeros, so training starts at the base model) on every slot whose module
/// path matches one of `cfg.lora_targets`, attached under [`ADAPTER_NAME`].
fn attach_lora(
    unet: &UNet2DConditionModel,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<Vec<Trainable>, DpoError> {
    let rank = cfg.lora_rank;
    let scale = cfg.alpha() / rank as f64;
    let mut out = Vec::new();
    let mut slots = unet.lora().slots();
    slots.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, slot) in slots {
        if !cfg.lora_targets.iter().any(|t| matches_target(&path, t)) {
            continue;
        }
        let w = slot.weight();
        let out_f = w.dim(0)?;
        let in_f = w.elem_count() / out_f.max(1);
        let mut rng = Generator::new(mix(cfg.seed, TAG_INIT, fnv(&path)));
        let bound = 1.0 / (in_f as f64).sqrt();
        let a: Vec<f32> = (0..rank * in_f)
            .map(|_| rng.gen_range(-bound..bound) as f32)
            .collect();
        let down = Var::from_tensor(&Tensor::from_vec(a, (rank, in_f), device)?)?;
        let up = Var::from_tensor(&Tensor::zeros((out_f, rank), DType::F32, device)?)?;
        slot.push(LoraAdapter {
            name: ADAPTER_NAME.to_string(),
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale,
        });
        out.push(Trainable {
            name: format!("{path}.lora_A.weight"),
            var: down,
        });
        out.push(Trainable {
            name: format!("{path}.lora_B.weight"),
            var: up,
        });
    }
    if out.is_empty() {
        let some: Vec<String> = unet
            .lora()
            .slots()
            .into_iter()
            .take(3)
            .map(|(p, _)| p)
            .collect();
        return Err(DpoError::Config(format!(
            "no UNet layer matches lora_targets {:?} (module paths look like {some:?})",
            cfg.lora_targets
        )));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// FNV-1a hash of a string.
pub(crate) fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// What a finished [`train`] call produced.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Optimizer steps completed in total (including resumed ones).
    pub steps: usize,
    /// Metrics of the last step run by this call (`None` when the run was
    /// already complete).
    pub last: Option<StepMetrics>,
    /// The newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// `metrics.jsonl`.
    pub metrics_path: PathBuf,
    /// The exported LoRA (`pytorch_lora_weights.safetensors`, LoRA mode) or
    /// the trained UNet folder (`unet/`, full mode).
    pub output: PathBuf,
}

/// Trains `spec`'s UNet on `data` with Diffusion-DPO (or SFT) as `cfg`
/// says, writing into `out_dir`:
///
/// * `train_config.json`: the config and the model identity;
/// * `metrics.jsonl`: one [`StepMetrics`] per step (on resume, lines after
///   the checkpoint's step are dropped first);
/// * `tensorboard/events.out.tfevents.*`: the same metrics for
///   `tensorboard --logdir` (a resumed run adds a file starting with a
///   restart marker);
/// * `checkpoints/step-NNNNNNNN/`: atomic checkpoints every
///   `cfg.checkpoint_every` steps and at the end (`checkpoints/latest`
///   names the newest), the last `cfg.keep_checkpoints` kept;
/// * the result: `pytorch_lora_weights.safetensors` (PEFT layout, loads with
///   diffusers' `load_lora_weights` and [`agfsync_models::lora::LoraFile`])
///   or, with `cfg.full`, `unet/` (config and weights).
///
/// `resume` continues a run from a checkpoint (refused, naming the
/// differences, when it belongs to another model or config); the result is
/// bit-for-bit the run that was never interrupted. `progress` sees every
/// step's metrics. A NaN/inf loss stops the run with
/// [`DpoError::NonFinite`], keeping the last good checkpoint.
pub fn train(
    spec: &ModelSpec,
    data: &PairDataset,
    cfg: &TrainConfig,
    out_dir: &Path,
    resume: Option<ResumeFrom>,
    device: &Device,
    progress: &mut dyn FnMut(&StepMetrics),
) -> Result<TrainSummary, DpoError> {
    train_until(spec, data, cfg, out_dir, resume, device, progress, &|| {
        false
    })
}

/// [`train`], stopping cleanly when `stop()` turns true (checked after every
/// step): a checkpoint of that step is written and
/// [`DpoError::Interrupted`] returned, so a rerun with `--resume latest`
/// continues bit for bit.
#[allow(clippy::too_many_arguments)] // train's arguments plus the stop flag
pub fn train_until(
    spec: &ModelSpec,
    data: &PairDataset,
    cfg: &TrainConfig,
    out_dir: &Path,
    resume: Option<ResumeFrom>,
    device: &Device,
    progress: &mut dyn FnMut(&StepMetrics),
    stop: &dyn Fn() -> bool,
) -> Result<TrainSummary, DpoError> {
    cfg.validate()?;
    std::fs::create_dir_all(out_dir).map_err(|e| DpoError::io(out_dir, e))?;
    let mut trainer = Trainer::new(spec, cfg, device)?;
    trainer.check_data(data)?;
    let cfg_path = out_dir.join("train_config.json");
    let record = serde_json::json!({ "config": cfg, "model": spec.identity() });
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&record).unwrap_or_default() + "\n",
    )
    .map_err(|e| DpoError::io(&cfg_path, e))?;
    let mut last_checkpoint = None;
    if let Some(r) = resume {
        let dir = checkpoint::resolve(out_dir, &r)?;
        checkpoint::load(&mut trainer, &dir)?;
        last_checkpoint = Some(dir);
    }
    let metrics_path = out_dir.join("metrics.jsonl");
    truncate_metrics(&metrics_path, trainer.step_count())?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| DpoError::io(&metrics_path, e))?;
    let mut events = crate::tensorboard::EventWriter::create(&out_dir.join("tensorboard"))?;
    if trainer.step_count() > 0 {
        events.session_start(trainer.step_count())?;
    }
    let mut last = None;
    while trainer.step_count() < cfg.steps {
        let m = match trainer.train_step(data) {
            Ok(m) => m,
            Err(DpoError::NonFinite {
                what, value, step, ..
            }) => {
                tracing::error!("non-finite {what} at step {step}; stopping");
                return Err(DpoError::NonFinite {
                    what,
                    value,
                    step,
                    last_checkpoint,
                });
            }
            Err(e) => return Err(e),
        };
        let line =
            serde_json::to_string(&m).map_err(|e| DpoError::Config(format!("metrics: {e}")))?;
        writeln!(metrics_file, "{line}").map_err(|e| DpoError::io(&metrics_path, e))?;
        events.scalars(m.step, &m.scalars())?;
        progress(&m);
        let s = trainer.step_count();
        let due = cfg.checkpoint_every > 0 && s % cfg.checkpoint_every == 0;
        if due || s == cfg.steps {
            last_checkpoint = Some(checkpoint::save(&trainer, out_dir)?);
        }
        last = Some(m);
        if s < cfg.steps && stop() {
            let checkpoint = if due {
                last_checkpoint.clone().unwrap_or_default()
            } else {
                checkpoint::save(&trainer, out_dir)?
            };
            metrics_file
                .sync_all()
                .map_err(|e| DpoError::io(&metrics_path, e))?;
            events.sync()?;
            return Err(DpoError::Interrupted {
                step: s,
                checkpoint,
            });
        }
    }
    metrics_file
        .sync_all()
        .map_err(|e| DpoError::io(&metrics_path, e))?;
    events.sync()?;
    let output = if cfg.full {
        crate::export::save_full_unet(&trainer, &out_dir.join("unet"))?
    } else {
        let p = out_dir.join("pytorch_lora_weights.safetensors");
        crate::export::export_peft_lora(trainer.unet().lora(), ADAPTER_NAME, &p)?;
        p
    };
    Ok(TrainSummary {
        steps: trainer.step_count(),
        last,
        last_checkpoint,
        metrics_path,
        output,
    })
}

/// Drops the lines of `metrics.jsonl` after `step` (a resumed run rewrites
/// them).
fn truncate_metrics(path: &Path, step: usize) -> Result<(), DpoError> {
    if !path.exists() {
        return Ok(());
    }
    let text = read_text(path)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| DpoError::io(path, e))
}
