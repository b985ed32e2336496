//! Paired statistics for "tuned beats base": per-prompt differences, their
//! mean with a percentile bootstrap confidence interval, and the win rate.
//!
//! The bootstrap resamples prompts with replacement (the prompts are the
//! sampling units; both models were run on the same prompts and seeds), from
//! a seeded generator so a report's numbers are reproducible.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// Summary of paired differences `b - a` over prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedComparison {
    /// Prompts compared.
    pub n: usize,
    /// Mean of `a`.
    pub mean_a: f64,
    /// Mean of `b`.
    pub mean_b: f64,
    /// Mean difference `b - a`.
    pub mean_diff: f64,
    /// Lower end of the confidence interval of the mean difference.
    pub ci_low: f64,
    /// Upper end.
    pub ci_high: f64,
    /// Confidence level (e.g. 0.95).
    pub level: f64,
    /// Fraction of prompts where `b > a`, ties counting half.
    pub win_rate: f64,
    /// Bootstrap resamples used.
    pub resamples: usize,
}

impl PairedComparison {
    /// Whether the interval excludes zero on the positive side.
    pub fn b_better(&self) -> bool {
        self.ci_low > 0.0
    }
}

/// Mean of a slice (NaN when empty).
pub fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Sample standard deviation (n - 1; 0 for fewer than two values).
pub fn std_dev(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// The `q`-quantile of sorted values (linear interpolation, as numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Compares paired per-prompt values `a` (e.g. base) and `b` (tuned).
pub fn paired_bootstrap(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Result<PairedComparison> {
    if a.len() != b.len() {
        return Err(EvalError::Invalid(format!(
            "paired comparison of {} and {} values: both models must have every prompt",
            a.len(),
            b.len()
        )));
    }
    if a.is_empty() || resamples == 0 || !(0.0..1.0).contains(&level) {
        return Err(EvalError::Invalid(
            "paired comparison needs values, resamples > 0 and a level in (0, 1)".into(),
        ));
    }
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return Err(EvalError::Invalid(
            "paired comparison: a value is NaN or infinite".into(),
        ));
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let n = d.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| d[rng.gen_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    let wins = d
        .iter()
        .map(|x| {
            if *x > 0.0 {
                1.0
            } else if *x == 0.0 {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f64>();
    Ok(PairedComparison {
        n,
        mean_a: mean(a),
        mean_b: mean(b),
        mean_diff: mean(&d),
        ci_low: quantile(&means, alpha),
        ci_high: quantile(&means, 1.0 - alpha),
        level,
        win_rate: wins / n as f64,
        resamples,
    })
}

/// HPSv2's benchmark statistic for one style: the prompts split into
/// `chunks` consecutive parts (10 in the benchmark), the mean of each, and
/// the mean and standard deviation of those chunk means.
pub fn chunked_mean_std(values: &[f64], chunks: usize) -> (f64, f64) {
    if values.is_empty() || chunks == 0 {
        return (f64::NAN, f64::NAN);
    }
    let size = values.len().div_ceil(chunks);
    let means: Vec<f64> = values.chunks(size).map(mean).collect();
    (mean(&means), std_dev(&means))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn interval_covers_a_known_difference_and_excludes_zero() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let noise = Normal::new(0.0, 1.0).unwrap();
        let a: Vec<f64> = (0..400).map(|_| 20.0 + noise.sample(&mut rng)).collect();
        let b: Vec<f64> = a
            .iter()
            .map(|x| x + 0.5 + 0.5 * noise.sample(&mut rng))
            .collect();
        let c = paired_bootstrap(&a, &b, 2000, 0.95, 1).unwrap();
        assert!(c.ci_low < 0.5 && 0.5 < c.ci_high, "{c:?}");
        assert!(c.b_better());
        assert!(c.win_rate > 0.75, "{c:?}");
        // No difference: the interval contains zero.
        let c0 = paired_bootstrap(
            &a,
            &a.iter()
                .map(|x| x + 0.3 * noise.sample(&mut rng))
                .collect::<Vec<_>>(),
            2000,
            0.95,
            1,
        )
        .unwrap();
        assert!(c0.ci_low < 0.0 && 0.0 < c0.ci_high, "{c0:?}");
    }

    #[test]
    fn bootstrap_is_reproducible_and_checks_its_input() {
        let a = [1.0, 2.0, 3.0];
        let b = [1.5, 2.0, 2.0];
        assert_eq!(
            paired_bootstrap(&a, &b, 100, 0.9, 7).unwrap(),
            paired_bootstrap(&a, &b, 100, 0.9, 7).unwrap()
        );
        let c = paired_bootstrap(&a, &b, 100, 0.9, 7).unwrap();
        assert_eq!(c.win_rate, (1.0 + 0.5) / 3.0);
        assert!(paired_bootstrap(&a, &b[..2], 100, 0.9, 7).is_err());
        assert!(paired_bootstrap(&[f64::NAN], &[1.0], 100, 0.9, 7).is_err());
    }

    #[test]
    fn chunk_statistics() {
        let v: Vec<f64> = (0..20).map(f64::from).collect();
        let (m, s) = chunked_mean_std(&v, 10);
        assert!((m - 9.5).abs() < 1e-12);
        // Chunk means 0.5, 2.5, ..., 18.5: spaced by 2.
        assert!(
            (s - std_dev(
                &(0..10)
                    .map(|i| 0.5 + 2.0 * f64::from(i))
                    .collect::<Vec<_>>()
            ))
            .abs()
                < 1e-12
        );
    }
}
