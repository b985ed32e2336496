//! Gated and sigmoid-weighted activations on the CPU as single passes:
//! GEGLU (Shazeer, "GLU Variants Improve Transformer", 2020), the
//! feed-forward of every Stable Diffusion transformer block, with its own
//! backward; and CLIP's `quick_gelu`, `x * sigmoid(1.702 x)`.
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
//! 7.1.26 (absolute error below 1.5e-7, f32's own resolution near 1); in f64
//! it is libm's.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
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

/// `x * sigmoid(1.702 x)` without a graph (`x` must not record gradients).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&QuickGelu)
}

/// f32 and f64 with the functions the activations need.
trait Real: WithDType {
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
        f32::exp(self)
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

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("activation: a non-contiguous operand"),
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
        let (candle_core::Storage::Cpu(hs), candle_core::Storage::Cpu(gs)) = (&*hs, &*gs) else {
            candle_core::bail!("geglu: a tensor that is not on the CPU");
        };
        let dh = match hs {
            CpuStorage::F32(_) => Tensor::from_vec(
                geglu_backward::<f32>(slice(hs, hl)?, slice(gs, gl)?, width),
                h.shape(),
                h.device(),
            )?,
            _ => Tensor::from_vec(
                geglu_backward::<f64>(slice(hs, hl)?, slice(gs, gl)?, width),
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
