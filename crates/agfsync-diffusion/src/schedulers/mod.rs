//! Diffusion schedulers, numerically matching their diffusers counterparts.
//!
//! Each scheduler is configured from a diffusers `scheduler/scheduler_config.json`
//! ([`SchedulerConfig`]) and driven by step index through the [`Scheduler`] trait:
//!
//! ```no_run
//! # fn unet(x: &candle_core::Tensor, t: f64) -> candle_core::Result<candle_core::Tensor> { Ok(x.clone()) }
//! # fn main() -> anyhow::Result<()> {
//! use agfsync_diffusion::rng::Generator;
//! use agfsync_diffusion::schedulers::{build, SchedulerConfig, SchedulerKind};
//! use candle_core::{DType, Device};
//!
//! let config = SchedulerConfig::from_file("scheduler/scheduler_config.json")?;
//! let mut scheduler = build("dpm++2m-karras".parse::<SchedulerKind>()?, &config)?;
//! scheduler.set_timesteps(25)?;
//! let mut rng = Generator::new(42);
//! let mut latents = (rng.randn((1, 4, 64, 64), DType::F32, &Device::Cpu)?
//!     * scheduler.init_noise_sigma())?;
//! for i in 0..scheduler.timesteps().len() {
//!     let t = scheduler.timesteps()[i];
//!     let input = scheduler.scale_model_input(&latents, i)?;
//!     let model_output = unet(&input, t)?;
//!     latents = scheduler.step(&model_output, i, &latents, &mut rng)?;
//! }
//! # Ok(()) }
//! ```
//!
//! Parity with diffusers 0.42 is checked by `tests/schedulers.rs` against fixtures written by
//! `tools/parity/make_scheduler_fixtures.py`. Stochastic schedulers draw their noise from a
//! [`Generator`], which does not reproduce torch's random stream; their `step_with_noise`
//! methods take explicit noise for exact comparisons.

mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver_multistep;
pub mod euler;
pub mod euler_ancestral;
pub mod lcm;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::rng::Generator;

pub use config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, InterpolationType, SchedulerConfig, SolverType,
    TimestepSpacing, TimestepType, VarianceType,
};
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver_multistep::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use lcm::{LcmOptions, LcmScheduler};

/// What the denoising model predicts (diffusers `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PredictionType {
    /// The added noise (Stable Diffusion 1.x, SDXL).
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0` (Stable Diffusion 2.x 768).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample x0.
    #[serde(rename = "sample")]
    Sample,
}

impl fmt::Display for PredictionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
        })
    }
}

/// Errors from configuring a scheduler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// A user-facing scheduler name that is not one of [`SchedulerKind::NAMES`].
    #[error("unknown scheduler `{name}`; valid schedulers are: {}", SchedulerKind::NAMES.join(", "))]
    UnknownScheduler {
        /// The name given.
        name: String,
    },
    /// A diffusers `_class_name` with no supported equivalent.
    #[error(
        "unsupported diffusers scheduler class `{class_name}`; supported classes are: {}",
        SchedulerKind::CLASS_NAMES.join(", ")
    )]
    UnknownSchedulerClass {
        /// The class name given.
        class_name: String,
    },
    /// A config option (or option value) this implementation does not support.
    #[error("unsupported scheduler option `{option}`: {reason}")]
    Unsupported {
        /// The config field, with its value where useful.
        option: String,
        /// Why, and what to use instead.
        reason: String,
    },
    /// A number of inference steps the schedule cannot provide.
    #[error("invalid number of inference steps {steps}: {reason}")]
    InvalidSteps {
        /// The number requested.
        steps: usize,
        /// Why it is invalid.
        reason: String,
    },
    /// An inconsistent config (wrong `trained_betas` length, betas out of range, ...).
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    /// The config file could not be read.
    #[error("cannot read scheduler config {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The config file is not a valid scheduler config.
    #[error("cannot parse scheduler config {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
}

/// A denoising scheduler, driven by step index.
///
/// Call [`Scheduler::set_timesteps`] first; then for each `i in 0..timesteps().len()` run the
/// model on `scale_model_input(sample, i)` at timestep `timesteps()[i]` and pass its output to
/// `step(output, i, sample, rng)`. Steps must be taken in order for the multistep solvers.
pub trait Scheduler: Send {
    /// Prepares the schedule for `num_inference_steps` denoising steps.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError>;
    /// Timesteps passed to the UNet, in sampling order (float: Euler/linspace timesteps can be
    /// fractional).
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial Gaussian noise (diffusers' `init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64;
    /// diffusers' `scale_model_input` for step `step_index`.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor>;
    /// One denoising step from step `step_index` to the next.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut Generator,
    ) -> candle_core::Result<Tensor>;
    /// The model's prediction type, from the config.
    fn prediction_type(&self) -> PredictionType;
    /// The sigma schedule (`timesteps().len() + 1` values, the last one the final sigma) for
    /// sigma-based schedulers (Euler, Euler ancestral, DPM-Solver); `None` for the others.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
}

/// The schedulers agfsync offers, by user-facing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `ddim`: DDIM, deterministic (eta = 0).
    Ddim,
    /// `euler`: Euler discrete (Karras sigmas if the config asks for them).
    Euler,
    /// `euler-ancestral` (alias `euler-a`): Euler ancestral, stochastic.
    EulerAncestral,
    /// `dpm++2m`: DPM-Solver++ 2M.
    DpmPlusPlus2M,
    /// `dpm++2m-karras`: DPM-Solver++ 2M with Karras sigmas.
    DpmPlusPlus2MKarras,
    /// `ddpm`: ancestral DDPM sampling, stochastic.
    Ddpm,
    /// `lcm`: Latent Consistency Model sampling (for LCM-distilled models or LCM-LoRA; few
    /// steps, guidance about 1), stochastic.
    Lcm,
}

impl SchedulerKind {
    /// Every kind, in [`SchedulerKind::NAMES`] order.
    pub const ALL: [SchedulerKind; 7] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPlusPlus2M,
        Self::DpmPlusPlus2MKarras,
        Self::Ddpm,
        Self::Lcm,
    ];

    /// The canonical user-facing names (`euler-a` is also accepted for `euler-ancestral`).
    pub const NAMES: [&'static str; 7] = [
        "ddim",
        "euler",
        "euler-ancestral",
        "dpm++2m",
        "dpm++2m-karras",
        "ddpm",
        "lcm",
    ];

    /// diffusers class names accepted by [`SchedulerKind::from_class_name`].
    pub const CLASS_NAMES: [&'static str; 8] = [
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "LCMScheduler",
    ];

    /// The canonical user-facing name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-ancestral",
            Self::DpmPlusPlus2M => "dpm++2m",
            Self::DpmPlusPlus2MKarras => "dpm++2m-karras",
            Self::Ddpm => "ddpm",
            Self::Lcm => "lcm",
        }
    }

    /// Maps a diffusers `_class_name` to the nearest supported kind.
    ///
    /// Classes without an implementation here map to a documented substitute:
    /// * `PNDMScheduler` (the default of Stable Diffusion 1.x checkpoints) → `ddim`: both are
    ///   deterministic samplers over the same discrete schedule, and DDIM is what PNDM's first
    ///   (PRK-skipping) steps reduce to;
    /// * `LMSDiscreteScheduler` → `euler`: same sigma schedule, first-order instead of linear
    ///   multistep;
    /// * `DDPMScheduler` → `ddpm`;
    /// * `LCMScheduler` → `lcm`;
    /// * `DPMSolverMultistepScheduler` → `dpm++2m` (use [`SchedulerKind::from_config`] to honour
    ///   `use_karras_sigmas`).
    pub fn from_class_name(class_name: &str) -> Result<Self, SchedulerError> {
        match class_name {
            "DDIMScheduler" | "PNDMScheduler" => Ok(Self::Ddim),
            "EulerDiscreteScheduler" | "LMSDiscreteScheduler" => Ok(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Ok(Self::EulerAncestral),
            "DPMSolverMultistepScheduler" => Ok(Self::DpmPlusPlus2M),
            "DDPMScheduler" => Ok(Self::Ddpm),
            "LCMScheduler" => Ok(Self::Lcm),
            other => Err(SchedulerError::UnknownSchedulerClass {
                class_name: other.to_string(),
            }),
        }
    }

    /// The kind a diffusers config describes: its `_class_name` through
    /// [`SchedulerKind::from_class_name`], with `DPMSolverMultistepScheduler` +
    /// `use_karras_sigmas` giving `dpm++2m-karras`. A config without `_class_name` gives
    /// `ddim`, like `PNDMScheduler`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let kind = match config.class_name.as_str() {
            "" => Self::Ddim,
            name => Self::from_class_name(name)?,
        };
        Ok(match kind {
            Self::DpmPlusPlus2M if config.use_karras_sigmas => Self::DpmPlusPlus2MKarras,
            k => k,
        })
    }

    /// Whether [`Scheduler::step`] draws noise from the [`Generator`].
    pub fn is_stochastic(self) -> bool {
        matches!(self, Self::EulerAncestral | Self::Ddpm | Self::Lcm)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    /// Parses a user-facing name (case-insensitive; `euler-a` and `_` for `-` accepted).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let normalized = s.trim().to_ascii_lowercase().replace('_', "-");
        match normalized.as_str() {
            "ddim" => Ok(Self::Ddim),
            "euler" => Ok(Self::Euler),
            "euler-ancestral" | "euler-a" => Ok(Self::EulerAncestral),
            "dpm++2m" => Ok(Self::DpmPlusPlus2M),
            "dpm++2m-karras" => Ok(Self::DpmPlusPlus2MKarras),
            "ddpm" => Ok(Self::Ddpm),
            "lcm" => Ok(Self::Lcm),
            _ => Err(SchedulerError::UnknownScheduler {
                name: s.to_string(),
            }),
        }
    }
}

/// Builds the scheduler `kind` from a diffusers config.
///
/// The config may come from any diffusers scheduler class (as with diffusers' `from_config`):
/// fields the class does not use are ignored, and `timestep_spacing`/`clip_sample`, when absent,
/// take the target class' default. `dpm++2m` forces `algorithm_type = dpmsolver++`,
/// `solver_order = 2` and no Karras sigmas; `dpm++2m-karras` the same with Karras sigmas. `ddim`
/// uses eta = 0 (see [`DdimScheduler::new`] for other values). `lcm` uses the default
/// [`LcmOptions`] (`original_inference_steps = 50`, `timestep_scaling = 10`), because
/// [`SchedulerConfig`] does not carry those two fields; use [`LcmScheduler::from_file`] or
/// [`LcmScheduler::with_options`] to honour other values.
///
/// Errors for unsupported options (e.g. `thresholding = true`).
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, 0.0)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(config)?),
        SchedulerKind::DpmPlusPlus2M | SchedulerKind::DpmPlusPlus2MKarras => {
            let mut c = config.clone();
            c.algorithm_type = AlgorithmType::DpmSolverPlusPlus;
            c.solver_order = 2;
            c.use_karras_sigmas = kind == SchedulerKind::DpmPlusPlus2MKarras;
            Box::new(DpmSolverMultistepScheduler::new(&c)?)
        }
        SchedulerKind::Ddpm => Box::new(DdpmScheduler::new(config)?),
        SchedulerKind::Lcm => Box::new(LcmScheduler::with_options(
            config,
            LcmOptions {
                original_inference_steps: config
                    .original_inference_steps
                    .unwrap_or(lcm::DEFAULT_ORIGINAL_INFERENCE_STEPS),
                timestep_scaling: config
                    .timestep_scaling
                    .unwrap_or(lcm::DEFAULT_TIMESTEP_SCALING),
            },
        )?),
    })
}
