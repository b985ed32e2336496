//! Group normalisation (Wu and He, "Group Normalization", ECCV 2018) on the
//! CPU as one fused kernel, optionally followed by SiLU, with its own
//! backward pass.
//!
//! Composed of candle ops, a group norm is eight passes over the
//! activations, each allocating its result (mean, centring, square, sum,
//! division, scale, shift, then the activation), and on a training pass the
//! graph keeps every intermediate for the backward. Here the statistics take
//! one pass (sums in f64) and the output one more, with the affine transform
//! folded into one multiply-add per element and SiLU applied in place; the
//! backward recomputes the statistics from the input and needs two passes.
//! Nothing but the input is kept for it. ResNet blocks always follow their
//! norms with SiLU, so the pair is one op.
//!
//! Layer normalisation (Ba et al., 2016) on training passes is the same
//! kernel over rows ([`layer_norm`]): composed, it is as many passes as the
//! group norm, and candle's fused layer norm records no gradient.
//!
//! f32 and f64 CPU tensors only ([`handles`]); other devices and dtypes use
//! the composed ops in [`crate::nn::GroupNorm`] and [`crate::nn::LayerNorm`].

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_act::{elements, slice, Real};

/// Whether [`group_norm`] computes on `x` (an f32 or f64 CPU tensor).
pub fn handles(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() >= 2
}

/// `silu?(group_norm(x) * weight + bias)` over `x: [b, c, ...]` with
/// `groups` groups (PyTorch's biased variance, `eps` inside the root).
/// With `differentiable` the result records gradients for all three
/// operands; otherwise no graph is built. Only for [`handles`] inputs.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
    differentiable: bool,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    if groups == 0 || c % groups != 0 || weight.elem_count() != c || bias.elem_count() != c {
        candle_core::bail!(
            "group_norm: {c} channels, {groups} groups, {} weights, {} biases",
            weight.elem_count(),
            bias.elem_count()
        );
    }
    let x = x.contiguous()?;
    let weight = weight.to_dtype(x.dtype())?.contiguous()?;
    let bias = bias.to_dtype(x.dtype())?.contiguous()?;
    let op = GroupNormOp { groups, eps, silu };
    if differentiable {
        x.apply_op3_arc(&weight, &bias, std::sync::Arc::new(Box::new(op)))
    } else {
        x.apply_op3_no_bwd(&weight, &bias, &op)
    }
}

/// `layer_norm(x) * weight + bias` over the last dimension of `x`
/// (biased variance, `eps` inside the root), recording gradients for all
/// three operands. Only for [`handles`] inputs.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.elem_count() != d || bias.elem_count() != d {
        candle_core::bail!(
            "layer_norm: width {d}, {} weights, {} biases",
            weight.elem_count(),
            bias.elem_count()
        );
    }
    let x = x.contiguous()?;
    let weight = weight.to_dtype(x.dtype())?.contiguous()?;
    let bias = bias.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3_arc(
        &weight,
        &bias,
        std::sync::Arc::new(Box::new(LayerNormOp { eps })),
    )
}

/// The fused layer norm.
struct LayerNormOp {
    eps: f64,
}

/// Rows per parallel task of the layer norm.
const ROWS_PER_TASK: usize = 32;

fn layer_norm_forward<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = w.len().max(1);
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(yr, xr)| {
            let (mean, rstd) = stats(xr, eps);
            let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
            for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *y = (x - mean) * rstd * w + b;
            }
        });
    y
}

/// Per row: `x̂ = (x - mean) rstd`, `dx = rstd (g w - mean(g w) - x̂ mean(g w x̂))`;
/// `dw = Σ g x̂` and `db = Σ g` over the rows.
fn layer_norm_backward<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = w.len().max(1);
    let mut dx = vec![T::from_f64(0.0); x.len()];
    let rows_per = ROWS_PER_TASK * d;
    let partials: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(rows_per)
        .zip(x.par_chunks(rows_per))
        .zip(g.par_chunks(rows_per))
        .map(|((dxc, xc), gc)| {
            let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
            for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                let (mean, rstd) = stats(xr, eps);
                let (mut a, mut bb) = (0f64, 0f64);
                for j in 0..d {
                    let xh = (xr[j].to_f64() - mean) * rstd;
                    let gv = gr[j].to_f64();
                    let gw = gv * w[j].to_f64();
                    a += gw;
                    bb += gw * xh;
                    dw[j] += gv * xh;
                    db[j] += gv;
                }
                let (a, bb) = (a / d as f64, bb / d as f64);
                for j in 0..d {
                    let xh = (xr[j].to_f64() - mean) * rstd;
                    let gw = gr[j].to_f64() * w[j].to_f64();
                    dxr[j] = T::from_f64(rstd * (gw - a - xh * bb));
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
    for (pw, pb) in &partials {
        for j in 0..d {
            dw[j] += pw[j];
            db[j] += pb[j];
        }
    }
    let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
    (dx, cast(dw), cast(db))
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "agfsync-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (xs, ws, bs) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(
                layer_norm_forward::<f32>(slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?, self.eps),
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(
                layer_norm_forward::<f64>(slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?, self.eps),
            ),
            _ => candle_core::bail!("layer_norm: f32 or f64 operands of one dtype"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x = x.detach().contiguous()?;
        let w = w.detach().contiguous()?;
        let g = g.to_dtype(x.dtype())?.contiguous()?;
        fn run<T: Real>(
            x: &Tensor,
            w: &Tensor,
            g: &Tensor,
            eps: f64,
        ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            Ok(layer_norm_backward::<T>(
                elements(&xs, xl)?,
                elements(&ws, wl)?,
                elements(&gs, gl)?,
                eps,
            ))
        }
        let dev = x.device();
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => {
                let (dx, dw, db) = run::<f32>(&x, &w, &g, self.eps)?;
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::from_vec(dw, w.shape(), dev)?,
                    Tensor::from_vec(db, b.shape(), dev)?,
                )
            }
            DType::F64 => {
                let (dx, dw, db) = run::<f64>(&x, &w, &g, self.eps)?;
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::from_vec(dw, w.shape(), dev)?,
                    Tensor::from_vec(db, b.shape(), dev)?,
                )
            }
            d => candle_core::bail!("layer_norm: no {d:?} backward"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The fused op.
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Sizes of one application: channels, elements per channel, groups.
#[derive(Clone, Copy)]
struct Dims {
    c: usize,
    hw: usize,
    groups: usize,
}

impl Dims {
    fn of(shape: &Shape, groups: usize) -> Result<Self> {
        let d = shape.dims();
        if d.len() < 2 {
            candle_core::bail!("group_norm: input of rank {} (needs [b, c, ...])", d.len());
        }
        Ok(Self {
            c: d[1],
            hw: d[2..].iter().product(),
            groups,
        })
    }

    fn per_channel_group(&self) -> usize {
        self.c / self.groups
    }

    /// Elements of one (sample, group).
    fn group_len(&self) -> usize {
        self.per_channel_group() * self.hw
    }
}

/// Mean and `1 / sqrt(var + eps)` of one group, accumulated in f64.
fn stats<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let (mut s, mut ss) = (0f64, 0f64);
    for &v in x {
        let v = v.to_f64();
        s += v;
        ss += v * v;
    }
    let n = x.len().max(1) as f64;
    let mean = s / n;
    let var = (ss / n - mean * mean).max(0.0);
    (mean, 1.0 / (var + eps).sqrt())
}

fn sigmoid<T: Real>(z: T) -> T {
    let one = T::from_f64(1.0);
    one / (one + (T::from_f64(0.0) - z).exp())
}

fn forward<T: Real>(x: &[T], w: &[T], b: &[T], d: Dims, eps: f64, silu: bool) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); x.len()];
    let cpg = d.per_channel_group();
    y.par_chunks_mut(d.group_len())
        .zip(x.par_chunks(d.group_len()))
        .enumerate()
        .for_each(|(i, (yg, xg))| {
            let g = i % d.groups;
            let (mean, rstd) = stats(xg, eps);
            for (ci, (yc, xc)) in yg.chunks_mut(d.hw).zip(xg.chunks(d.hw)).enumerate() {
                let ch = g * cpg + ci;
                let scale = rstd * w[ch].to_f64();
                let (shift, scale) = (
                    T::from_f64(b[ch].to_f64() - mean * scale),
                    T::from_f64(scale),
                );
                if silu {
                    for (y, &x) in yc.iter_mut().zip(xc) {
                        let z = x * scale + shift;
                        *y = z * sigmoid(z);
                    }
                } else {
                    for (y, &x) in yc.iter_mut().zip(xc) {
                        *y = x * scale + shift;
                    }
                }
            }
        });
    y
}

/// Gradients of all three operands given the output gradient `g`:
/// `dz = g * silu'(z)` (or `g`), `x̂ = (x - mean) * rstd`,
/// `dx = rstd * (dz w - mean(dz w) - x̂ mean(dz w x̂))` per group,
/// `dw = Σ dz x̂`, `db = Σ dz` per channel.
fn backward<T: Real>(
    x: &[T],
    w: &[T],
    b: &[T],
    g: &[T],
    d: Dims,
    eps: f64,
    silu: bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let cpg = d.per_channel_group();
    let mut dx = vec![T::from_f64(0.0); x.len()];
    // Per (sample, group): each channel's (Σ dz x̂, Σ dz).
    let partials: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(d.group_len())
        .zip(x.par_chunks(d.group_len()))
        .zip(g.par_chunks(d.group_len()))
        .enumerate()
        .map(|(i, ((dxg, xg), gg))| {
            let grp = i % d.groups;
            let (mean, rstd) = stats(xg, eps);
            let dz = |ch: usize, x: T, g: T| -> f64 {
                if !silu {
                    return g.to_f64();
                }
                let scale = rstd * w[ch].to_f64();
                let z = x.to_f64() * scale + (b[ch].to_f64() - mean * scale);
                let s = 1.0 / (1.0 + (-z).exp());
                g.to_f64() * s * (1.0 + z * (1.0 - s))
            };
            let mut sums = Vec::with_capacity(cpg);
            let (mut a, mut bb) = (0f64, 0f64);
            for ci in 0..cpg {
                let ch = grp * cpg + ci;
                let (xc, gc) = (&xg[ci * d.hw..][..d.hw], &gg[ci * d.hw..][..d.hw]);
                let (mut s_dz_xh, mut s_dz) = (0f64, 0f64);
                for (&xv, &gv) in xc.iter().zip(gc) {
                    let dzv = dz(ch, xv, gv);
                    s_dz += dzv;
                    s_dz_xh += dzv * (xv.to_f64() - mean) * rstd;
                }
                let wc = w[ch].to_f64();
                a += wc * s_dz;
                bb += wc * s_dz_xh;
                sums.push((s_dz_xh, s_dz));
            }
            let m = d.group_len().max(1) as f64;
            let (a, bb) = (a / m, bb / m);
            for ci in 0..cpg {
                let ch = grp * cpg + ci;
                let wc = w[ch].to_f64();
                let (xc, gc) = (&xg[ci * d.hw..][..d.hw], &gg[ci * d.hw..][..d.hw]);
                let dxc = &mut dxg[ci * d.hw..][..d.hw];
                for ((o, &xv), &gv) in dxc.iter_mut().zip(xc).zip(gc) {
                    let xh = (xv.to_f64() - mean) * rstd;
                    *o = T::from_f64(rstd * (dz(ch, xv, gv) * wc - a - xh * bb));
                }
            }
            sums
        })
        .collect();
    let (mut dw, mut db) = (vec![0f64; d.c], vec![0f64; d.c]);
    for (i, sums) in partials.iter().enumerate() {
        let grp = i % d.groups;
        for (ci, (s_dz_xh, s_dz)) in sums.iter().enumerate() {
            dw[grp * cpg + ci] += s_dz_xh;
            db[grp * cpg + ci] += s_dz;
        }
    }
    let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
    (dx, cast(dw), cast(db))
}

fn backward_t<T: Real>(
    op: &GroupNormOp,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = Dims::of(x.shape(), op.groups)?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (dx, dw, db) = backward::<T>(
        elements(&xs, xl)?,
        elements(&ws, wl)?,
        elements(&bs, bl)?,
        elements(&gs, gl)?,
        d,
        op.eps,
        op.silu,
    );
    let dev = x.device();
    Ok((
        Tensor::from_vec(dx, x.shape(), dev)?,
        Tensor::from_vec(dw, w.shape(), dev)?,
        Tensor::from_vec(db, b.shape(), dev)?,
    ))
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.silu {
            "agfsync-group-norm-silu"
        } else {
            "agfsync-group-norm"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(xl.shape(), self.groups)?;
        let out = match (xs, ws, bs) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(forward::<f32>(
                    slice(xs, xl)?,
                    slice(ws, wl)?,
                    slice(bs, bl)?,
                    d,
                    self.eps,
                    self.silu,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(forward::<f64>(
                    slice(xs, xl)?,
                    slice(ws, wl)?,
                    slice(bs, bl)?,
                    d,
                    self.eps,
                    self.silu,
                ))
            }
            _ => candle_core::bail!("group_norm: f32 or f64 operands of one dtype"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x = x.detach().contiguous()?;
        let dtype = x.dtype();
        let (w, b) = (w.detach().contiguous()?, b.detach().contiguous()?);
        let g = g.to_dtype(dtype)?.contiguous()?;
        let (dx, dw, db) = match dtype {
            DType::F32 => backward_t::<f32>(self, &x, &w, &b, &g)?,
            DType::F64 => backward_t::<f64>(self, &x, &w, &b, &g)?,
            d => candle_core::bail!("group_norm: no {d:?} backward"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64, offset: f64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| offset + rng.gen_range(-1.0..1.0)).collect();
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

    /// Back-propagates `sum(y * r)` through `ours` and `reference` and
    /// asserts that x, w and b get the same gradients (1e-8).
    fn assert_same_gradients(
        ours: &Tensor,
        reference: &Tensor,
        r: &Tensor,
        vars: [&Var; 3],
        label: &str,
    ) {
        let grads = |y: &Tensor| {
            (y * r)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("backward")
        };
        let (go, gr) = (grads(ours), grads(reference));
        for (name, v) in ["x", "w", "b"].into_iter().zip(vars) {
            let d = max_diff(
                go.get(v.as_tensor()).expect("grad"),
                gr.get(v.as_tensor()).expect("grad"),
            );
            assert!(d < 1e-8, "{label}: d{name} differs by {d}");
        }
    }

    /// The group norm written with candle's differentiable ops.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Tensor {
        let dims = x.dims().to_vec();
        let n = dims[0];
        let per = x.elem_count() / (n * groups);
        let xg = x.reshape((n, groups, per)).expect("reshape");
        let mean = (xg.sum_keepdim(2).expect("sum") / per as f64).expect("mean");
        let xc = xg.broadcast_sub(&mean).expect("sub");
        let var = (xc.sqr().expect("sqr").sum_keepdim(2).expect("sum") / per as f64).expect("var");
        let xn = xc
            .broadcast_div(&(var + eps).expect("eps").sqrt().expect("sqrt"))
            .expect("div")
            .reshape(dims.as_slice())
            .expect("reshape");
        let mut shape = vec![1; dims.len()];
        shape[1] = dims[1];
        let y = xn
            .broadcast_mul(&w.reshape(shape.as_slice()).expect("w"))
            .expect("mul")
            .broadcast_add(&b.reshape(shape.as_slice()).expect("b"))
            .expect("add");
        if silu {
            y.silu().expect("silu")
        } else {
            y
        }
    }

    #[test]
    fn output_and_gradients_match_the_composed_norm() {
        // 4-D (UNet), 3-D and 5-D inputs; one group and one channel per group;
        // an offset mean (the one-pass variance in f64 must still hold).
        for (i, (shape, groups, offset)) in [
            (vec![2, 6, 3, 5], 3, 0.0),
            (vec![3, 4, 7], 1, 0.5),
            (vec![1, 8, 2, 2, 3], 8, 40.0),
            (vec![2, 4, 4, 4], 2, -3.0),
        ]
        .into_iter()
        .enumerate()
        {
            for silu in [false, true] {
                let c = shape[1];
                let seed = 10 * i as u64;
                let x = Var::from_tensor(&randn(&shape, seed, offset)).expect("x");
                let w = Var::from_tensor(&randn(&[c], seed + 1, 1.0)).expect("w");
                let b = Var::from_tensor(&randn(&[c], seed + 2, 0.0)).expect("b");
                let eps = 1e-5;
                let ours = group_norm(
                    x.as_tensor(),
                    w.as_tensor(),
                    b.as_tensor(),
                    groups,
                    eps,
                    silu,
                    true,
                )
                .expect("ours");
                let reference = composed(
                    x.as_tensor(),
                    w.as_tensor(),
                    b.as_tensor(),
                    groups,
                    eps,
                    silu,
                );
                let d = max_diff(&ours, &reference);
                assert!(d < 1e-9, "case {i} silu {silu}: output differs by {d}");
                let r = randn(&shape, seed + 3, 0.0);
                let label = format!("case {i} silu {silu}");
                assert_same_gradients(&ours, &reference, &r, [&x, &w, &b], &label);
                // f32 forward against the f64 result.
                let x32 = x.as_tensor().to_dtype(DType::F32).expect("f32");
                let (w32, b32) = (
                    w.as_tensor().to_dtype(DType::F32).expect("f32"),
                    b.as_tensor().to_dtype(DType::F32).expect("f32"),
                );
                let y32 = group_norm(&x32, &w32, &b32, groups, eps, silu, false).expect("f32");
                assert!(
                    max_diff(&y32, &reference) < 1e-4,
                    "case {i} silu {silu} f32"
                );
            }
        }
    }

    #[test]
    fn layer_norm_output_and_gradients_match_the_composed_norm() {
        for (i, (shape, offset)) in [
            (vec![2, 5, 12], 0.0),
            (vec![3, 70], 25.0),
            (vec![1, 1, 3], -2.0),
        ]
        .into_iter()
        .enumerate()
        {
            let d = *shape.last().expect("width");
            let seed = 100 + 10 * i as u64;
            let x = Var::from_tensor(&randn(&shape, seed, offset)).expect("x");
            let w = Var::from_tensor(&randn(&[d], seed + 1, 1.0)).expect("w");
            let b = Var::from_tensor(&randn(&[d], seed + 2, 0.0)).expect("b");
            let eps = 1e-5;
            let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps).expect("ours");
            let xt = x.as_tensor();
            let mean = (xt.sum_keepdim(D::Minus1).expect("sum") / d as f64).expect("mean");
            let xc = xt.broadcast_sub(&mean).expect("sub");
            let var = (xc.sqr().expect("sqr").sum_keepdim(D::Minus1).expect("sum") / d as f64)
                .expect("var");
            let reference = xc
                .broadcast_div(&(var + eps).expect("eps").sqrt().expect("sqrt"))
                .expect("div")
                .broadcast_mul(w.as_tensor())
                .expect("mul")
                .broadcast_add(b.as_tensor())
                .expect("add");
            let diff = max_diff(&ours, &reference);
            assert!(diff < 1e-9, "case {i}: output differs by {diff}");
            let r = randn(&shape, seed + 3, 0.0);
            assert_same_gradients(&ours, &reference, &r, [&x, &w, &b], &format!("case {i}"));
        }
    }

    #[test]
    fn inference_records_no_graph_and_bad_groups_are_errors() {
        let x = Var::from_tensor(&randn(&[1, 4, 2, 2], 1, 0.0)).expect("x");
        let w = randn(&[4], 2, 1.0);
        let b = randn(&[4], 3, 0.0);
        let y = group_norm(x.as_tensor(), &w, &b, 2, 1e-5, true, false).expect("y");
        assert!(!y.track_op());
        assert!(group_norm(x.as_tensor(), &w, &b, 3, 1e-5, true, false).is_err());
        assert!(group_norm(
            x.as_tensor(),
            &w,
            &w.narrow(0, 0, 3).expect("n"),
            2,
            1e-5,
            true,
            false
        )
        .is_err());
    }
}
