//! AdamW with inspectable state (its moments are checkpointed), learning
//! rate schedules and global gradient-norm clipping.

use candle_core::{Result, Tensor, Var};

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// AdamW over a fixed, ordered list of variables, as PyTorch computes it:
/// `p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
}

impl AdamW {
    /// A fresh optimizer (zero moments, step 0).
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> usize {
        self.t
    }

    /// The first and second moments, in the order of the variables.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores moments and the step count (from a checkpoint).
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, t: usize) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            candle_core::bail!(
                "optimizer state holds {} / {} moments for {} variables",
                m.len(),
                v.len(),
                self.vars.len()
            );
        }
        for ((var, m), v) in self.vars.iter().zip(&m).zip(&v) {
            if m.dims() != var.dims() || v.dims() != var.dims() {
                candle_core::bail!(
                    "optimizer moment of shape {:?} for a variable of shape {:?}",
                    m.dims(),
                    var.dims()
                );
            }
        }
        self.m = m;
        self.v = v;
        self.t = t;
        Ok(())
    }

    /// One update with learning rate `lr` from `grads` (one per variable, in
    /// order; `None` leaves that variable's moments decaying with a zero
    /// gradient, as PyTorch skips it entirely: here it is skipped too).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(i).and_then(|g| g.as_ref()) else {
                continue;
            };
            let g = g.to_dtype(var.dtype())?;
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + p.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Learning-rate schedule (diffusers' `get_scheduler` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// The base rate throughout.
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then constant.
    ConstantWithWarmup,
    /// Linear warm-up, then half a cosine down to 0 at the last step.
    Cosine,
}

impl LrScheduler {
    /// The rate for optimizer step `step` (0-based) of `total` with base
    /// rate `lr`.
    pub fn lr_at(self, lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
        let s = step as f64;
        if matches!(self, Self::ConstantWithWarmup | Self::Cosine) && step < warmup {
            return lr * s / (warmup.max(1) as f64);
        }
        match self {
            Self::Constant | Self::ConstantWithWarmup => lr,
            Self::Cosine => {
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((s - warmup as f64) / span).clamp(0.0, 1.0);
                lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// The global L2 norm of `grads` (ignoring missing ones), in f64.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads.iter().flatten() {
        sum += g
            .to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when it is below 1);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
