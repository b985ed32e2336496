//! Building blocks shared by every network in agfsync: linear and convolution
//! layers with LoRA slots, normalisations, activations and attention.
//!
//! Every block takes a [`Pass`] telling it whether the forward must be
//! differentiable. candle-nn's fused `softmax_last_dim`, `layer_norm` and
//! `rms_norm` kernels are fast but record no gradient, so training through them
//! silently drops gradients. The inference pass uses them; the training pass
//! composes the same maths from primitive, differentiable ops.

use std::sync::{Arc, RwLock};

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// How a forward pass is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    /// Use only ops that record gradients (slower). When false, fused kernels
    /// are used and every weight is detached, so no graph is built.
    pub differentiable: bool,
    /// Apply the LoRA adapters held in the model's slots. With adapters off the
    /// model is its base weights: the Diffusion-DPO reference model.
    pub adapters: bool,
}

impl Pass {
    /// Fast inference with adapters applied.
    pub const INFERENCE: Pass = Pass {
        differentiable: false,
        adapters: true,
    };
    /// Differentiable forward with adapters applied (the trained model).
    pub const TRAIN: Pass = Pass {
        differentiable: true,
        adapters: true,
    };
    /// Fast forward of the base weights with every adapter disabled.
    pub const REFERENCE: Pass = Pass {
        differentiable: false,
        adapters: false,
    };

    /// Returns `w` itself on a differentiable pass and a detached copy (no
    /// gradient tracking, no graph kept alive) otherwise.
    pub fn weight(&self, w: &Tensor) -> Tensor {
        if self.differentiable {
            w.clone()
        } else {
            w.detach()
        }
    }
}

/// One low-rank adapter on a linear layer: `y += scale * up(down(x))`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// Name of the adapter (several may be active at once).
    pub name: String,
    /// Down projection, shape `[rank, in_features]` (PEFT's `lora_A`).
    pub down: Tensor,
    /// Up projection, shape `[out_features, rank]` (PEFT's `lora_B`).
    pub up: Tensor,
    /// Multiplier applied to the adapter's output (`alpha / rank * weight`).
    pub scale: f64,
}

/// The LoRA state of one linear layer: its base weight and the adapters
/// attached to it. Shared between the layer and the model's [`LoraRegistry`],
/// so adapters can be attached, merged or removed after loading.
///
/// The base weight lives here (not in the layer) so that merging an adapter
/// is a real weight update: merged adapters cost nothing at inference, and
/// unmerging restores the base weight for the Diffusion-DPO reference.
#[derive(Debug)]
pub struct LoraSlot {
    base: RwLock<Tensor>,
    adapters: RwLock<Vec<LoraAdapter>>,
    merged: RwLock<Vec<LoraAdapter>>,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    match l.read() {
        Ok(v) => v.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    // A panic while holding the lock cannot leave the value half-written in a
    // way that matters here, so a poisoned lock is simply recovered.
    match l.write() {
        Ok(v) => v,
        Err(p) => p.into_inner(),
    }
}

impl LoraSlot {
    fn new(base: Tensor) -> Self {
        Self {
            base: RwLock::new(base),
            adapters: RwLock::default(),
            merged: RwLock::default(),
        }
    }

    /// The layer's weight, `[out, in]`, including merged adapters.
    pub fn weight(&self) -> Tensor {
        read(&self.base)
    }

    /// `(out_features, in_features)` of the layer.
    pub fn shape(&self) -> (usize, usize) {
        let w = self.weight();
        let d = w.dims();
        (d[0], d.get(1).copied().unwrap_or(1))
    }

    /// Attaches an adapter (applied on passes with `adapters: true`).
    pub fn push(&self, adapter: LoraAdapter) {
        write(&self.adapters).push(adapter);
    }

    /// Removes every attached (unmerged) adapter with the given name;
    /// returns how many were removed.
    pub fn remove(&self, name: &str) -> usize {
        let mut adapters = write(&self.adapters);
        let before = adapters.len();
        adapters.retain(|a| a.name != name);
        before - adapters.len()
    }

    /// A copy of the attached (unmerged) adapters.
    pub fn adapters(&self) -> Vec<LoraAdapter> {
        read(&self.adapters)
    }

    /// Names of the adapters merged into the base weight.
    pub fn merged(&self) -> Vec<String> {
        read(&self.merged).into_iter().map(|a| a.name).collect()
    }

    fn delta(&self, a: &LoraAdapter, dtype: DType) -> Result<Tensor> {
        let up = a.up.to_dtype(DType::F32)?;
        let down = a.down.to_dtype(DType::F32)?;
        (up.matmul(&down)? * a.scale)?.to_dtype(dtype)
    }

    /// Adds `scale * up @ down` into the base weight: the adapter then applies
    /// on every pass, at no extra cost.
    pub fn merge(&self, adapter: LoraAdapter) -> Result<()> {
        let mut base = write(&self.base);
        let delta = self.delta(&adapter, base.dtype())?;
        *base = (&*base + delta.reshape(base.shape())?)?.detach();
        write(&self.merged).push(adapter);
        Ok(())
    }

    /// Subtracts a merged adapter from the base weight again; returns whether
    /// one with that name was merged.
    pub fn unmerge(&self, name: &str) -> Result<bool> {
        let mut merged = write(&self.merged);
        let Some(i) = merged.iter().position(|a| a.name == name) else {
            return Ok(false);
        };
        let adapter = merged.remove(i);
        let mut base = write(&self.base);
        let delta = self.delta(&adapter, base.dtype())?;
        *base = (&*base - delta.reshape(base.shape())?)?.detach();
        Ok(true)
    }
}

/// A LoRA slot with the module path of its layer.
pub type NamedSlot = (String, Arc<LoraSlot>);

/// Every LoRA slot of a model, by the module path of its layer (for example
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
#[derive(Clone, Debug, Default)]
pub struct LoraRegistry {
    slots: Arc<RwLock<Vec<NamedSlot>>>,
}

impl LoraRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&self, path: String, slot: Arc<LoraSlot>) {
        write(&self.slots).push((path, slot));
    }

    /// All slots, in construction order.
    pub fn slots(&self) -> Vec<NamedSlot> {
        read(&self.slots)
    }

    /// The slot of the layer at `path`, if that layer has one.
    pub fn get(&self, path: &str) -> Option<Arc<LoraSlot>> {
        self.slots()
            .into_iter()
            .find(|(p, _)| p == path)
            .map(|(_, s)| s)
    }
}

/// Default initialisation used when a model is built from a [`candle_nn::VarMap`]
/// (random tiny checkpoints, gradient checks); ignored when weights are loaded.
const WEIGHT_INIT: Init = candle_nn::init::DEFAULT_KAIMING_UNIFORM;
const BIAS_INIT: Init = Init::Uniform { lo: -0.1, up: 0.1 };
const NORM_WEIGHT_INIT: Init = Init::Uniform { lo: 0.8, up: 1.2 };

/// Where a linear layer's weight lives.
#[derive(Clone, Debug)]
enum LinearWeight {
    /// A plain weight.
    Plain(Tensor),
    /// In a LoRA slot, which can merge adapters into it.
    Slot(Arc<LoraSlot>),
}

/// A linear layer `y = x W^T + b` with an optional LoRA slot.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` (`[out, in]`) and, when `bias` is set, `bias` from `vb`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", WEIGHT_INIT)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", BIAS_INIT)?)
        } else {
            None
        };
        Ok(Self {
            weight: LinearWeight::Plain(weight),
            bias,
        })
    }

    /// Like [`Linear::new`], and registers a LoRA slot under the module path.
    pub fn new_lora(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
        registry: &LoraRegistry,
    ) -> Result<Self> {
        let path = vb.prefix();
        let mut lin = Self::new(in_dim, out_dim, bias, vb)?;
        if let LinearWeight::Plain(w) = &lin.weight {
            let slot = Arc::new(LoraSlot::new(w.clone()));
            registry.register(path, slot.clone());
            lin.weight = LinearWeight::Slot(slot);
        }
        Ok(lin)
    }

    /// The weight matrix, `[out, in]` (with any merged adapters).
    pub fn weight(&self) -> Tensor {
        match &self.weight {
            LinearWeight::Slot(slot) => slot.weight(),
            LinearWeight::Plain(w) => w.clone(),
        }
    }

    /// Applies the layer to `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let w = pass.weight(&self.weight());
        let y = matmul_last(x, &w)?;
        let mut y = match &self.bias {
            Some(b) => y.broadcast_add(&pass.weight(b))?,
            None => y,
        };
        if pass.adapters {
            if let LinearWeight::Slot(slot) = &self.weight {
                for a in slot.adapters() {
                    let down = pass.weight(&a.down).to_dtype(x.dtype())?;
                    let up = pass.weight(&a.up).to_dtype(x.dtype())?;
                    let h = matmul_last(&matmul_last(x, &down)?, &up)?;
                    y = (y + (h * a.scale)?)?;
                }
            }
        }
        Ok(y)
    }
}

/// A 2-D convolution. candle's CPU convolution has no bf16 kernel (its
/// matrix product does, by widening), so bf16 on the CPU is widened to f32
/// and narrowed back here; other dtypes and devices convolve directly.
///
/// On a differentiable pass the convolution runs through [`crate::vjp`]:
/// gradients only for the operands that need one, the input's as an
/// ordinary convolution. For the kernels that cannot (padding at least the
/// kernel size), a strided convolution whose height and width leave
/// different remainders (a 9x8 input at stride 2, say) runs as patches and a
/// matrix product ([`conv2d_unfolded`]): candle's backward of its own
/// convolution derives the transposed convolution's output padding from the
/// height alone and fails on such inputs.
fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    differentiable: bool,
) -> Result<Tensor> {
    if x.dtype() == DType::BF16 && x.device().is_cpu() {
        let y = conv2d(
            &x.to_dtype(DType::F32)?,
            &w.to_dtype(DType::F32)?,
            padding,
            stride,
            differentiable,
        )?;
        return y.to_dtype(DType::BF16);
    }
    if differentiable && crate::vjp::conv2d_supported(x, w, padding) {
        // Our own backward: only the gradients that are needed (see `vjp`).
        return crate::vjp::conv2d(x, w, padding, stride);
    }
    if differentiable && stride > 1 {
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let rest = |n: usize, k: usize| {
            let out = (n + 2 * padding).saturating_sub(k) / stride + 1;
            n as i64 - ((out as i64 - 1) * stride as i64 + k as i64 - 2 * padding as i64)
        };
        if rest(h, kh) != rest(wd, kw) {
            return conv2d_unfolded(x, w, padding, stride);
        }
    }
    crate::cpu_conv::conv2d(x, w, None, padding, stride)
}

/// A convolution (no dilation, one group) as explicit patches and a matrix
/// product: `W [o, c*kh*kw] @ cols [b, c*kh*kw, oh*ow]`. Every op in it has
/// a cheap backward in candle (slices, stacking, matrix products).
pub fn conv2d_unfolded(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, ci, kh, kw) = w.dims4()?;
    if ci != c {
        candle_core::bail!("conv2d: input has {c} channels, the kernel expects {ci}");
    }
    if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        candle_core::bail!(
            "conv2d: a {kh}x{kw} kernel (stride {stride}, padding {padding}) does not fit a {h}x{wd} input"
        );
    }
    let oh = (h + 2 * padding - kh) / stride + 1;
    let ow = (wd + 2 * padding - kw) / stride + 1;
    let cols = if kh == 1 && kw == 1 && padding == 0 && stride == 1 {
        x.reshape((b, c, h * wd))?
    } else {
        // Pad so that every window's strided slice (`stride * oh` rows from
        // row `ky`) lies inside the tensor; the extra rows are never read.
        let extra_h = (kh - 1 + stride * oh).saturating_sub(h + 2 * padding);
        let extra_w = (kw - 1 + stride * ow).saturating_sub(wd + 2 * padding);
        let xp = x
            .pad_with_zeros(2, padding, padding + extra_h)?
            .pad_with_zeros(3, padding, padding + extra_w)?;
        let mut taps = Vec::with_capacity(kh * kw);
        for ky in 0..kh {
            for kx in 0..kw {
                let mut t = xp.narrow(2, ky, stride * oh)?.narrow(3, kx, stride * ow)?;
                if stride > 1 {
                    t = t
                        .reshape((b, c, oh, stride, ow, stride))?
                        .narrow(3, 0, 1)?
                        .narrow(5, 0, 1)?
                        .reshape((b, c, oh, ow))?;
                }
                taps.push(t);
            }
        }
        // [b, c, kh*kw, oh, ow]: the column order of `w`'s rows, (c, ky, kx).
        Tensor::stack(&taps, 2)?.reshape((b, c * kh * kw, oh * ow))?
    };
    let w2 = w.reshape((o, c * kh * kw))?;
    let y = w2.broadcast_matmul(&cols)?;
    y.reshape((b, o, oh, ow))
}

/// Nearest-neighbour upsampling of `[b, c, h, w]` to `[b, c, th, tw]`.
/// candle computes this op's gradient with a convolution, which has no bf16
/// kernel on the CPU, so bf16 on the CPU is upsampled in f32.
///
/// An integer, equal scale on both axes (the UNet's 2x) is written as a
/// broadcast and a reshape instead, whose gradient is a plain sum: candle
/// computes the op's gradient with a grouped convolution, one small
/// convolution per channel on the CPU.
pub fn upsample_nearest2d(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h > 0 && w > 0 && th % h == 0 && tw % w == 0 && th / h == tw / w {
        let s = th / h;
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, s, w, s))?
            .reshape((b, c, th, tw));
    }
    if x.dtype() == DType::BF16 && x.device().is_cpu() {
        return x
            .to_dtype(DType::F32)?
            .upsample_nearest2d(th, tw)?
            .to_dtype(DType::BF16);
    }
    x.upsample_nearest2d(th, tw)
}

/// `x W^T` for `x` of shape `[..., in]` and `w` of shape `[out, in]`, as one
/// matrix product over the flattened leading dimensions.
fn matmul_last(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim.max(1);
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    // Differentiable through `vjp`, which skips the gradients of frozen
    // weights; without a graph it is the plain product.
    crate::vjp::linear(&x.reshape((rows, in_dim))?, w)?.reshape(out_dims.as_slice())
}

/// A 2D convolution with square kernels, as `torch.nn.Conv2d` stores it, with
/// an optional LoRA slot.
///
/// A LoRA adapter on a convolution is kohya's layout: a down convolution with
/// the layer's kernel, stride and padding (`[rank, in, k, k]`, stored in the
/// slot flattened to `[rank, in * k * k]`) followed by a 1x1 up convolution
/// (`[out, rank, 1, 1]`, stored as `[out, rank]`). For the 1x1 projections of
/// SD 1.x transformers this is exactly a linear LoRA over the channels.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: LinearWeight,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Loads a `[out, in, k, k]` kernel and its bias from `vb`.
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((out_c, in_c, kernel, kernel), "weight", WEIGHT_INIT)?;
        let bias = Some(vb.get_with_hints(out_c, "bias", BIAS_INIT)?);
        Ok(Self {
            weight: LinearWeight::Plain(weight),
            bias,
            stride,
            padding,
        })
    }

    /// Like [`Conv2d::new`], and registers a LoRA slot (holding the kernel)
    /// under the module path.
    pub fn new_lora(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
        registry: &LoraRegistry,
    ) -> Result<Self> {
        let path = vb.prefix();
        let mut conv = Self::new(in_c, out_c, kernel, stride, padding, vb)?;
        if let LinearWeight::Plain(w) = &conv.weight {
            let slot = Arc::new(LoraSlot::new(w.clone()));
            registry.register(path, slot.clone());
            conv.weight = LinearWeight::Slot(slot);
        }
        Ok(conv)
    }

    /// The kernel, `[out, in, k, k]` (with any merged adapters).
    pub fn weight(&self) -> Tensor {
        match &self.weight {
            LinearWeight::Slot(slot) => slot.weight(),
            LinearWeight::Plain(w) => w.clone(),
        }
    }

    /// Applies the convolution to `x` of shape `[b, c, h, w]`.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let kernel = self.weight();
        let w = pass.weight(&kernel);
        let mut y = if !pass.differentiable && x.dtype() != DType::BF16 {
            // No graph: the bias is written with the product (cpu_conv).
            let b = self.bias.as_ref().map(Tensor::detach);
            crate::cpu_conv::conv2d(x, &w, b.as_ref(), self.padding, self.stride)?
        } else {
            let mut y = conv2d(x, &w, self.padding, self.stride, pass.differentiable)?;
            if let Some(b) = &self.bias {
                let b = pass.weight(b).reshape((1, (), 1, 1))?;
                y = y.broadcast_add(&b)?;
            }
            y
        };
        if pass.adapters {
            if let LinearWeight::Slot(slot) = &self.weight {
                let (_, in_c, kh, kw) = kernel.dims4()?;
                for a in slot.adapters() {
                    let rank = a.down.dim(0)?;
                    let down = pass
                        .weight(&a.down)
                        .to_dtype(x.dtype())?
                        .reshape((rank, in_c, kh, kw))?;
                    let up = pass.weight(&a.up).to_dtype(x.dtype())?;
                    let up = up.reshape((up.dim(0)?, rank, 1, 1))?;
                    let h = conv2d(x, &down, self.padding, self.stride, pass.differentiable)?;
                    let h = conv2d(&h, &up, 0, 1, pass.differentiable)?;
                    y = (y + (h * a.scale)?)?;
                }
            }
        }
        Ok(y)
    }
}

/// Group normalisation over `[b, c, ...]` inputs, statistics in f32 for half
/// precision inputs (as PyTorch's CPU and CUDA kernels do).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`[channels]`); `groups` must divide `channels`.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!(
                "{}: norm_num_groups ({groups}) must divide the channel count ({channels})",
                vb.prefix()
            );
        }
        let weight = vb.get_with_hints(channels, "weight", NORM_WEIGHT_INIT)?;
        let bias = vb.get_with_hints(channels, "bias", BIAS_INIT)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// Normalises `x`.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        if crate::cpu_norm::handles(x) {
            return self.fused(x, false, pass);
        }
        self.composed(x, pass)
    }

    /// `act(self.forward(x))`: on the CPU one fused kernel when `act` is
    /// SiLU (every ResNet block's norm is followed by it).
    pub fn forward_act(&self, x: &Tensor, act: Activation, pass: Pass) -> Result<Tensor> {
        if crate::cpu_norm::handles(x) {
            let silu = act == Activation::Silu;
            let y = self.fused(x, silu, pass)?;
            return if silu { Ok(y) } else { act.forward(&y) };
        }
        act.forward(&self.composed(x, pass)?)
    }

    /// [`crate::cpu_norm`]'s kernel, differentiable on a training pass.
    fn fused(&self, x: &Tensor, silu: bool, pass: Pass) -> Result<Tensor> {
        crate::cpu_norm::group_norm(
            x,
            &pass.weight(&self.weight),
            &pass.weight(&self.bias),
            self.groups,
            self.eps,
            silu,
            pass.differentiable,
        )
    }

    /// The norm composed of differentiable candle ops (other devices and
    /// dtypes), statistics in f32 for half precision.
    fn composed(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let work = internal_dtype(dtype);
        let per_group = x.elem_count() / (b * self.groups);
        let xg = x.reshape((b, self.groups, per_group))?.to_dtype(work)?;
        let mean = (xg.sum_keepdim(2)? / per_group as f64)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)? / per_group as f64)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let xn = xn.to_dtype(dtype)?.reshape(dims.as_slice())?;
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        let w = pass.weight(&self.weight).reshape(shape.as_slice())?;
        let bias = pass.weight(&self.bias).reshape(shape.as_slice())?;
        xn.broadcast_mul(&w)?.broadcast_add(&bias)
    }
}

/// Layer normalisation over the last dimension with affine parameters.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` (`[dim]`).
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", NORM_WEIGHT_INIT)?;
        let bias = vb.get_with_hints(dim, "bias", BIAS_INIT)?;
        Ok(Self { weight, bias, eps })
    }

    /// Normalises the last dimension of `x`: candle's fused kernel on
    /// inference passes; on training passes [`crate::cpu_norm`]'s kernel with
    /// its own backward on the CPU, differentiable primitives elsewhere.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        // The fused kernel has no f64 version: f64 (gradient checks) always
        // takes the composed path.
        if !pass.differentiable && x.dtype() != DType::F64 {
            let x = x.contiguous()?;
            return candle_nn::ops::layer_norm(
                &x,
                &self.weight.detach(),
                &self.bias.detach(),
                self.eps as f32,
            );
        }
        if crate::cpu_norm::handles(x) {
            // One fused kernel with its own backward.
            return crate::cpu_norm::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        let dtype = x.dtype();
        let work = internal_dtype(dtype);
        let n = x.dim(D::Minus1)? as f64;
        let x = x.to_dtype(work)?;
        let mean = (x.sum_keepdim(D::Minus1)? / n)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        let xn = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Softmax over the last dimension, in f32 for half-precision inputs.
pub fn softmax_last_dim(x: &Tensor, pass: Pass) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(internal_dtype(dtype))?;
    let y = if pass.differentiable {
        candle_nn::ops::softmax(&x, D::Minus1)?
    } else {
        fast_softmax(&x)?
    };
    y.to_dtype(dtype)
}

/// The softmax over the last dimension without a graph: one vectorised
/// pass per row on the CPU ([`crate::cpu_act`]), candle's kernel elsewhere.
pub fn fast_softmax(x: &Tensor) -> Result<Tensor> {
    if crate::cpu_act::handles(x) {
        return crate::cpu_act::softmax_last_dim(x);
    }
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)
}

/// SiLU, `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// CLIP's `quick_gelu`, `x * sigmoid(1.702 x)`: one pass on the CPU when
/// no gradient is recorded through it ([`crate::cpu_act`]).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if crate::cpu_act::handles(x) && !x.track_op() {
        return crate::cpu_act::quick_gelu(x);
    }
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// An activation function named as Hugging Face configs name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`.
    QuickGelu,
}

impl Activation {
    /// Parses a config's activation name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }

    /// Applies the activation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => quick_gelu(x),
        }
    }
}

/// Scaled dot-product attention over `[batch*heads, n, d]` tensors.
///
/// `bias` is added to the scores before the softmax (causal masks).
/// With `upcast`, scores and softmax are computed in f32. A differentiable
/// pass without `bias` runs [`crate::vjp::attention`], which keeps no
/// `[bh, n, m]` probabilities for the backward pass.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    upcast: bool,
    pass: Pass,
) -> Result<Tensor> {
    if pass.differentiable && bias.is_none() {
        return crate::vjp::attention(q, k, v, scale, upcast);
    }
    attention_composed(q, k, v, scale, bias, upcast, pass)
}

/// [`attention`] composed of candle ops (the graph keeps every
/// intermediate on a differentiable pass).
pub(crate) fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    upcast: bool,
    pass: Pass,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k) = if upcast {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    // Scaling q rather than the scores: a pass over `[.., n, d]` instead of
    // `[.., n, m]`.
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let scores = match bias {
        Some(b) => scores.broadcast_add(&b.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores, pass)?.to_dtype(dtype)?;
    probs.matmul(v)
}

/// Splits `[b, n, heads*d]` into `[b*heads, n, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .reshape((b * heads, n, c / heads))?
        .contiguous()
}

/// Merges `[b*heads, n, d]` back into `[b, n, heads*d]`.
pub fn merge_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, n, d) = x.dims3()?;
    x.reshape((bh / heads, heads, n, d))?
        .transpose(1, 2)?
        .reshape((bh / heads, n, heads * d))
}

#[cfg(test)]
mod conv_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// The unfolded convolution equals candle's in value and in both
    /// gradients, for every kernel shape the UNet and VAE use (on inputs
    /// where candle's own backward works).
    #[test]
    fn unfolded_conv_matches_candle_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for &(k, pad, stride, h, w) in &[
            (3, 1, 1, 6, 5),
            (3, 1, 2, 8, 8),
            (3, 1, 2, 7, 5),
            (3, 0, 2, 9, 9),
            (1, 0, 1, 4, 3),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?)?;
            let kern = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev)?)?;
            let want = x.as_tensor().conv2d(kern.as_tensor(), pad, stride, 1, 1)?;
            let got = conv2d_unfolded(x.as_tensor(), kern.as_tensor(), pad, stride)?;
            assert_eq!(want.dims(), got.dims(), "k{k} p{pad} s{stride} {h}x{w}");
            assert!(max_diff(&want, &got)? < 1e-4, "values, k{k} s{stride}");
            // A loss that weighs every output differently.
            let wts = Tensor::randn(0f32, 1.0, want.shape(), &dev)?;
            let g1 = (want * &wts)?.sum_all()?.backward()?;
            let g2 = (got * &wts)?.sum_all()?.backward()?;
            for v in [&x, &kern] {
                let (Some(a), Some(b)) = (g1.get(v.as_tensor()), g2.get(v.as_tensor())) else {
                    panic!("missing gradient");
                };
                assert!(max_diff(a, b)? < 1e-3, "gradient, k{k} s{stride}");
            }
        }
        Ok(())
    }

    /// Regression: candle's backward of a stride-2 convolution fails when
    /// height and width leave different remainders; the layer's convolution
    /// takes the unfolded path there and yields the right gradient (checked
    /// against the same input transposed, which candle handles).
    #[test]
    fn stride2_conv_backward_on_odd_by_even_input() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 9, 8), &dev)?)?;
        let k = Tensor::randn(0f32, 1.0, (3, 2, 3, 3), &dev)?;
        let y = conv2d(x.as_tensor(), &k, 0, 2, true)?;
        let g = y.sqr()?.sum_all()?.backward()?;
        let Some(gx) = g.get(x.as_tensor()) else {
            panic!("no input gradient");
        };
        assert_eq!(gx.dims(), &[1, 2, 9, 8]);
        // Zero-pad the width to 9 and drop the extra output column: candle's
        // own backward then works and must agree.
        let x9 = Var::from_tensor(&x.as_tensor().pad_with_zeros(3, 0, 1)?)?;
        let y9 = x9.as_tensor().conv2d(&k, 0, 2, 1, 1)?.narrow(3, 0, 3)?;
        assert!(max_diff(&y9, &y)? < 1e-4);
        let g9 = y9.sqr()?.sum_all()?.backward()?;
        let Some(gx9) = g9.get(x9.as_tensor()) else {
            panic!("no input gradient");
        };
        assert!(max_diff(&gx9.narrow(3, 0, 8)?, gx)? < 1e-3);
        Ok(())
    }

    #[test]
    fn broadcast_upsample_matches_candle_values_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?)?;
        let want = x.as_tensor().upsample_nearest2d(8, 10)?;
        let got = upsample_nearest2d(x.as_tensor(), 8, 10)?;
        assert_eq!(max_diff(&want, &got)?, 0.0);
        let wts = Tensor::randn(0f32, 1.0, want.shape(), &dev)?;
        let g1 = (want * &wts)?.sum_all()?.backward()?;
        let g2 = (got * &wts)?.sum_all()?.backward()?;
        let (Some(a), Some(b)) = (g1.get(x.as_tensor()), g2.get(x.as_tensor())) else {
            panic!("missing gradient");
        };
        assert!(max_diff(a, b)? < 1e-5);
        // Non-integer factors still work (the UNet's odd-sized latents).
        assert_eq!(
            upsample_nearest2d(x.as_tensor(), 7, 9)?.dims(),
            &[2, 3, 7, 9]
        );
        Ok(())
    }
}
