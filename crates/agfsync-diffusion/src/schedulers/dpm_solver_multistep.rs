//! DPM-Solver++ multistep (Lu et al. 2022), diffusers' `DPMSolverMultistepScheduler`.

use candle_core::Tensor;

use super::common::{
    check_step_index, f32, final_sigma, karras_sigmas, lincomb, np_arange, np_interp, np_linspace,
    np_round, predict_x0, reject_common_unsupported, reject_unsupported_sigmas, sigma_to_t,
    train_sigmas_f32, validate_steps, validate_timesteps,
};
use super::{
    AlgorithmType, BetaSchedule, FinalSigmasType, PredictionType, Scheduler, SchedulerConfig,
    SchedulerError, SolverType, TimestepSpacing, VarianceType,
};
use crate::rng::Generator;

/// diffusers' `DPMSolverMultistepScheduler` for `algorithm_type` `dpmsolver++` (deterministic,
/// "DPM++ 2M") and `sde-dpmsolver++` (stochastic, noise from the [`Generator`]), solver orders
/// 1 to 3, midpoint or Heun second-order rule, optional Karras sigmas, `lower_order_final`,
/// `euler_at_final`, `final_sigmas_type` zero/sigma_min and `lambda_min_clipped`.
///
/// The model-output history is kept internally and cleared by `set_timesteps`; steps must be
/// taken in order.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
    lambda_t: Vec<f32>,
    num_train_timesteps: usize,
    beta_schedule: BetaSchedule,
    spacing: TimestepSpacing,
    steps_offset: usize,
    prediction_type: PredictionType,
    sde: bool,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    use_karras_sigmas: bool,
    final_sigmas_type: FinalSigmasType,
    lambda_min_clipped: f64,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// Converted (x0) model outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    next_step: usize,
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler from a diffusers config (its `algorithm_type`, `solver_order`,
    /// `use_karras_sigmas`, ... are honoured; [`super::build`] overrides some for the named
    /// kinds).
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        reject_common_unsupported(config)?;
        reject_unsupported_sigmas(config)?;
        let sde = match config.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis => false,
            AlgorithmType::SdeDpmSolverPlusPlus => true,
            AlgorithmType::DpmSolver | AlgorithmType::SdeDpmSolver => {
                return Err(SchedulerError::Unsupported {
                    option: format!("algorithm_type = {:?}", config.algorithm_type),
                    reason: "only dpmsolver++ and sde-dpmsolver++ are implemented".to_string(),
                })
            }
        };
        if !(1..=3).contains(&config.solver_order) {
            return Err(SchedulerError::Unsupported {
                option: format!("solver_order = {}", config.solver_order),
                reason: "DPM-Solver supports orders 1, 2 and 3".to_string(),
            });
        }
        if let Some(v @ (VarianceType::Learned | VarianceType::LearnedRange)) = config.variance_type
        {
            return Err(SchedulerError::Unsupported {
                option: format!("variance_type = {v:?}"),
                reason: "learned variances are not supported by DPM-Solver here".to_string(),
            });
        }
        let mut alphas_cumprod = config.alphas_cumprod_f32()?;
        if config.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let sigmas_f32 = train_sigmas_f32(&alphas_cumprod);
        let lambda_t = alphas_cumprod
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .collect();
        Ok(Self {
            train_sigmas: sigmas_f32.iter().map(|&s| f64::from(s)).collect(),
            log_sigmas: sigmas_f32.iter().map(|&s| f64::from(s.ln())).collect(),
            lambda_t,
            alphas_cumprod,
            num_train_timesteps: config.num_train_timesteps,
            beta_schedule: config.beta_schedule,
            spacing: config.timestep_spacing_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset,
            prediction_type: config.prediction_type,
            sde,
            solver_order: config.solver_order,
            heun: config.solver_type == SolverType::Heun,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            use_karras_sigmas: config.use_karras_sigmas,
            final_sigmas_type: config.final_sigmas_type,
            lambda_min_clipped: config.lambda_min_clipped,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: vec![None; config.solver_order],
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// `(alpha_t, sigma_t)` of the variance-preserving process for a Karras sigma.
    fn alpha_sigma(sigma: f64) -> (f64, f64) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    fn lambda(sigma: f64) -> (f64, f64, f64) {
        let (alpha, s) = Self::alpha_sigma(sigma);
        (alpha, s, alpha.ln() - s.ln())
    }

    /// One step with explicit noise (needed by `sde-dpmsolver++` only; ignored otherwise).
    pub fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let n = self.timesteps.len();
        check_step_index(step_index, n)?;
        if step_index != self.next_step && self.lower_order_nums > 0 {
            candle_core::bail!(
                "DPM-Solver is multistep: expected step {} but got {step_index}; \
                 call set_timesteps to restart",
                self.next_step
            );
        }
        let out_dtype = model_output.dtype();
        let lower_order_final = step_index == n - 1
            && (self.euler_at_final
                || (self.lower_order_final && n < 15)
                || self.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = step_index + 2 == n && self.lower_order_final && n < 15;

        let sample = f32(sample)?;
        let sigma_s0 = self.sigmas[step_index];
        let (alpha_s0, sigma_s0_t, lambda_s0) = Self::lambda(sigma_s0);
        let x0 = predict_x0(
            self.prediction_type,
            &f32(model_output)?,
            &sample,
            alpha_s0,
            sigma_s0_t,
        )?;
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(x0.clone());

        let noise = if self.sde {
            match noise {
                Some(z) => Some(f32(z)?),
                None => candle_core::bail!("sde-dpmsolver++ needs noise"),
            }
        } else {
            None
        };

        let (alpha_t, sigma_t, lambda_t) = Self::lambda(self.sigmas[step_index + 1]);
        let h = lambda_t - lambda_s0;
        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let history = |k: usize| -> candle_core::Result<&Tensor> {
            match &self.model_outputs[last - k] {
                Some(t) => Ok(t),
                None => candle_core::bail!("DPM-Solver history is missing a model output"),
            }
        };
        let mut terms: Vec<(f64, Tensor)> = Vec::with_capacity(5);
        // x_t = a * sample + c0 * D0 + c1 * D1 + c2 * D2 (+ noise)
        let (sample_coef, e) = if self.sde {
            (sigma_t / sigma_s0_t * (-h).exp(), 1.0 - (-2.0 * h).exp())
        } else {
            (sigma_t / sigma_s0_t, -((-h).exp() - 1.0))
        };
        terms.push((sample_coef, sample));
        let m0 = history(0)?.clone();
        match order {
            1 => terms.push((alpha_t * e, m0)),
            2 => {
                let m1 = history(1)?;
                let (_, _, lambda_s1) = Self::lambda(self.sigmas[step_index - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = ((&m0 - m1)? * (1.0 / r0))?;
                let c1 = if !self.heun {
                    0.5 * alpha_t * e
                } else if self.sde {
                    alpha_t * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0)
                } else {
                    alpha_t * (((-h).exp() - 1.0) / h + 1.0)
                };
                terms.push((alpha_t * e, m0));
                terms.push((c1, d1));
            }
            _ => {
                let m1 = history(1)?;
                let m2 = history(2)?;
                let (_, _, lambda_s1) = Self::lambda(self.sigmas[step_index - 1]);
                let (_, _, lambda_s2) = Self::lambda(self.sigmas[step_index - 2]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let r1 = (lambda_s1 - lambda_s2) / h;
                let d1_0 = ((&m0 - m1)? * (1.0 / r0))?;
                let d1_1 = ((m1 - m2)? * (1.0 / r1))?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = lincomb(&[(1.0, &d1_0), (r0 / (r0 + r1), &diff)])?;
                let d2 = (diff * (1.0 / (r0 + r1)))?;
                let (c1, c2) = if self.sde {
                    (
                        alpha_t * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0),
                        alpha_t * ((1.0 - (-2.0 * h).exp() - 2.0 * h) / (2.0 * h).powi(2) - 0.5),
                    )
                } else {
                    (
                        alpha_t * (((-h).exp() - 1.0) / h + 1.0),
                        -alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5),
                    )
                };
                terms.push((alpha_t * e, m0));
                terms.push((c1, d1));
                terms.push((c2, d2));
            }
        }
        if let Some(z) = noise {
            terms.push((sigma_t * (1.0 - (-2.0 * h).exp()).sqrt(), z));
        }
        let refs: Vec<(f64, &Tensor)> = terms.iter().map(|(c, t)| (*c, t)).collect();
        let prev = lincomb(&refs)?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step = step_index + 1;
        prev.to_dtype(out_dtype)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        let n = num_inference_steps;
        let num_train = self.num_train_timesteps;
        validate_steps(n, num_train)?;
        // lambda(t) clipping: searchsorted(flip(lambda_t), lambda_min_clipped)
        let clip = self.lambda_min_clipped as f32;
        let clipped_idx = self
            .lambda_t
            .iter()
            .rev()
            .take_while(|&&l| l < clip)
            .count();
        let last_timestep = num_train - clipped_idx;
        if last_timestep == 0 {
            return Err(SchedulerError::InvalidConfig(
                "lambda_min_clipped removes every timestep".to_string(),
            ));
        }
        let mut timesteps: Vec<f64> = match self.spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, (last_timestep - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(np_round)
                    .collect();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = num_train as f64 / n as f64;
                np_arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| np_round(t) - 1.0)
                    .collect()
            }
        };
        let mut sigmas: Vec<f64>;
        if self.use_karras_sigmas {
            let sigma_min = self.train_sigmas[0];
            let sigma_max = self.train_sigmas[num_train - 1];
            sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let round = self.beta_schedule != BetaSchedule::SquaredcosCapV2;
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &self.log_sigmas);
                    // diffusers rounds, except for squaredcos_cap_v2 where the int64 cast
                    // truncates
                    if round {
                        np_round(t)
                    } else {
                        t.trunc()
                    }
                })
                .collect();
        } else {
            sigmas = timesteps
                .iter()
                .map(|&t| np_interp(t, &self.train_sigmas))
                .collect();
        }
        validate_timesteps(n, &timesteps, num_train)?;
        if timesteps.is_empty() {
            return Err(SchedulerError::InvalidSteps {
                steps: n,
                reason: "the schedule has no timesteps".to_string(),
            });
        }
        sigmas.push(final_sigma(self.final_sigmas_type, &self.alphas_cumprod));
        self.sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        self.timesteps = timesteps;
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.next_step = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(
        &self,
        sample: &Tensor,
        _step_index: usize,
    ) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut Generator,
    ) -> candle_core::Result<Tensor> {
        let noise = if self.sde {
            Some(rng.randn(
                model_output.shape(),
                candle_core::DType::F32,
                model_output.device(),
            )?)
        } else {
            None
        };
        self.step_with_noise(model_output, step_index, sample, noise.as_ref())
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
