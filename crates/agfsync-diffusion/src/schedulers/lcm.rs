//! Latent Consistency Model multistep sampling (Luo et al. 2023), diffusers' `LCMScheduler`.
//!
//! Each step turns the model output into a consistency-model estimate of the clean sample,
//! `denoised = c_out(t) * x0_pred + c_skip(t) * x_t`, and then (except at the last step)
//! re-noises it to the next timestep with fresh Gaussian noise:
//! `x_prev = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * noise`. The last step returns
//! `denoised` itself.
//!
//! The timesteps are a subset of an `original_inference_steps`-long "skipping-step" schedule
//! `[k - 1, 2k - 1, ..., original * k - 1]` (`k = num_train_timesteps / original`), picked at
//! evenly spaced indices. As in diffusers 0.42, `timestep_spacing`, `steps_offset` and
//! `set_alpha_to_one` have no effect on this scheduler. Only text-to-image use is implemented
//! (diffusers' `strength = 1`, no custom timesteps).

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::common::{check_step_index, div_f32, f32, mul_f32, reject_common_unsupported};
use super::{PredictionType, Scheduler, SchedulerConfig, SchedulerError};
use crate::rng::Generator;

/// diffusers' default `original_inference_steps`.
pub const DEFAULT_ORIGINAL_INFERENCE_STEPS: usize = 50;
/// diffusers' default `timestep_scaling`.
pub const DEFAULT_TIMESTEP_SCALING: f64 = 10.0;
/// The consistency-model `sigma_data` of the boundary conditions (fixed in diffusers).
const SIGMA_DATA: f32 = 0.5;

/// The two `LCMScheduler` config fields that [`SchedulerConfig`] does not carry.
///
/// A diffusers config without them (for example SDXL's Euler config, which LCM-LoRA pipelines
/// load with `LCMScheduler.from_config`) gets the defaults, as in diffusers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawLcmOptions")]
pub struct LcmOptions {
    /// Length of the skipping-step schedule the timesteps are taken from (default 50).
    pub original_inference_steps: usize,
    /// Factor applied to the timestep in the boundary conditions `c_skip`/`c_out` (default 10).
    pub timestep_scaling: f64,
}

impl Default for LcmOptions {
    fn default() -> Self {
        Self {
            original_inference_steps: DEFAULT_ORIGINAL_INFERENCE_STEPS,
            timestep_scaling: DEFAULT_TIMESTEP_SCALING,
        }
    }
}

/// Missing or `null` fields fall back to the defaults.
#[derive(Debug, Default, Deserialize)]
struct RawLcmOptions {
    original_inference_steps: Option<usize>,
    timestep_scaling: Option<f64>,
}

impl From<RawLcmOptions> for LcmOptions {
    fn from(r: RawLcmOptions) -> Self {
        Self {
            original_inference_steps: r
                .original_inference_steps
                .unwrap_or(DEFAULT_ORIGINAL_INFERENCE_STEPS),
            timestep_scaling: r.timestep_scaling.unwrap_or(DEFAULT_TIMESTEP_SCALING),
        }
    }
}

impl LcmOptions {
    /// Reads `original_inference_steps` and `timestep_scaling` from a diffusers scheduler config
    /// JSON document (other fields are ignored).
    pub fn from_json_str(text: &str) -> Result<Self, serde_json::Error> {
        // Python writes non-finite floats as bare tokens; these two fields are never non-finite,
        // so going through a generic value is enough to skip over them elsewhere.
        let value: serde_json::Value = serde_json::from_str(&sanitize(text))?;
        serde_json::from_value(value)
    }

    /// Reads the LCM fields of a `scheduler_config.json`.
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
}

/// Replaces Python's bare `-Infinity`/`Infinity`/`NaN` (outside strings) by `null`.
fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(token) = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t))
            {
                out.push_str("null");
                rest = &rest[token.len()..];
                continue;
            }
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// diffusers' `LCMScheduler` for text-to-image sampling.
///
/// Supports epsilon, v-prediction and sample prediction, `clip_sample`, `rescale_betas_zero_snr`
/// and every beta schedule. [`Scheduler::step`] draws the between-step noise from the
/// [`Generator`]; [`LcmScheduler::step_with_noise`] takes it explicitly (to replay diffusers).
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    num_train_timesteps: usize,
    original_inference_steps: usize,
    timestep_scaling: f64,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
    timesteps: Vec<f64>,
}

impl LcmScheduler {
    /// Builds the scheduler from a diffusers config, with the default
    /// [`LcmOptions`] (`original_inference_steps = 50`, `timestep_scaling = 10`).
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        Self::with_options(config, LcmOptions::default())
    }

    /// Builds the scheduler from a diffusers config and the LCM-specific options.
    pub fn with_options(
        config: &SchedulerConfig,
        options: LcmOptions,
    ) -> Result<Self, SchedulerError> {
        reject_common_unsupported(config)?;
        validate_original_steps(options.original_inference_steps, config.num_train_timesteps)
            .map_err(SchedulerError::InvalidConfig)?;
        if !options.timestep_scaling.is_finite() {
            return Err(SchedulerError::InvalidConfig(format!(
                "LCM timestep_scaling must be finite, got {}",
                options.timestep_scaling
            )));
        }
        Ok(Self {
            alphas_cumprod: config.alphas_cumprod_f32()?,
            num_train_timesteps: config.num_train_timesteps,
            original_inference_steps: options.original_inference_steps,
            timestep_scaling: options.timestep_scaling,
            prediction_type: config.prediction_type,
            // LCMScheduler's own default is clip_sample = false
            clip_sample: config
                .clip_sample
                .unwrap_or(false)
                .then_some(config.clip_sample_range),
            timesteps: Vec::new(),
        })
    }

    /// Builds the scheduler from a `scheduler_config.json`, reading the LCM fields too.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let config = SchedulerConfig::from_file(path)?;
        Self::with_options(&config, LcmOptions::from_file(path)?)
    }

    /// The `original_inference_steps` used by [`Scheduler::set_timesteps`].
    pub fn original_inference_steps(&self) -> usize {
        self.original_inference_steps
    }

    /// The `timestep_scaling` of the boundary conditions.
    pub fn timestep_scaling(&self) -> f64 {
        self.timestep_scaling
    }

    /// The training `alphas_cumprod` (float32, as diffusers).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// diffusers' `set_timesteps(num_inference_steps, original_inference_steps=...)`: like
    /// [`Scheduler::set_timesteps`] with another skipping-step schedule length for this call
    /// (`None` uses the configured one).
    pub fn set_timesteps_with_original(
        &mut self,
        num_inference_steps: usize,
        original_inference_steps: Option<usize>,
    ) -> Result<(), SchedulerError> {
        let original = original_inference_steps.unwrap_or(self.original_inference_steps);
        let num_train = self.num_train_timesteps;
        if num_inference_steps == 0 {
            return Err(SchedulerError::InvalidSteps {
                steps: 0,
                reason: "at least one step is required".to_string(),
            });
        }
        if num_inference_steps > num_train {
            return Err(SchedulerError::InvalidSteps {
                steps: num_inference_steps,
                reason: format!(
                    "cannot exceed num_train_timesteps ({num_train}) of the scheduler config"
                ),
            });
        }
        validate_original_steps(original, num_train).map_err(|reason| {
            SchedulerError::InvalidSteps {
                steps: num_inference_steps,
                reason,
            }
        })?;
        if num_inference_steps > original {
            return Err(SchedulerError::InvalidSteps {
                steps: num_inference_steps,
                reason: format!(
                    "LCM cannot take more steps than original_inference_steps ({original}): \
                     its timesteps are a subset of that schedule"
                ),
            });
        }
        self.timesteps = lcm_timesteps(num_inference_steps, original, num_train);
        Ok(())
    }

    /// The boundary-condition scalings `(c_skip, c_out)` at `timestep`, in float32 like
    /// diffusers: with `s = timestep * timestep_scaling`,
    /// `c_skip = 0.25 / (s^2 + 0.25)` and `c_out = s / sqrt(s^2 + 0.25)`.
    pub fn boundary_condition_scalings(&self, timestep: f64) -> (f32, f32) {
        let scaled = timestep as f32 * self.timestep_scaling as f32;
        let sd2 = SIGMA_DATA * SIGMA_DATA;
        let denom = scaled * scaled + sd2;
        (sd2 / denom, scaled / denom.sqrt())
    }

    /// The consistency-model estimate of the clean sample at step `step_index` (diffusers'
    /// `LCMSchedulerOutput.denoised`). It is also what the last step returns.
    pub fn denoised(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let denoised = self.denoised_f32(&f32(model_output)?, step_index, &f32(sample)?)?;
        denoised.to_dtype(out_dtype)
    }

    fn denoised_f32(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let timestep = self.timesteps[step_index];
        let alpha_prod_t = self.alphas_cumprod[timestep as usize];
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (c_skip, c_out) = self.boundary_condition_scalings(timestep);
        // diffusers' float32 operation order
        let pred_original = match self.prediction_type {
            PredictionType::Epsilon => div_f32(
                &(sample - mul_f32(model_output, beta_prod_t.sqrt())?)?,
                alpha_prod_t.sqrt(),
            )?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (mul_f32(sample, alpha_prod_t.sqrt())?
                    - mul_f32(model_output, beta_prod_t.sqrt())?)?
            }
        };
        let pred_original = match self.clip_sample {
            Some(r) => pred_original.clamp(-r, r)?,
            None => pred_original,
        };
        mul_f32(&pred_original, c_out)? + mul_f32(sample, c_skip)?
    }

    /// One LCM step with explicit noise (same shape as the sample), which is used at every step
    /// but the last. diffusers draws it with `randn_tensor(model_output.shape, generator)`. The
    /// last step ignores `noise` and returns the denoised sample. A step needing noise without
    /// any is an error.
    pub fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let denoised = self.denoised_f32(&f32(model_output)?, step_index, &f32(sample)?)?;
        if step_index + 1 == self.timesteps.len() {
            return denoised.to_dtype(out_dtype);
        }
        let Some(noise) = noise else {
            candle_core::bail!("LCM step {step_index} needs noise (only the last step does not)");
        };
        let prev_timestep = self.timesteps[step_index + 1];
        let alpha_prod_prev = self.alphas_cumprod[prev_timestep as usize];
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let prev = (mul_f32(&denoised, alpha_prod_prev.sqrt())?
            + mul_f32(&f32(noise)?, beta_prod_prev.sqrt())?)?;
        prev.to_dtype(out_dtype)
    }
}

/// Checks `1 <= original <= num_train`.
fn validate_original_steps(original: usize, num_train: usize) -> Result<(), String> {
    if original == 0 {
        return Err("LCM original_inference_steps must be at least 1".to_string());
    }
    if original > num_train {
        return Err(format!(
            "LCM original_inference_steps ({original}) cannot exceed num_train_timesteps \
             ({num_train})"
        ));
    }
    Ok(())
}

/// diffusers' LCM schedule: `origin = [1..=original] * (num_train / original) - 1`, reversed,
/// then `origin[floor(linspace(0, original, steps, endpoint=False))]`.
fn lcm_timesteps(steps: usize, original: usize, num_train: usize) -> Vec<f64> {
    let k = num_train / original;
    let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
    // numpy: arange(steps) * (original / steps) + 0, computed in float64
    let delta = original as f64 / steps as f64;
    (0..steps)
        .map(|i| {
            let idx = ((i as f64 * delta).floor() as usize).min(origin.len() - 1);
            origin[idx] as f64
        })
        .collect()
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        self.set_timesteps_with_original(num_inference_steps, None)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut Generator,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let noise = if step_index + 1 < self.timesteps.len() {
            Some(rng.randn_like(model_output)?)
        } else {
            None
        };
        self.step_with_noise(model_output, step_index, sample, noise.as_ref())
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_diffusers_examples() {
        // LCMScheduler().set_timesteps(4) and (8)
        assert_eq!(lcm_timesteps(4, 50, 1000), [999.0, 759.0, 499.0, 259.0]);
        assert_eq!(
            lcm_timesteps(8, 50, 1000),
            [999.0, 879.0, 759.0, 639.0, 499.0, 379.0, 259.0, 139.0]
        );
        assert_eq!(lcm_timesteps(1, 50, 1000), [999.0]);
    }

    #[test]
    fn options_default_and_parse() -> Result<(), serde_json::Error> {
        let o = LcmOptions::from_json_str(r#"{"beta_schedule": "scaled_linear"}"#)?;
        assert_eq!(o, LcmOptions::default());
        let o = LcmOptions::from_json_str(
            r#"{"original_inference_steps": 40, "timestep_scaling": 5.0, "lambda_min_clipped": -Infinity}"#,
        )?;
        assert_eq!(o.original_inference_steps, 40);
        assert_eq!(o.timestep_scaling, 5.0);
        let o = LcmOptions::from_json_str(r#"{"original_inference_steps": null}"#)?;
        assert_eq!(o.original_inference_steps, 50);
        Ok(())
    }

    #[test]
    fn boundary_conditions() -> Result<(), SchedulerError> {
        let s = LcmScheduler::new(&SchedulerConfig::default())?;
        let (c_skip, c_out) = s.boundary_condition_scalings(0.0);
        assert_eq!((c_skip, c_out), (1.0, 0.0));
        let (c_skip, c_out) = s.boundary_condition_scalings(999.0);
        assert!(c_skip < 1e-8 && (c_out - 1.0).abs() < 1e-6);
        Ok(())
    }
}
