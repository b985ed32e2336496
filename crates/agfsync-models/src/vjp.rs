//! Matrix products, convolutions and attention with a hand-written backward
//! pass, for the differentiable (training) forward.
//!
//! candle's autograd has costs these ops remove:
//!
//! - it computes the gradient of *both* operands of a matrix product or a
//!   convolution, and keeps it until the backward pass ends, even when an
//!   operand records no gradient. In LoRA training every base weight of the
//!   UNet is frozen: the weight gradients are a third of the backward's
//!   arithmetic, wasted, and as much memory as the model itself.
//! - the input gradient of a convolution goes through its CPU transposed
//!   convolution, a direct loop of dot products, many times slower than the
//!   patches-and-matrix-product convolution candle uses forward.
//! - attention composed of candle ops keeps the `[bh, n, m]` scores, their
//!   softmax intermediates and the probabilities for the backward pass
//!   ([`attention`] recomputes them instead).
//!
//! Here the forward is computed without a graph, and the result is attached
//! to the graph by a custom op over `(x, w)` whose backward computes only the
//! gradients that are needed (`x.track_op()`, `w.track_op()`), the input
//! gradient of a convolution as an ordinary convolution of the zero-dilated
//! output gradient with the flipped kernel. The custom op's forward only
//! copies the precomputed result into the op's output.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

use crate::cpu_conv;

/// What the op computed, to derive its gradients.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `y = x w^T`, `x: [rows, in]`, `w: [out, in]`.
    Linear,
    /// `y = conv2d(x, w)`, no dilation, one group.
    Conv { padding: usize, stride: usize },
}

/// The custom op: the precomputed result, what it was, and which operands
/// need a gradient (recorded when built: `bwd` is handed the operands, and
/// computes only those gradients).
struct Attached {
    kind: Kind,
    out: Mutex<Option<Tensor>>,
    x: bool,
    w: bool,
}

/// The precomputed result, handed over once.
fn take(out: &Mutex<Option<Tensor>>) -> Result<Tensor> {
    out.lock()
        .map_err(|_| candle_core::Error::Msg("vjp: poisoned lock".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("vjp: forward run twice".into()))
}

/// The op output's storage: a copy of the precomputed result (made compact
/// by [`compact`], so the copy is exactly its elements).
fn cpu_copy(out: &Tensor) -> Result<(CpuStorage, Shape)> {
    let (storage, _) = out.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok((s.clone(), out.shape().clone())),
        _ => candle_core::bail!("vjp: result on another device than the inputs"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_copy(out: &Tensor) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
        _ => candle_core::bail!("vjp: result on another device than the inputs"),
    }
}

/// `out` laid out contiguously from offset 0 (the storage copy relies on it).
fn compact(out: Tensor) -> Result<Tensor> {
    if out.is_contiguous() && out.layout().start_offset() == 0 {
        Ok(out)
    } else {
        out.force_contiguous()
    }
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Linear => "agfsync-linear",
            Kind::Conv { .. } => "agfsync-conv2d",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&take(&self.out)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&take(&self.out)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w) = (x.detach(), w.detach());
        let g = g.contiguous()?;
        match self.kind {
            Kind::Linear => {
                let gx = self.x.then(|| g.matmul(&w)).transpose()?;
                let gw = self.w.then(|| g.t()?.matmul(&x)).transpose()?;
                Ok((gx, gw))
            }
            Kind::Conv { padding, stride } => {
                // On the CPU both as patches and products (cpu_conv);
                // elsewhere as convolutions.
                let cpu = cpu_conv::handles(&g);
                let gx = self
                    .x
                    .then(|| match cpu {
                        true => cpu_conv::conv2d_input_grad(&g, &w, x.dims4()?, padding, stride),
                        false => conv2d_input_grad(&g, &w, x.dims4()?, padding, stride),
                    })
                    .transpose()?;
                let gw = self
                    .w
                    .then(|| match cpu {
                        true => cpu_conv::conv2d_weight_grad(&g, &x, w.dims4()?, padding, stride),
                        false => conv2d_weight_grad(&g, &x, w.dims4()?, padding, stride),
                    })
                    .transpose()?;
                Ok((gx, gw))
            }
        }
    }
}

fn attach(x: &Tensor, w: &Tensor, out: Tensor, kind: Kind) -> Result<Tensor> {
    let (tx, tw) = (x.track_op(), w.track_op());
    if !tx && !tw {
        return Ok(out);
    }
    let out = compact(out)?;
    let op = Attached {
        kind,
        out: Mutex::new(Some(out)),
        x: tx,
        w: tw,
    };
    x.apply_op2_arc(w, Arc::new(Box::new(op)))
}

/// `x w^T` for `x: [rows, in]` and `w: [out, in]`, differentiable in both,
/// computing only the gradients of operands that track one.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let out = x.detach().matmul(&w.detach().t()?)?;
    attach(x, w, out, Kind::Linear)
}

/// `conv2d(x, w)` (no dilation, one group), differentiable in both
/// operands. On the CPU (f32, f64) forward and gradients are
/// [`cpu_conv`]'s; elsewhere the input gradient is itself a convolution
/// (kernels whose padding is at most their size minus one, as every UNet
/// convolution's is), not a transposed one.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let out = cpu_conv::conv2d(&x.detach(), &w.detach(), None, padding, stride)?;
    attach(x, w, out, Kind::Conv { padding, stride })
}

/// Whether [`conv2d`]'s backward handles this input, kernel and padding.
pub fn conv2d_supported(x: &Tensor, w: &Tensor, padding: usize) -> bool {
    cpu_conv::handles(x)
        || w.dims4()
            .is_ok_and(|(_, _, kh, kw)| padding < kh && padding < kw)
}

/// `dL/dx` of `y = conv2d(x, w, padding, stride)` given `g = dL/dy`:
/// `g` dilated by `stride - 1` zeros, padded by `k - 1 - padding` before and
/// up to the input size after, correlated with the kernel flipped in both
/// spatial axes and with in/out channels swapped.
fn conv2d_input_grad(
    g: &Tensor,
    w: &Tensor,
    x_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, o, oh, ow) = g.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, h, wd) = x_dims;
    let g = if stride > 1 {
        g.reshape((b, o, oh, 1, ow, 1))?
            .pad_with_zeros(3, 0, stride - 1)?
            .pad_with_zeros(5, 0, stride - 1)?
            .reshape((b, o, oh * stride, ow * stride))?
            .narrow(2, 0, (oh - 1) * stride + 1)?
            .narrow(3, 0, (ow - 1) * stride + 1)?
    } else {
        g.clone()
    };
    let (dh, dw) = ((oh - 1) * stride + 1, (ow - 1) * stride + 1);
    let before_h = kh - 1 - padding;
    let before_w = kw - 1 - padding;
    // Rows past the last output's window did not reach any output.
    let after_h = (h + padding).saturating_sub(dh);
    let after_w = (wd + padding).saturating_sub(dw);
    let g = g
        .pad_with_zeros(2, before_h, after_h)?
        .pad_with_zeros(3, before_w, after_w)?;
    let k = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    let gx = g.conv2d(&k, 0, 1, 1, 1)?;
    // The padded input may cover rows beyond the input (stride remainders).
    gx.narrow(2, 0, h)?.narrow(3, 0, wd)
}

/// `dL/dw` of `y = conv2d(x, w, padding, stride)` given `g = dL/dy`: the
/// correlation of the input with the output gradient, batch as the reduced
/// axis (channels of a convolution over `x` transposed).
fn conv2d_weight_grad(
    g: &Tensor,
    x: &Tensor,
    w_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w_dims;
    let gw = x
        .transpose(0, 1)?
        .contiguous()?
        .conv2d(&g.transpose(0, 1)?.contiguous()?, padding, 1, stride, 1)?
        .transpose(0, 1)?;
    gw.narrow(2, 0, kh)?.narrow(3, 0, kw)?.contiguous()
}

/// Elements of one chunk's score matrix in [`attention`]: bounds the
/// transient memory of the forward and of the recomputation in the backward
/// (64 MiB of f32 scores).
const ATTENTION_CHUNK: usize = 1 << 24;

/// Scaled dot-product attention, `softmax(q k^T * scale) v` over `[bh, n, d]`
/// (`k`, `v`: `[bh, m, d]`), differentiable without keeping the `[bh, n, m]`
/// probabilities: the forward runs in chunks of heads with no graph, and the
/// backward recomputes each chunk's probabilities from `q` and `k` (as
/// memory-efficient attention kernels do). The graph holds `q`, `k`, `v` and
/// the output only. Scores are taken in `q`'s dtype (f32 with `upcast`),
/// the softmax in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, upcast: bool) -> Result<Tensor> {
    attention_chunked(q, k, v, scale, upcast, ATTENTION_CHUNK)
}

fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
    chunk_elems: usize,
) -> Result<Tensor> {
    let (bh, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let chunk = (chunk_elems / (n * m).max(1)).clamp(1, bh.max(1));
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let mut outs = Vec::with_capacity(bh.div_ceil(chunk));
    let mut start = 0;
    while start < bh {
        let len = chunk.min(bh - start);
        let p = probabilities(
            &qd.narrow(0, start, len)?,
            &kd.narrow(0, start, len)?,
            scale,
            upcast,
        )?;
        outs.push(p.to_dtype(v.dtype())?.matmul(&vd.narrow(0, start, len)?)?);
        start += len;
    }
    let out = Tensor::cat(&outs, 0)?;
    let tracks = [q.track_op(), k.track_op(), v.track_op()];
    if !tracks.iter().any(|t| *t) {
        return Ok(out);
    }
    let op = Attention {
        out: Mutex::new(Some(compact(out)?)),
        scale,
        upcast,
        chunk,
        tracks,
    };
    q.apply_op3_arc(k, v, Arc::new(Box::new(op)))
}

/// f32 for half precision, else the dtype itself (f64 in gradient checks).
fn softmax_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// `softmax(q k^T * scale)` in f32 (f64 for f64), without a graph.
fn probabilities(q: &Tensor, k: &Tensor, scale: f64, upcast: bool) -> Result<Tensor> {
    let (q, k) = if upcast {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    // The scale on q (`[.., n, d]`), not on the `[.., n, m]` scores: one
    // pass over the small operand instead of the large product.
    let s = (&q * scale)?
        .matmul(&k.t()?)?
        .to_dtype(softmax_dtype(q.dtype()))?;
    crate::nn::fast_softmax(&s)
}

struct Attention {
    out: Mutex<Option<Tensor>>,
    scale: f64,
    upcast: bool,
    chunk: usize,
    tracks: [bool; 3],
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "agfsync-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&take(&self.out)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&take(&self.out)?)
    }

    /// Per chunk of heads, with `P` recomputed: `dV = P^T dO`,
    /// `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`, `dQ = dS K * scale`,
    /// `dK = dS^T Q * scale`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), res.detach());
        let g = g.contiguous()?;
        let bh = q.dim(0)?;
        let dtype = q.dtype();
        let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        while start < bh {
            let len = self.chunk.min(bh - start);
            let (qc, kc, vc) = (
                q.narrow(0, start, len)?,
                k.narrow(0, start, len)?,
                v.narrow(0, start, len)?,
            );
            let gc = g.narrow(0, start, len)?;
            let p = probabilities(&qc, &kc, self.scale, self.upcast)?;
            if self.tracks[2] {
                dv.push(p.to_dtype(dtype)?.t()?.matmul(&gc)?);
            }
            if self.tracks[0] || self.tracks[1] {
                let wide = p.dtype();
                let dp = gc.matmul(&vc.t()?)?.to_dtype(wide)?;
                let d = (gc.to_dtype(wide)? * o.narrow(0, start, len)?.to_dtype(wide)?)?
                    .sum_keepdim(2)?;
                // dS without the scale, applied to the small products.
                let ds = (p * dp.broadcast_sub(&d)?)?.to_dtype(dtype)?;
                if self.tracks[0] {
                    dq.push((ds.matmul(&kc)? * self.scale)?);
                }
                if self.tracks[1] {
                    dk.push((ds.t()?.matmul(&qc)? * self.scale)?);
                }
            }
            start += len;
        }
        let cat = |parts: Vec<Tensor>, on: bool| -> Result<Option<Tensor>> {
            if on {
                Tensor::cat(&parts, 0).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok((
            cat(dq, self.tracks[0])?,
            cat(dk, self.tracks[1])?,
            cat(dv, self.tracks[2])?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic values without a global RNG: a hashed counter.
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n as u64)
            .map(|i| {
                let z = (i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed)
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9);
                ((z >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("diff")
    }

    /// Gradients of `sum(y * r)` through our op and through a convolution
    /// written as patches and a matrix product agree, for both operands, at every shape the UNet uses
    /// (3x3 and 1x1, stride 1 and 2) and at odd, non-square sizes.
    #[test]
    fn conv_gradients_match_candles() {
        for (h, wd, k, pad, stride) in [
            (8, 8, 3, 1, 1),
            (7, 5, 3, 1, 1),
            (8, 8, 3, 1, 2),
            (9, 8, 3, 1, 2),
            (7, 7, 3, 1, 2),
            (6, 5, 1, 0, 1),
            (6, 6, 3, 0, 1),
        ] {
            let x = Var::from_tensor(&randn(&[2, 3, h, wd], 1)).expect("var");
            let w = Var::from_tensor(&randn(&[4, 3, k, k], 2)).expect("var");
            let ours = conv2d(x.as_tensor(), w.as_tensor(), pad, stride).expect("ours");
            // Patches and a matrix product: candle's backward of its own
            // strided convolution fails on 9x8 (see `nn::conv2d`).
            let reference = crate::nn::conv2d_unfolded(x.as_tensor(), w.as_tensor(), pad, stride)
                .expect("unfolded");
            assert!(max_diff(&ours, &reference) < 1e-12);
            let r = randn(reference.dims(), 3);
            let g_ours = (ours * &r).and_then(|t| t.sum_all()).expect("loss");
            let g_ref = (reference * &r).and_then(|t| t.sum_all()).expect("loss");
            let go = g_ours.backward().expect("backward");
            let gr = g_ref.backward().expect("backward");
            for v in [&x, &w] {
                let a = go.get(v.as_tensor()).expect("grad");
                let b = gr.get(v.as_tensor()).expect("grad");
                assert_eq!(a.dims(), b.dims());
                let d = max_diff(a, b);
                assert!(d < 1e-10, "{h}x{wd} k{k} p{pad} s{stride}: {d}");
            }
            // The gradients as convolutions (the path of other devices)
            // agree with the CPU's patches and products.
            let gx = conv2d_input_grad(&r, w.as_tensor(), (2, 3, h, wd), pad, stride)
                .expect("input grad");
            let gw = conv2d_weight_grad(&r, x.as_tensor(), (4, 3, k, k), pad, stride)
                .expect("weight grad");
            let d = max_diff(&gx, go.get(x.as_tensor()).expect("grad"));
            assert!(
                d < 1e-10,
                "{h}x{wd} k{k} p{pad} s{stride} as convolution: {d}"
            );
            let d = max_diff(&gw, go.get(w.as_tensor()).expect("grad"));
            assert!(
                d < 1e-10,
                "{h}x{wd} k{k} p{pad} s{stride} as convolution: {d}"
            );
        }
    }

    /// A frozen operand gets no gradient computed or stored; the other
    /// operand's gradient is unchanged.
    #[test]
    fn frozen_weights_get_no_gradient() {
        let x = Var::from_tensor(&randn(&[5, 6], 4)).expect("var");
        let w = randn(&[3, 6], 5);
        let y = linear(x.as_tensor(), &w).expect("linear");
        let expected = x.as_tensor().matmul(&w.t().expect("t")).expect("mm");
        assert!(max_diff(&y, &expected) < 1e-12);
        let grads = y.sum_all().and_then(|l| l.backward()).expect("backward");
        assert!(grads.get(&w).is_none());
        let gx = grads.get(x.as_tensor()).expect("x grad");
        let ones = Tensor::ones((5, 3), DType::F64, &Device::Cpu).expect("ones");
        assert!(max_diff(gx, &ones.matmul(&w).expect("mm")) < 1e-12);
        let wc = randn(&[4, 2, 3, 3], 6);
        let xc = Var::from_tensor(&randn(&[1, 2, 5, 5], 7)).expect("var");
        let y = conv2d(xc.as_tensor(), &wc, 1, 1).expect("conv");
        let grads = y.sum_all().and_then(|l| l.backward()).expect("backward");
        assert!(grads.get(&wc).is_none());
        assert!(grads.get(xc.as_tensor()).is_some());
    }

    /// Attention through our op, in one chunk and in several, gives the
    /// composed (differentiable) attention's output and gradients.
    #[test]
    fn attention_matches_the_composed_attention() {
        for upcast in [false, true] {
            for chunk in [1 << 20, 35, 1] {
                let q = Var::from_tensor(&randn(&[3, 5, 4], 10)).expect("var");
                let k = Var::from_tensor(&randn(&[3, 7, 4], 11)).expect("var");
                let v = Var::from_tensor(&randn(&[3, 7, 4], 12)).expect("var");
                let ours = attention_chunked(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    0.5,
                    upcast,
                    chunk,
                )
                .expect("ours");
                let reference = crate::nn::attention_composed(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    0.5,
                    None,
                    upcast,
                    crate::nn::Pass::TRAIN,
                )
                .expect("reference");
                let d = max_diff(&ours, &reference);
                // With `upcast` the softmax runs in f32, ours with the
                // vectorised exponential (cpu_act), candle's with libm's.
                let tol = if upcast { 1e-6 } else { 1e-12 };
                assert!(d < tol, "upcast {upcast} chunk {chunk}: {d}");
                let r = randn(&[3, 5, 4], 13);
                let go = (ours * &r)
                    .and_then(|t| t.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                let gr = (reference * &r)
                    .and_then(|t| t.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                for t in [&q, &k, &v] {
                    let d = max_diff(
                        go.get(t.as_tensor()).expect("grad"),
                        gr.get(t.as_tensor()).expect("grad"),
                    );
                    // `upcast` rounds q and k to f32 in both, at different
                    // points of the backward.
                    let tol = if upcast { 1e-6 } else { 1e-10 };
                    assert!(d < tol, "chunk {chunk} upcast {upcast}: {d}");
                }
            }
        }
    }

    /// Without any operand tracking a gradient no graph is built.
    #[test]
    fn untracked_operands_build_no_graph() {
        let y = linear(&randn(&[2, 3], 8), &randn(&[4, 3], 9)).expect("linear");
        assert!(!y.track_op());
    }
}
