//! [`Generator`]: the seeded random source of sampling and training.
//!
//! The stream is ChaCha8 ([`rand_chacha::ChaCha8Rng`], seeded with
//! [`rand::SeedableRng::seed_from_u64`]) and Gaussian values come from
//! [`rand_distr::StandardNormal`] sampled as `f32` on the CPU, so a seed gives the same numbers on
//! every platform and device, run after run (for the pinned `rand_chacha` 0.3 / `rand_distr` 0.4).
//!
//! It does **not** reproduce torch's random streams (`torch.Generator`), so the same seed does
//! not give the same image as diffusers. Exact parity with a diffusers run is obtained by passing
//! the initial latents (and, for stochastic schedulers, the per-step noise through their
//! `step_with_noise` methods) instead of drawing them here.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A seeded, portable random number generator producing tensors.
///
/// Implements [`rand::RngCore`], so every [`rand::Rng`] method (`gen_range`, ...) is available.
#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    rng: ChaCha8Rng,
}

impl Generator {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The seed this generator was created (or last reseeded) with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Restarts the stream from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        *self = Self::new(seed);
    }

    /// Standard normal samples (mean 0, standard deviation 1) of the given shape, drawn on the CPU
    /// as `f32` in row-major order, then cast to `dtype` and moved to `device`.
    pub fn randn(
        &mut self,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count())
            .map(|_| self.rng.sample::<f32, _>(StandardNormal))
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// Standard normal samples with the shape, dtype and device of `t`.
    pub fn randn_like(&mut self, t: &Tensor) -> candle_core::Result<Tensor> {
        self.randn(t.shape(), t.dtype(), t.device())
    }

    /// `n` integers drawn uniformly from `low..high`, as a `U32` tensor on `device` (like
    /// `torch.randint(low, high, (n,))`).
    pub fn randint(
        &mut self,
        low: u32,
        high: u32,
        n: usize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if low >= high {
            candle_core::bail!("randint: empty range {low}..{high}");
        }
        let data: Vec<u32> = (0..n).map(|_| self.rng.gen_range(low..high)).collect();
        Tensor::from_vec(data, n, &Device::Cpu)?.to_device(device)
    }
}

impl RngCore for Generator {
    fn next_u32(&mut self) -> u32 {
        self.rng.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.rng.fill_bytes(dest)
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.rng.try_fill_bytes(dest)
    }
}
