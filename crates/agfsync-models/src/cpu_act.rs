//! Gated and sigmoid-weighted activations and the softmax on the CPU as
//! single passes: GEGLU (Shazeer, "GLU Variants Improve Transformer", 2020),
//! the feed-forward of every Stable Diffusion transformer block, with its
//! own backward; CLIP's `quick_gelu`, `x * sigmoid(1.702 x)`; and the
//! softmax over the last dimension with an exponential the compiler can
//! vectorise ([`exp_f32`]).
//!
//! Composed of candle ops, GEGLU narrows the projection into two strided
//! halves, runs the erf-based GELU over one (a strided element loop) and
//! multiplies them (another), allocating each result; its backward adds the
//! GELU derivative's own chain of ops. Here one pass reads each row's halves
//! and writes the product, and the backward is one pass writing both halves'
//! gradients. `quick_gelu` is three ops composed (scale, sigmoid, product)
//! and one pass here.
//!
//! f32 and f64 CPU tensors only ([`handles`]); elsewhere the callers
//! compose candle ops. In f32 the error function is Abramowitz and Stegun's
//! 7.1.26 (absolute error below 1.5e-7, f32's own resolution near 1) and the
//! exponential Cephes' `expf` polynomial without its branches (relative
//! error about 2e-7); in f64 both are libm's.

use candle_core::{
    CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

/// Whether this module computes on `x` (an f32 or f64 CPU tensor).
pub fn handles(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `a * gelu(gate)` where `[a, gate]` are the halves of `h`'s last
/// dimension (diffusers' `GEGLU` after its projection). Records gradients
/// when `h` does.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let h = h.contiguous()?;
    if h.dim(candle_core::D::Minus1)? % 2 != 0 {
        candle_core::bail!("geglu: an odd last dimension {:?}", h.dims());
    }
    if h.track_op() {
        h.apply_op1_arc(std::sync::Arc::new(Box::new(Geglu)))
    } else {
        h.apply_op1_no_bwd(&Geglu)
    }
}

/// The softmax over the last dimension without a graph (callers use it
/// where no gradient flows through: inference attention, recomputed
/// probabilities).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Softmax)
}

/// `e^x` in f32 without branches or calls, so loops over slices vectorise:
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2`, Cephes' minimax polynomial for
/// `e^r` (Moshier, "Methods and Programs for Mathematical Functions",
/// 1989), and `2^n` built in the exponent bits. Inputs below -87.3 (where
/// `e^x` leaves f32's normal range) give 0; inputs above 88.3 give
/// `e^88.3` (f32 overflows at 88.72).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        er * scale
    }
}

/// `x * sigmoid(1.702 x)` without a graph (`x` must not record gradients).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&QuickGelu)
}

/// f32 and f64 with the functions the CPU kernels need (`cpu_act`,
/// `cpu_norm`): f32's exponential is [`exp_f32`].
pub(crate) trait Real: WithDType {
    fn erf(self) -> Self;
    fn exp(self) -> Self;
}

impl Real for f32 {
    /// Abramowitz and Stegun 7.1.26.
    fn erf(self) -> Self {
        const P: f32 = 0.327_591_1;
        const A: [f32; 5] = [
            0.254_829_6,
            -0.284_496_74,
            1.421_413_7,
            -1.453_152_1,
            1.061_405_4,
        ];
        let x = self.abs();
        let t = 1.0 / (1.0 + P * x);
        let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
        let y = 1.0 - poly * (-x * x).exp();
        y.copysign(self)
    }

    fn exp(self) -> Self {
        exp_f32(self)
    }
}

impl Real for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }

    fn exp(self) -> Self {
        f64::exp(self)
    }
}

const SQRT_HALF: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `Φ(x)`, the standard normal CDF.
fn cdf<T: Real>(x: T) -> T {
    let half = T::from_f64(0.5);
    half * (T::from_f64(1.0) + (x * T::from_f64(SQRT_HALF)).erf())
}

/// The erf-based GELU and its derivative `Φ(x) + x φ(x)`.
fn gelu_and_slope<T: Real>(x: T) -> (T, T) {
    let c = cdf(x);
    let pdf = T::from_f64(INV_SQRT_2PI) * (T::from_f64(-0.5) * x * x).exp();
    (x * c, c + x * pdf)
}

/// The elements of a contiguous operand of a CPU custom op.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("CPU kernel: a non-contiguous operand"),
    }
}

/// The elements of a contiguous CPU tensor's storage.
pub(crate) fn elements<'a, T: WithDType>(storage: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    match storage {
        Storage::Cpu(s) => slice(s, l),
        _ => candle_core::bail!("CPU kernel: a tensor that is not on the CPU"),
    }
}

/// Rows per parallel task: enough work to amortise the split.
const MIN_ROWS: usize = 16;

fn geglu_forward<T: Real>(h: &[T], width: usize) -> Vec<T> {
    let inner = width / 2;
    let mut out = vec![T::from_f64(0.0); h.len() / 2];
    out.par_chunks_mut(inner)
        .zip(h.par_chunks(width))
        .with_min_len(MIN_ROWS)
        .for_each(|(o, row)| {
            let (a, gate) = row.split_at(inner);
            for ((o, &a), &g) in o.iter_mut().zip(a).zip(gate) {
                *o = a * (g * cdf(g));
            }
        });
    out
}

fn geglu_backward<T: Real>(h: &[T], g: &[T], width: usize) -> Vec<T> {
    let inner = width / 2;
    let mut dh = vec![T::from_f64(0.0); h.len()];
    dh.par_chunks_mut(width)
        .zip(h.par_chunks(width))
        .zip(g.par_chunks(inner))
        .with_min_len(MIN_ROWS)
        .for_each(|((d, row), g)| {
            let (a, gate) = row.split_at(inner);
            let (da, dgate) = d.split_at_mut(inner);
            for i in 0..inner {
                let (gelu, slope) = gelu_and_slope(gate[i]);
                da[i] = g[i] * gelu;
                dgate[i] = g[i] * a[i] * slope;
            }
        });
    dh
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "agfsync-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let width = dims.last().copied().unwrap_or(0);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last /= 2;
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(geglu_forward::<f32>(slice(s, l)?, width)),
            CpuStorage::F64(_) => CpuStorage::F64(geglu_forward::<f64>(slice(s, l)?, width)),
            _ => candle_core::bail!("geglu: f32 or f64 only"),
        };
        Ok((out, Shape::from(out_dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let h = h.detach().contiguous()?;
        let g = g.to_dtype(h.dtype())?.contiguous()?;
        let width = h.dim(candle_core::D::Minus1)?;
        let (hs, hl) = h.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let dh = match h.dtype() {
            DType::F32 => Tensor::from_vec(
                geglu_backward::<f32>(elements(&hs, hl)?, elements(&gs, gl)?, width),
                h.shape(),
                h.device(),
            )?,
            _ => Tensor::from_vec(
                geglu_backward::<f64>(elements(&hs, hl)?, elements(&gs, gl)?, width),
                h.shape(),
                h.device(),
            )?,
        };
        Ok(Some(dh))
    }
}

struct QuickGelu;

fn quick_gelu_t<T: Real>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    let (one, k) = (T::from_f64(1.0), T::from_f64(-1.702));
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x / (one + (k * x).exp());
            }
        });
    out
}

struct Softmax;

fn softmax_rows<T: Real>(x: &[T], width: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .with_min_len(MIN_ROWS)
        .for_each(|(o, row)| {
            // Separate passes, each a loop the compiler vectorises (a
            // running sum inside the exponential's loop would keep it
            // scalar: floating-point sums are not reassociated).
            let max = lanes(row, T::from_f64(f64::NEG_INFINITY), |m, v| {
                if v > m {
                    v
                } else {
                    m
                }
            });
            for (o, &v) in o.iter_mut().zip(row) {
                *o = (v - max).exp();
            }
            let inv = T::from_f64(1.0) / lanes(o, T::from_f64(0.0), |a, b| a + b);
            for o in o.iter_mut() {
                *o *= inv;
            }
        });
    out
}

/// Reduces `x` with `f` over eight interleaved lanes, then the lanes: a
/// shape the compiler turns into vector instructions.
#[inline(always)]
fn lanes<T: Real>(x: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut r = init;
    for &v in acc.iter().chain(chunks.remainder()) {
        r = f(r, v);
    }
    r
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "agfsync-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = l.dims().last().copied().unwrap_or(1).max(1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(softmax_rows::<f32>(slice(s, l)?, width)),
            CpuStorage::F64(_) => CpuStorage::F64(softmax_rows::<f64>(slice(s, l)?, width)),
            _ => candle_core::bail!("softmax: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "agfsync-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(quick_gelu_t::<f32>(slice(s, l)?)),
            CpuStorage::F64(_) => CpuStorage::F64(quick_gelu_t::<f64>(slice(s, l)?)),
            _ => candle_core::bail!("quick_gelu: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64, spread: f64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-spread..spread)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).expect("f64") - b.to_dtype(DType::F64).expect("f64"))
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("diff")
    }

    fn composed_geglu(h: &Tensor) -> Tensor {
        let inner = h.dim(D::Minus1).expect("dim") / 2;
        let a = h.narrow(D::Minus1, 0, inner).expect("a");
        let gate = h.narrow(D::Minus1, inner, inner).expect("gate");
        (a * gate.gelu_erf().expect("gelu")).expect("mul")
    }

    #[test]
    fn geglu_matches_the_composed_ops_and_their_gradient() {
        for shape in [[2usize, 5, 8], [1, 3, 2], [3, 1, 40]] {
            let h = Var::from_tensor(&randn(&shape, shape[2] as u64, 4.0)).expect("var");
            let ours = geglu(h.as_tensor()).expect("ours");
            let reference = composed_geglu(h.as_tensor());
            assert!(max_diff(&ours, &reference) < 1e-12, "{shape:?}");
            let r = randn(ours.dims(), 9, 1.0);
            let go = (ours * &r)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward());
            let ours = go.expect("ours");
            let ours = ours.get(h.as_tensor()).expect("grad");
            // The exact gradient, written out: candle's own backward of
            // gelu_erf rounds 1/sqrt(2 pi) to 0.398942 (7e-7 relative).
            let inner = shape[2] / 2;
            let a = h.as_tensor().narrow(D::Minus1, 0, inner).expect("a");
            let x = h.as_tensor().narrow(D::Minus1, inner, inner).expect("gate");
            let cdf = ((&x * SQRT_HALF).and_then(|t| t.erf()).expect("erf") + 1.0)
                .and_then(|t| t * 0.5)
                .expect("cdf");
            let pdf = ((x.sqr().expect("sqr") * -0.5)
                .and_then(|t| t.exp())
                .expect("exp")
                * INV_SQRT_2PI)
                .expect("pdf");
            let slope = (&cdf + (&x * pdf).expect("x pdf")).expect("slope");
            let da = (&r * (&x * &cdf).expect("gelu")).expect("da");
            let dgate = (&r * (a * slope).expect("a slope")).expect("dgate");
            let exact = Tensor::cat(&[da, dgate], D::Minus1).expect("cat");
            let d = max_diff(ours, &exact);
            assert!(d < 1e-12, "{shape:?}: gradient differs by {d}");
            let candles = (reference * &r)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("reference");
            let d = max_diff(ours, candles.get(h.as_tensor()).expect("grad"));
            assert!(d < 1e-5, "{shape:?}: far from candle's gradient ({d})");
            // f32 (the approximated erf) against f64.
            let h32 = h.as_tensor().detach().to_dtype(DType::F32).expect("f32");
            let y32 = geglu(&h32).expect("f32");
            assert!(
                max_diff(&y32, &composed_geglu(h.as_tensor())) < 1e-5,
                "{shape:?} f32"
            );
            assert!(!y32.track_op());
        }
        let odd = randn(&[2, 3], 1, 1.0);
        assert!(geglu(&odd).is_err());
    }

    #[test]
    fn exp_f32_is_within_a_few_ulps_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let (ours, exact) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(88.7).is_finite() && exp_f32(f32::INFINITY).is_finite());
    }

    #[test]
    fn softmax_matches_candles() {
        for dtype in [DType::F64, DType::F32] {
            // Large spreads (rows dominated by one entry) and a row of one.
            for shape in [[2usize, 3, 17], [4, 1, 1], [1, 5, 300]] {
                let x = randn(&shape, shape[2] as u64, 30.0)
                    .to_dtype(dtype)
                    .expect("dtype");
                let reference = candle_nn::ops::softmax_last_dim(&x).expect("candle");
                let tol = if dtype == DType::F64 { 1e-14 } else { 1e-6 };
                let d = max_diff(&softmax_last_dim(&x).expect("ours"), &reference);
                assert!(d < tol, "{dtype:?} {shape:?}: {d}");
            }
        }
    }

    #[test]
    fn quick_gelu_matches_its_formula() {
        for dtype in [DType::F64, DType::F32] {
            let x = randn(&[3, 7, 5], 4, 6.0).to_dtype(dtype).expect("dtype");
            let reference = (&x
                * candle_nn::ops::sigmoid(&(&x * 1.702).expect("scale")).expect("sigmoid"))
            .expect("mul");
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
            assert!(max_diff(&quick_gelu(&x).expect("ours"), &reference) < tol);
        }
    }
}
