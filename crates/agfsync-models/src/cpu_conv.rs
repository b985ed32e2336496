//! 2-D convolutions on the CPU, forward and both gradients, as patch
//! matrices and one matrix product per tile of output pixels written
//! straight into NCHW tensors (the classic im2col/col2im formulation,
//! Chellapilla et al., "High Performance Convolutional Neural Networks for
//! Document Processing", 2006).
//!
//! Why not candle's CPU convolution (0.11): on every call it reorders the
//! whole kernel into `[out, kh, kw, in]` and the input into NHWC (serial,
//! strided gathers), fills its patch tiles one element at a time, multiplies
//! 512 output pixels at a time and copies the product back element by
//! element; a profile of the SD 1.5 UNet step put 35% of the time in that
//! overhead against 20% in its matrix products. Here the patch rows follow
//! the kernel's own `[out, in * kh * kw]` order, so the kernel is multiplied
//! as stored; each patch row is filled with whole-row copies of the input
//! (stride 1); `gemm` writes the product into the output, on top of the
//! bias when there is one, so the bias costs no extra pass; pointwise (1x1)
//! convolutions multiply the input itself. The same patches give the kernel
//! gradient (`dW += g · patchesᵀ`, one product per tile), and the input
//! gradient is its transpose (`patches = Wᵀ · g`, scattered back with adds),
//! with no zero-dilated or padded copy of the output gradient.
//!
//! f32 and f64 CPU tensors go through this module; every other device and
//! dtype uses candle's convolution ([`conv2d`] falls back by itself,
//! [`handles`] tells callers of the gradients).

use std::cell::RefCell;
use std::thread::LocalKey;

use candle_core::{DType, Result, Tensor, WithDType};

use crate::cpu_act::elements;
use gemm::Parallelism;
use rayon::prelude::*;

/// Elements of one tile's patch matrix (`in * kh * kw` rows by the tile's
/// output pixels): 16 MiB of f32. Bounds the transient memory of a
/// convolution over a large image (a VAE decoder layer at 512x512 would
/// need over a gigabyte of patches at once) while keeping every matrix
/// product wide (an SD 1.5 UNet layer at 64x64 latents runs in 2 to 4 tiles).
const PATCH_ELEMS: usize = 1 << 22;

/// Fewest output pixels per tile, whatever the patch size: narrower
/// products waste the matrix kernel.
const MIN_TILE: usize = 64;

/// Whether this module computes convolutions of `t` (an f32 or f64 CPU
/// tensor); others go through candle.
pub fn handles(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// `conv2d(x, w) + bias` with no graph (no dilation, one group): `x` is
/// `[b, in, h, w]`, `w` `[out, in, kh, kw]`, `bias` `[out]`. On the CPU in f32
/// and f64 this module's convolution, elsewhere candle's.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if !handles(x) || w.dtype() != x.dtype() || !w.device().is_cpu() {
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let geo = Geometry::new(x.dims4()?, w.dims4()?, padding, stride)?;
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let bias = bias
        .map(|b| b.to_dtype(x.dtype())?.contiguous())
        .transpose()?;
    if let Some(b) = &bias {
        if b.elem_count() != geo.o {
            candle_core::bail!(
                "conv2d: a bias of {} values for {} output channels",
                b.elem_count(),
                geo.o
            );
        }
    }
    let out = match x.dtype() {
        DType::F32 => Tensor::from_vec(
            forward_t::<f32>(&x, &w, bias.as_ref(), &geo)?,
            geo.out_dims(),
            x.device(),
        )?,
        _ => Tensor::from_vec(
            forward_t::<f64>(&x, &w, bias.as_ref(), &geo)?,
            geo.out_dims(),
            x.device(),
        )?,
    };
    Ok(out)
}

/// `dL/dx` of `y = conv2d(x, w, padding, stride)` given `g = dL/dy`, for
/// [`handles`] tensors: `Wᵀ · g` as patches, added back into the input's
/// positions.
pub fn conv2d_input_grad(
    g: &Tensor,
    w: &Tensor,
    x_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let geo = Geometry::new(x_dims, w.dims4()?, padding, stride)?;
    geo.check_out(g)?;
    let g = g.to_dtype(w.dtype())?.contiguous()?;
    let w = w.contiguous()?;
    let dims = (geo.b, geo.c, geo.h, geo.w);
    match w.dtype() {
        DType::F32 => Tensor::from_vec(input_grad_t::<f32>(&g, &w, &geo)?, dims, w.device()),
        DType::F64 => Tensor::from_vec(input_grad_t::<f64>(&g, &w, &geo)?, dims, w.device()),
        d => candle_core::bail!("cpu_conv: no {d:?} convolution"),
    }
}

/// `dL/dw` of `y = conv2d(x, w, padding, stride)` given `g = dL/dy`, for
/// [`handles`] tensors: `g · patchesᵀ` summed over the batch.
pub fn conv2d_weight_grad(
    g: &Tensor,
    x: &Tensor,
    w_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let geo = Geometry::new(x.dims4()?, w_dims, padding, stride)?;
    geo.check_out(g)?;
    let g = g.to_dtype(x.dtype())?.contiguous()?;
    let x = x.contiguous()?;
    match x.dtype() {
        DType::F32 => Tensor::from_vec(weight_grad_t::<f32>(&g, &x, &geo)?, w_dims, x.device()),
        DType::F64 => Tensor::from_vec(weight_grad_t::<f64>(&g, &x, &geo)?, w_dims, x.device()),
        d => candle_core::bail!("cpu_conv: no {d:?} convolution"),
    }
}

/// Shapes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    padding: usize,
    stride: usize,
    /// Output pixels per tile (the patch matrix's width).
    tile: usize,
}

impl Geometry {
    fn new(
        (b, c, h, w): (usize, usize, usize, usize),
        (o, c2, kh, kw): (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        if c != c2 {
            candle_core::bail!("conv2d: input has {c} channels, the kernel expects {c2}");
        }
        if stride == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: zero stride or empty kernel");
        }
        let span = |n: usize, k: usize| (n + 2 * padding).checked_sub(k).map(|r| r / stride + 1);
        let (Some(oh), Some(ow)) = (span(h, kh), span(w, kw)) else {
            candle_core::bail!(
                "conv2d: a {kh}x{kw} kernel does not fit a {h}x{w} input padded by {padding}"
            );
        };
        let mut geo = Self {
            b,
            c,
            h,
            w,
            o,
            kh,
            kw,
            oh,
            ow,
            padding,
            stride,
            tile: 0,
        };
        geo.tile = geo.tile_for(PATCH_ELEMS);
        Ok(geo)
    }

    /// Output pixels per tile when a patch matrix may hold `cap` elements.
    fn tile_for(&self, cap: usize) -> usize {
        let n = self.pixels();
        (cap / self.k().max(1)).max(MIN_TILE).min(n).max(1)
    }

    /// Rows of the patch matrix: `in * kh * kw`.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels per sample.
    fn pixels(&self) -> usize {
        self.oh * self.ow
    }

    /// A 1x1 kernel at stride 1 without padding: the input is its own
    /// patch matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    fn out_dims(&self) -> (usize, usize, usize, usize) {
        (self.b, self.o, self.oh, self.ow)
    }

    fn check_out(&self, g: &Tensor) -> Result<()> {
        if g.dims4()? != self.out_dims() {
            candle_core::bail!(
                "conv2d gradient: output gradient {:?}, expected {:?}",
                g.dims(),
                self.out_dims()
            );
        }
        Ok(())
    }
}

/// The element types computed here, with a reusable patch buffer per thread
/// (a fresh allocation per call would page-fault its way through tens of
/// megabytes on every layer).
trait Elem: WithDType + Default {
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>>;
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

impl Elem for f32 {
    fn scratch() -> &'static LocalKey<RefCell<Vec<f32>>> {
        &SCRATCH_F32
    }
}

impl Elem for f64 {
    fn scratch() -> &'static LocalKey<RefCell<Vec<f64>>> {
        &SCRATCH_F64
    }
}

/// Runs `f` on a buffer of `len` elements: this thread's patch buffer, or a
/// fresh one when it is in use further up the stack (a rayon task stolen
/// while this thread waits inside a convolution).
fn with_scratch<T: Elem, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    T::scratch().with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A matrix operand: base pointer, column stride, row stride (elements).
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    cs: isize,
    rs: isize,
}

/// `dst[m, n] = (accumulate ? dst : 0) + lhs[m, k] · rhs[k, n]`.
///
/// # Safety
/// Every operand must address `m x k`, `k x n` and `m x n` elements
/// within its allocation at the given strides, and `dst` must not alias
/// `lhs` or `rhs`.
#[allow(unsafe_code)]
unsafe fn matmul<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: isize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
    // SAFETY: the caller's contract; gemm reads `dst` only when told to.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            if accumulate { one } else { zero },
            one,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// The runs of one patch row within a tile: for output pixels
/// `n0 .. n0 + len` (row-major over the output), the stretches that share an
/// output row, as `(offset in the tile, output row, first output column,
/// count)`.
fn row_runs(
    geo: &Geometry,
    n0: usize,
    len: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let ow = geo.ow;
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let p = n0 + done;
        let (oy, ox) = (p / ow, p % ow);
        let count = (ow - ox).min(len - done);
        let run = (done, oy, ox, count);
        done += count;
        Some(run)
    })
}

/// For kernel offset `kx`, the output columns `[lo, hi)` of `ox .. ox +
/// count` whose input column `ox * stride + kx - padding` lies inside the
/// input, for stride 1 (the input columns are then `lo + shift ..`).
fn inside(geo: &Geometry, kx: usize, ox: usize, count: usize) -> (usize, usize, isize) {
    let shift = kx as isize - geo.padding as isize;
    let (a, b) = (ox as isize, (ox + count) as isize);
    let lo = (-shift).clamp(a, b);
    let hi = (geo.w as isize - shift).clamp(lo, b);
    (lo as usize, hi as usize, shift)
}

/// Fills `cols` (`[in * kh * kw, len]`) with the patches of output pixels
/// `n0 .. n0 + len` of one sample `x` (`[in, h, w]`); padding reads as zero.
fn patches<T: Elem>(x: &[T], geo: &Geometry, n0: usize, len: usize, cols: &mut [T]) {
    let zero = T::from_f64(0.0);
    let (kh, kw) = (geo.kh, geo.kw);
    cols.par_chunks_mut(len)
        .with_min_len(8)
        .enumerate()
        .for_each(|(r, row)| {
            let (ci, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
            let plane = &x[ci * geo.h * geo.w..(ci + 1) * geo.h * geo.w];
            for (off, oy, ox, count) in row_runs(geo, n0, len) {
                let seg = &mut row[off..off + count];
                let iy = (oy * geo.stride + ky) as isize - geo.padding as isize;
                if iy < 0 || iy >= geo.h as isize {
                    seg.fill(zero);
                    continue;
                }
                let src = &plane[iy as usize * geo.w..(iy as usize + 1) * geo.w];
                if geo.stride == 1 {
                    let (lo, hi, shift) = inside(geo, kx, ox, count);
                    seg[..lo - ox].fill(zero);
                    seg[lo - ox..hi - ox].copy_from_slice(
                        &src[(lo as isize + shift) as usize..(hi as isize + shift) as usize],
                    );
                    seg[hi - ox..].fill(zero);
                } else {
                    for (j, v) in seg.iter_mut().enumerate() {
                        let ix = ((ox + j) * geo.stride + kx) as isize - geo.padding as isize;
                        *v = if ix >= 0 && ix < geo.w as isize {
                            src[ix as usize]
                        } else {
                            zero
                        };
                    }
                }
            }
        });
}

/// Adds the patch matrix `cols` (`[in * kh * kw, len]`, output pixels `n0 ..
/// n0 + len`) back into the input positions they were taken from, in
/// `dx` (`[in, h, w]`, one sample): the transpose of [`patches`]. Channels
/// run in parallel (each owns its plane).
fn add_patches<T: Elem>(cols: &[T], geo: &Geometry, n0: usize, len: usize, dx: &mut [T]) {
    let (kh, kw) = (geo.kh, geo.kw);
    dx.par_chunks_mut(geo.h * geo.w)
        .enumerate()
        .for_each(|(ci, plane)| {
            for ky in 0..kh {
                for kx in 0..kw {
                    let r = (ci * kh + ky) * kw + kx;
                    let row = &cols[r * len..(r + 1) * len];
                    for (off, oy, ox, count) in row_runs(geo, n0, len) {
                        let seg = &row[off..off + count];
                        let iy = (oy * geo.stride + ky) as isize - geo.padding as isize;
                        if iy < 0 || iy >= geo.h as isize {
                            continue;
                        }
                        let dst = &mut plane[iy as usize * geo.w..(iy as usize + 1) * geo.w];
                        if geo.stride == 1 {
                            let (lo, hi, shift) = inside(geo, kx, ox, count);
                            let d = &mut dst
                                [(lo as isize + shift) as usize..(hi as isize + shift) as usize];
                            for (d, s) in d.iter_mut().zip(&seg[lo - ox..hi - ox]) {
                                *d += *s;
                            }
                        } else {
                            for (j, s) in seg.iter().enumerate() {
                                let ix =
                                    ((ox + j) * geo.stride + kx) as isize - geo.padding as isize;
                                if ix >= 0 && ix < geo.w as isize {
                                    dst[ix as usize] += *s;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// The tiles of one sample's output pixels: `(n0, len)`.
fn tiles(geo: &Geometry) -> impl Iterator<Item = (usize, usize)> + '_ {
    let n = geo.pixels();
    (0..n)
        .step_by(geo.tile)
        .map(move |n0| (n0, geo.tile.min(n - n0)))
}

#[allow(unsafe_code)]
fn forward_t<T: Elem>(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geo: &Geometry,
) -> Result<Vec<T>> {
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let x = elements::<T>(&xs, xl)?;
    let w = elements::<T>(&ws, wl)?;
    let (k, n, o) = (geo.k(), geo.pixels(), geo.o);
    let plane = geo.c * geo.h * geo.w;
    let mut out: Vec<T> = match bias {
        Some(b) => {
            let (bs, bl) = b.storage_and_layout();
            let b = elements::<T>(&bs, bl)?;
            let mut out = Vec::with_capacity(geo.b * o * n);
            for _ in 0..geo.b {
                for &v in b {
                    out.extend(std::iter::repeat_n(v, n));
                }
            }
            out
        }
        None => vec![T::from_f64(0.0); geo.b * o * n],
    };
    let accumulate = bias.is_some();
    let lhs = Mat {
        ptr: w.as_ptr(),
        cs: 1,
        rs: k as isize,
    };
    for (bi, ob) in out.chunks_mut(o * n).enumerate() {
        let xb = &x[bi * plane..(bi + 1) * plane];
        if geo.pointwise() {
            let rhs = Mat {
                ptr: xb.as_ptr(),
                cs: 1,
                rs: n as isize,
            };
            // SAFETY: w is [o, k], xb is [k, n] (k = in for a 1x1 kernel), ob is [o, n].
            unsafe { matmul((o, n, k), ob.as_mut_ptr(), n as isize, accumulate, lhs, rhs) };
            continue;
        }
        with_scratch::<T, _>(k * geo.tile, |buf| {
            for (n0, len) in tiles(geo) {
                let cols = &mut buf[..k * len];
                patches(xb, geo, n0, len, cols);
                let rhs = Mat {
                    ptr: cols.as_ptr(),
                    cs: 1,
                    rs: len as isize,
                };
                // SAFETY: cols is [k, len]; the destination is columns
                // n0 .. n0 + len of ob ([o, n], row stride n).
                unsafe {
                    matmul(
                        (o, len, k),
                        ob.as_mut_ptr().add(n0),
                        n as isize,
                        accumulate,
                        lhs,
                        rhs,
                    )
                };
            }
        });
    }
    Ok(out)
}

#[allow(unsafe_code)]
fn input_grad_t<T: Elem>(g: &Tensor, w: &Tensor, geo: &Geometry) -> Result<Vec<T>> {
    let (gs, gl) = g.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let g = elements::<T>(&gs, gl)?;
    let w = elements::<T>(&ws, wl)?;
    let (k, n, o) = (geo.k(), geo.pixels(), geo.o);
    let plane = geo.c * geo.h * geo.w;
    let mut dx = vec![T::from_f64(0.0); geo.b * plane];
    // Wᵀ: element (row r, column oi) is w[oi * k + r].
    let lhs = Mat {
        ptr: w.as_ptr(),
        cs: k as isize,
        rs: 1,
    };
    for (bi, dxb) in dx.chunks_mut(plane).enumerate() {
        let gb = &g[bi * o * n..(bi + 1) * o * n];
        if geo.pointwise() {
            let rhs = Mat {
                ptr: gb.as_ptr(),
                cs: 1,
                rs: n as isize,
            };
            // SAFETY: Wᵀ is [k, o], gb is [o, n], dxb is [k, n] (k = in).
            unsafe { matmul((k, n, o), dxb.as_mut_ptr(), n as isize, false, lhs, rhs) };
            continue;
        }
        with_scratch::<T, _>(k * geo.tile, |buf| {
            for (n0, len) in tiles(geo) {
                let cols = &mut buf[..k * len];
                let rhs = Mat {
                    // n0 < n: the offset stays within gb.
                    ptr: gb[n0..].as_ptr(),
                    cs: 1,
                    rs: n as isize,
                };
                // SAFETY: Wᵀ is [k, o]; rhs is columns n0 .. n0 + len of gb
                // ([o, n], row stride n); cols is [k, len].
                unsafe {
                    matmul(
                        (k, len, o),
                        cols.as_mut_ptr(),
                        len as isize,
                        false,
                        lhs,
                        rhs,
                    )
                };
                add_patches(cols, geo, n0, len, dxb);
            }
        });
    }
    Ok(dx)
}

#[allow(unsafe_code)]
fn weight_grad_t<T: Elem>(g: &Tensor, x: &Tensor, geo: &Geometry) -> Result<Vec<T>> {
    let (gs, gl) = g.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let g = elements::<T>(&gs, gl)?;
    let x = elements::<T>(&xs, xl)?;
    let (k, n, o) = (geo.k(), geo.pixels(), geo.o);
    let plane = geo.c * geo.h * geo.w;
    let mut dw = vec![T::from_f64(0.0); o * k];
    let mut accumulate = false;
    for bi in 0..geo.b {
        let gb = &g[bi * o * n..(bi + 1) * o * n];
        let xb = &x[bi * plane..(bi + 1) * plane];
        if geo.pointwise() {
            let lhs = Mat {
                ptr: gb.as_ptr(),
                cs: 1,
                rs: n as isize,
            };
            // xbᵀ: element (pixel p, channel c) is xb[c * n + p].
            let rhs = Mat {
                ptr: xb.as_ptr(),
                cs: n as isize,
                rs: 1,
            };
            // SAFETY: gb is [o, n], xbᵀ is [n, k], dw is [o, k].
            unsafe { matmul((o, k, n), dw.as_mut_ptr(), k as isize, accumulate, lhs, rhs) };
            accumulate = true;
            continue;
        }
        with_scratch::<T, _>(k * geo.tile, |buf| {
            for (n0, len) in tiles(geo) {
                let cols = &mut buf[..k * len];
                patches(xb, geo, n0, len, cols);
                let lhs = Mat {
                    ptr: gb[n0..].as_ptr(),
                    cs: 1,
                    rs: n as isize,
                };
                // colsᵀ: element (pixel j, row r) is cols[r * len + j].
                let rhs = Mat {
                    ptr: cols.as_ptr(),
                    cs: len as isize,
                    rs: 1,
                };
                // SAFETY: lhs is columns n0 .. n0 + len of gb ([o, n]),
                // colsᵀ is [len, k], dw is [o, k].
                unsafe {
                    matmul(
                        (o, k, len),
                        dw.as_mut_ptr(),
                        k as isize,
                        accumulate,
                        lhs,
                        rhs,
                    )
                };
                accumulate = true;
            }
        });
    }
    Ok(dw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_dtype(DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("diff")
    }

    /// `(x shape, kernel shape, padding, stride)`: every UNet and VAE kernel
    /// shape, odd and non-square sizes, stride-2 remainders that differ in
    /// height and width, a kernel as large as the padded input, a batch of 3.
    const CASES: &[([usize; 4], [usize; 4], usize, usize)] = &[
        ([2, 3, 8, 8], [5, 3, 3, 3], 1, 1),
        ([3, 4, 9, 7], [6, 4, 3, 3], 1, 1),
        ([2, 4, 9, 8], [4, 4, 3, 3], 1, 2),
        ([1, 4, 8, 8], [4, 4, 3, 3], 0, 2),
        ([2, 6, 5, 7], [3, 6, 1, 1], 0, 1),
        ([2, 3, 6, 6], [2, 3, 1, 1], 0, 2),
        ([1, 2, 4, 5], [3, 2, 3, 3], 2, 1),
        ([1, 2, 3, 3], [2, 2, 5, 5], 1, 1),
        ([2, 5, 7, 6], [4, 5, 2, 3], 1, 3),
    ];

    #[test]
    fn forward_matches_candle_with_and_without_bias() -> Result<()> {
        for (i, &(xs, ws, pad, stride)) in CASES.iter().enumerate() {
            for dtype in [DType::F64, DType::F32] {
                let x = randn(&xs, 1 + i as u64, dtype);
                let w = randn(&ws, 100 + i as u64, dtype);
                let b = randn(&[ws[0]], 200 + i as u64, dtype);
                let reference = x.conv2d(&w, pad, stride, 1, 1)?;
                let ours = conv2d(&x, &w, None, pad, stride)?;
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
                assert_eq!(ours.dims(), reference.dims(), "case {i}");
                assert!(max_diff(&ours, &reference) < tol, "case {i} {dtype:?}");
                let with_bias = conv2d(&x, &w, Some(&b), pad, stride)?;
                let reference = reference.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
                assert!(
                    max_diff(&with_bias, &reference) < tol,
                    "case {i} {dtype:?} bias"
                );
            }
        }
        Ok(())
    }

    /// Gradients of `sum(conv(x, w) * r)` against candle's autograd through
    /// the patches-and-product convolution.
    #[test]
    fn gradients_match_candles_autograd() -> Result<()> {
        for (i, &(xs, ws, pad, stride)) in CASES.iter().enumerate() {
            let x = Var::from_tensor(&randn(&xs, 10 + i as u64, DType::F64))?;
            let w = Var::from_tensor(&randn(&ws, 110 + i as u64, DType::F64))?;
            let y = crate::nn::conv2d_unfolded(x.as_tensor(), w.as_tensor(), pad, stride)?;
            let r = randn(y.dims(), 210 + i as u64, DType::F64);
            let grads = (&y * &r)?.sum_all()?.backward()?;
            let (gx, gw) = (
                grads.get(x.as_tensor()).expect("dx"),
                grads.get(w.as_tensor()).expect("dw"),
            );
            let dims = x.as_tensor().dims4()?;
            let ours_x = conv2d_input_grad(&r, w.as_tensor(), dims, pad, stride)?;
            let ours_w =
                conv2d_weight_grad(&r, x.as_tensor(), w.as_tensor().dims4()?, pad, stride)?;
            assert!(max_diff(&ours_x, gx) < 1e-10, "case {i} dx");
            assert!(max_diff(&ours_w, gw) < 1e-10, "case {i} dw");
        }
        Ok(())
    }

    /// Several tiles per sample (the patch buffer capped far below the
    /// image) give the same numbers as one.
    #[test]
    fn tiling_changes_nothing() -> Result<()> {
        let x = randn(&[2, 3, 13, 11], 5, DType::F64);
        let w = randn(&[4, 3, 3, 3], 6, DType::F64);
        let r = randn(&[2, 4, 13, 11], 7, DType::F64);
        let mut geo = Geometry::new(x.dims4()?, w.dims4()?, 1, 1)?;
        assert_eq!(geo.tile, 143, "one tile by default");
        let one = forward_t::<f64>(&x, &w, None, &geo)?;
        let dx_one = input_grad_t::<f64>(&r, &w, &geo)?;
        let dw_one = weight_grad_t::<f64>(&r, &x, &geo)?;
        // 27-row patches, 64-pixel tiles (the minimum): 3 tiles, the last
        // of 15 pixels, starting mid-row.
        geo.tile = geo.tile_for(27 * 10);
        assert_eq!(geo.tile, MIN_TILE);
        let many = forward_t::<f64>(&x, &w, None, &geo)?;
        let dx_many = input_grad_t::<f64>(&r, &w, &geo)?;
        let dw_many = weight_grad_t::<f64>(&r, &x, &geo)?;
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-12);
        assert!(close(&one, &many) && close(&dx_one, &dx_many) && close(&dw_one, &dw_many));
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors_not_panics() {
        let x = randn(&[1, 3, 4, 4], 1, DType::F32);
        let w = randn(&[2, 4, 3, 3], 2, DType::F32);
        assert!(conv2d(&x, &w, None, 1, 1).is_err());
        let w = randn(&[2, 3, 7, 7], 2, DType::F32);
        assert!(conv2d(&x, &w, None, 1, 1).is_err());
        let w = randn(&[2, 3, 3, 3], 2, DType::F32);
        let b = randn(&[3], 3, DType::F32);
        assert!(conv2d(&x, &w, Some(&b), 1, 1).is_err());
    }
}
