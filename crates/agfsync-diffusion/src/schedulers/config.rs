//! [`SchedulerConfig`]: the contents of a diffusers `scheduler/scheduler_config.json`.
//!
//! Every field carries diffusers' default so that a config file written by any diffusers
//! scheduler class (or a hand-written, partial one) can be loaded. Unknown fields are ignored,
//! and `null` values mean "use the default", as in diffusers. Two fields whose default differs
//! between diffusers classes (`timestep_spacing`, `clip_sample`) are optional and resolved by
//! each scheduler.
//!
//! The noise schedule ([`SchedulerConfig::betas`], [`SchedulerConfig::alphas_cumprod`]) is
//! computed the way diffusers computes it: in `float32` torch arithmetic (the cumulative product
//! accumulates in double precision, as torch's CPU kernel does). The values are returned widened
//! to `f64`.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use super::{PredictionType, SchedulerError};

/// How the training betas are laid out over `num_train_timesteps` (diffusers `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end)) ** 2` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal, betas capped at 0.999.
    SquaredcosCapV2,
}

/// How inference timesteps are spread over the training range (diffusers `timestep_spacing`,
/// see table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Multiples of `num_train_timesteps / steps`, starting at 0, plus `steps_offset`.
    Leading,
    /// Multiples of `num_train_timesteps / steps`, ending at `num_train_timesteps - 1`.
    Trailing,
    /// Evenly spaced between 0 and `num_train_timesteps - 1`.
    Linspace,
}

/// How sigmas between training timesteps are interpolated (diffusers `interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// Linear interpolation of sigma in the timestep (the only supported value).
    Linear,
    /// Log-linear interpolation (rejected by the schedulers: unsupported).
    LogLinear,
}

/// Whether the UNet receives discrete timesteps or `0.25 * ln(sigma)` (diffusers
/// `timestep_type`; continuous only applies with `v_prediction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// The usual timesteps.
    Discrete,
    /// EDM-style `0.25 * ln(sigma)` timesteps (used with `v_prediction` only).
    Continuous,
}

/// The last sigma of a sigma schedule (diffusers `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// The schedule ends at sigma = 0 (a clean sample).
    Zero,
    /// The schedule ends at the smallest training sigma.
    SigmaMin,
}

/// The DPM-Solver variant (diffusers `algorithm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlgorithmType {
    /// DPM-Solver++ (data prediction), the usual "DPM++" samplers.
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    /// Stochastic DPM-Solver++ ("DPM++ SDE").
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// The original DPM-Solver (noise prediction); unsupported.
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// The stochastic original DPM-Solver; unsupported.
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    /// Written by DEIS configs; diffusers' DPM-Solver treats it as `dpmsolver++`.
    #[serde(rename = "deis")]
    Deis,
}

/// The second-order update rule of DPM-Solver (diffusers `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    /// The midpoint rule (diffusers' default).
    Midpoint,
    /// Heun's rule.
    Heun,
    /// Written by DEIS configs; treated as `midpoint`, as diffusers does.
    Logrho,
    /// Written by UniPC configs; treated as `midpoint`, as diffusers does.
    Bh1,
    /// Written by UniPC configs; treated as `midpoint`, as diffusers does.
    Bh2,
}

/// The variance used by DDPM's ancestral step (diffusers `variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance (diffusers' DDPM default).
    FixedSmall,
    /// The posterior variance through a log (same values, clamped at 1e-20).
    FixedSmallLog,
    /// Beta_t.
    FixedLarge,
    /// Unsupported.
    FixedLargeLog,
    /// Model-predicted variance; unsupported.
    Learned,
    /// Model-predicted interpolation; unsupported.
    LearnedRange,
}

/// A diffusers scheduler config (`scheduler/scheduler_config.json`).
///
/// Build it with [`SchedulerConfig::from_file`], [`SchedulerConfig::from_json_str`], or start from
/// [`SchedulerConfig::default`] (diffusers' defaults) and set fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawSchedulerConfig")]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// The diffusers class that wrote the config (`_class_name`); empty when absent.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// Number of diffusion steps the model was trained with (default 1000).
    pub num_train_timesteps: usize,
    /// First beta (default 0.0001).
    pub beta_start: f64,
    /// Last beta (default 0.02).
    pub beta_end: f64,
    /// Layout of the betas (default linear).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding `beta_start`/`beta_end`/`beta_schedule` when set.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts (default epsilon).
    pub prediction_type: PredictionType,
    /// Timestep spacing; `None` uses the scheduler class' diffusers default (leading for DDIM
    /// and DDPM, linspace for Euler, Euler ancestral and DPM-Solver).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Offset added to `leading` timesteps (default 0; Stable Diffusion 1.x uses 1).
    pub steps_offset: usize,
    /// Clip the predicted x0 to `±clip_sample_range` (DDIM, DDPM). `None` uses the diffusers
    /// default of those classes, `true`.
    pub clip_sample: Option<bool>,
    /// Clipping range for `clip_sample` (default 1.0).
    pub clip_sample_range: f64,
    /// DDIM: use alpha_cumprod = 1 after the last step (default true) instead of the first
    /// training alpha_cumprod.
    pub set_alpha_to_one: bool,
    /// Dynamic thresholding; unsupported, `true` is rejected when building a scheduler.
    pub thresholding: bool,
    /// Use the Karras et al. sigma schedule (Euler, DPM-Solver; default false).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas; unsupported, `true` is rejected.
    pub use_exponential_sigmas: bool,
    /// Beta sigmas; unsupported, `true` is rejected.
    pub use_beta_sigmas: bool,
    /// DPM-Solver Lu lambdas; unsupported, `true` is rejected.
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas; unsupported, `true` is rejected.
    pub use_flow_sigmas: bool,
    /// Rescale betas to zero terminal SNR (default false).
    pub rescale_betas_zero_snr: bool,
    /// Sigma interpolation (Euler; default linear).
    pub interpolation_type: InterpolationType,
    /// Timestep type (Euler; default discrete).
    pub timestep_type: TimestepType,
    /// Last sigma of the schedule (Euler, DPM-Solver; default zero).
    pub final_sigmas_type: FinalSigmasType,
    /// Karras schedule lower bound override (Euler only, as in diffusers).
    pub sigma_min: Option<f64>,
    /// Karras schedule upper bound override (Euler only, as in diffusers).
    pub sigma_max: Option<f64>,
    /// DPM-Solver: use lower-order steps at the end of short (< 15 steps) schedules (default
    /// true).
    pub lower_order_final: bool,
    /// DPM-Solver: use a first-order step at the very end (default false).
    pub euler_at_final: bool,
    /// DPM-Solver order (default 2; 1, 2 and 3 are supported).
    pub solver_order: usize,
    /// DPM-Solver algorithm (default `dpmsolver++`).
    pub algorithm_type: AlgorithmType,
    /// DPM-Solver second-order rule (default midpoint).
    pub solver_type: SolverType,
    /// DPM-Solver: clip lambda(t) from below (default -inf, no clipping). Written as `-Infinity`
    /// by Python's `json`, which this loader accepts.
    pub lambda_min_clipped: f64,
    /// Variance type (DDPM: default fixed_small; DPM-Solver: must not be learned).
    pub variance_type: Option<VarianceType>,
    /// LCM: length of the distillation schedule the timesteps are drawn from
    /// (LCM's default 50 when absent).
    pub original_inference_steps: Option<usize>,
    /// LCM: scaling of the timestep in the boundary conditions (default 10).
    pub timestep_scaling: Option<f64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        RawSchedulerConfig::default().into()
    }
}

/// Every field optional, so that `null`s and missing fields both fall back to the defaults.
#[derive(Debug, Default, Deserialize)]
struct RawSchedulerConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<BetaSchedule>,
    trained_betas: Option<Vec<f64>>,
    prediction_type: Option<PredictionType>,
    timestep_spacing: Option<TimestepSpacing>,
    steps_offset: Option<usize>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    set_alpha_to_one: Option<bool>,
    thresholding: Option<bool>,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    use_lu_lambdas: Option<bool>,
    use_flow_sigmas: Option<bool>,
    rescale_betas_zero_snr: Option<bool>,
    interpolation_type: Option<InterpolationType>,
    timestep_type: Option<TimestepType>,
    final_sigmas_type: Option<FinalSigmasType>,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    lower_order_final: Option<bool>,
    euler_at_final: Option<bool>,
    solver_order: Option<usize>,
    algorithm_type: Option<AlgorithmType>,
    solver_type: Option<SolverType>,
    #[serde(default, deserialize_with = "lenient_f64")]
    lambda_min_clipped: Option<f64>,
    variance_type: Option<VarianceType>,
    original_inference_steps: Option<usize>,
    timestep_scaling: Option<f64>,
}

impl From<RawSchedulerConfig> for SchedulerConfig {
    fn from(r: RawSchedulerConfig) -> Self {
        Self {
            class_name: r.class_name.unwrap_or_default(),
            num_train_timesteps: r.num_train_timesteps.unwrap_or(1000),
            beta_start: r.beta_start.unwrap_or(0.0001),
            beta_end: r.beta_end.unwrap_or(0.02),
            beta_schedule: r.beta_schedule.unwrap_or(BetaSchedule::Linear),
            trained_betas: r.trained_betas,
            prediction_type: r.prediction_type.unwrap_or(PredictionType::Epsilon),
            timestep_spacing: r.timestep_spacing,
            steps_offset: r.steps_offset.unwrap_or(0),
            clip_sample: r.clip_sample,
            clip_sample_range: r.clip_sample_range.unwrap_or(1.0),
            set_alpha_to_one: r.set_alpha_to_one.unwrap_or(true),
            thresholding: r.thresholding.unwrap_or(false),
            use_karras_sigmas: r.use_karras_sigmas.unwrap_or(false),
            use_exponential_sigmas: r.use_exponential_sigmas.unwrap_or(false),
            use_beta_sigmas: r.use_beta_sigmas.unwrap_or(false),
            use_lu_lambdas: r.use_lu_lambdas.unwrap_or(false),
            use_flow_sigmas: r.use_flow_sigmas.unwrap_or(false),
            rescale_betas_zero_snr: r.rescale_betas_zero_snr.unwrap_or(false),
            interpolation_type: r.interpolation_type.unwrap_or(InterpolationType::Linear),
            timestep_type: r.timestep_type.unwrap_or(TimestepType::Discrete),
            final_sigmas_type: r.final_sigmas_type.unwrap_or(FinalSigmasType::Zero),
            sigma_min: r.sigma_min,
            sigma_max: r.sigma_max,
            lower_order_final: r.lower_order_final.unwrap_or(true),
            euler_at_final: r.euler_at_final.unwrap_or(false),
            solver_order: r.solver_order.unwrap_or(2),
            algorithm_type: r.algorithm_type.unwrap_or(AlgorithmType::DpmSolverPlusPlus),
            solver_type: r.solver_type.unwrap_or(SolverType::Midpoint),
            lambda_min_clipped: r.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            variance_type: r.variance_type,
            original_inference_steps: r.original_inference_steps,
            timestep_scaling: r.timestep_scaling,
        }
    }
}

/// Accepts a number, `null`, or the strings `"-Infinity"`, `"Infinity"`, `"NaN"` (what
/// [`sanitize_python_json`] turns Python's bare non-finite literals into).
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::Num(x)) => Ok(Some(x)),
        Some(NumOrStr::Str(s)) => match s.as_str() {
            "-Infinity" | "-inf" => Ok(Some(f64::NEG_INFINITY)),
            "Infinity" | "inf" => Ok(Some(f64::INFINITY)),
            "NaN" | "nan" => Ok(Some(f64::NAN)),
            other => other
                .parse::<f64>()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("expected a number, got {other:?}"))),
        },
    }
}

/// Python's `json` writes `-Infinity`, `Infinity` and `NaN` as bare tokens, which are not JSON.
/// Quote them (outside strings) so that serde can read the document.
fn sanitize_python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

impl SchedulerConfig {
    /// Parses a diffusers scheduler config from JSON text (Python's `-Infinity`/`NaN` literals
    /// are accepted).
    pub fn from_json_str(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(&sanitize_python_json(text))
    }

    /// Reads a diffusers `scheduler_config.json`. Errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|source| SchedulerError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The training betas, computed as diffusers does in `float32` (values widened to `f64`).
    /// Includes the zero-terminal-SNR rescaling when `rescale_betas_zero_snr` is set.
    pub fn betas(&self) -> Result<Vec<f64>, SchedulerError> {
        Ok(self.betas_f32()?.into_iter().map(f64::from).collect())
    }

    /// The cumulative products of `1 - beta` (diffusers `alphas_cumprod`), widened to `f64`.
    ///
    /// This is the value DDIM and DDPM use; Euler, Euler ancestral and DPM-Solver additionally
    /// replace the last entry with `2^-24` when `rescale_betas_zero_snr` is set (to keep sigma
    /// finite), which their constructors do.
    pub fn alphas_cumprod(&self) -> Result<Vec<f64>, SchedulerError> {
        Ok(self
            .alphas_cumprod_f32()?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// The timestep spacing, or `class_default` when the config does not set one.
    pub fn timestep_spacing_or(&self, class_default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(class_default)
    }

    pub(crate) fn betas_f32(&self) -> Result<Vec<f32>, SchedulerError> {
        let n = self.num_train_timesteps;
        if n < 2 {
            return Err(SchedulerError::InvalidConfig(format!(
                "num_train_timesteps must be at least 2, got {n}"
            )));
        }
        let betas: Vec<f32> = if let Some(tb) = &self.trained_betas {
            if tb.len() != n {
                return Err(SchedulerError::InvalidConfig(format!(
                    "trained_betas has {} entries but num_train_timesteps is {n}",
                    tb.len()
                )));
            }
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match self.beta_schedule {
                BetaSchedule::Linear => {
                    torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n)
                }
                BetaSchedule::ScaledLinear => torch_linspace_f32(
                    self.beta_start.sqrt() as f32,
                    self.beta_end.sqrt() as f32,
                    n,
                )
                .into_iter()
                .map(|x| x * x)
                .collect(),
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar_cosine(n),
            }
        };
        if betas
            .iter()
            .any(|b| !b.is_finite() || *b < 0.0 || *b >= 1.0)
        {
            return Err(SchedulerError::InvalidConfig(
                "betas must lie in [0, 1)".to_string(),
            ));
        }
        Ok(if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        })
    }

    pub(crate) fn alphas_cumprod_f32(&self) -> Result<Vec<f32>, SchedulerError> {
        let alphas: Vec<f32> = self.betas_f32()?.iter().map(|b| 1.0 - b).collect();
        Ok(cumprod_f32(&alphas))
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` as torch's CPU kernel computes it (scalar
/// path: the first half counts up from `start`, the second half down from `end`).
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on CPU: accumulated in double, stored as float.
fn cumprod_f32(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    xs.iter()
        .map(|&x| {
            acc *= f64::from(x);
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar(n, max_beta=0.999, "cosine")`, computed in Python floats and
/// stored as float32.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for s in &mut sqrt_bar {
        *s -= last;
        *s *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals_are_accepted() {
        let c = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "_class_name": "X -Infinity", "variance_type": null}"#,
        )
        .expect("parses");
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(c.class_name, "X -Infinity");
    }

    #[test]
    fn defaults_match_diffusers() {
        let c = SchedulerConfig::default();
        assert_eq!(c.num_train_timesteps, 1000);
        assert_eq!(c.beta_schedule, BetaSchedule::Linear);
        assert!(c.set_alpha_to_one);
        assert_eq!(c.solver_order, 2);
        let b = c.betas().expect("betas");
        assert_eq!(b.len(), 1000);
        assert!((b[0] - 0.0001).abs() < 1e-9 && (b[999] - 0.02).abs() < 1e-9);
    }
}
