//! The differentiable training pass: analytic gradients agree with finite
//! differences for every parameter kind, every trainable tensor receives a
//! gradient, and the fast inference pass computes the same function.

use std::collections::HashMap;

use agfsync_models::clip_text::{ClipTextConfig, ClipTextModel, TextLayer};
use agfsync_models::nn::{LoraAdapter, Pass};
use agfsync_models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use agfsync_models::weights::RandomWeights;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

fn tiny_unet_config() -> UNet2DConditionConfig {
    serde_json::from_value(serde_json::json!({
        "sample_size": 8,
        "block_out_channels": [8, 16],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 6,
        "attention_head_dim": 2,
        "norm_num_groups": 4,
    }))
    .expect("static config")
}

/// A seeded standard-normal tensor (scaled by `std`): the inputs of these
/// checks are the same on every run, so a tolerance is never met by luck.
fn randn(
    dtype: DType,
    std: f64,
    shape: impl Into<candle_core::Shape>,
    name: &str,
) -> Result<Tensor> {
    let vb = RandomWeights::new(11).var_builder(dtype, &Device::Cpu);
    Ok(vb.get_with_hints(
        shape,
        name,
        candle_nn::Init::Randn {
            mean: 0.,
            stdev: std,
        },
    )?)
}

/// Makes random f64 variables for every tensor `build` asks for.
fn var_map<F: Fn(VarBuilder) -> candle_core::Result<()>>(build: F) -> Result<VarMap> {
    var_map_dtype(build, DType::F64)
}

fn var_map_dtype<F: Fn(VarBuilder) -> candle_core::Result<()>>(
    build: F,
    dtype: DType,
) -> Result<VarMap> {
    let rw = RandomWeights::new(7);
    build(rw.var_builder(DType::F32, &Device::Cpu))?;
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().expect("fresh lock");
        for (name, t) in rw.tensors() {
            data.insert(name, Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
    }
    Ok(vm)
}

fn perturbed(var: &Var, idx: usize, delta: f64) -> Result<Tensor> {
    let mut v: Vec<f64> = var.as_tensor().flatten_all()?.to_vec1()?;
    v[idx] += delta;
    Ok(Tensor::from_vec(
        v,
        var.as_tensor().shape().clone(),
        &Device::Cpu,
    )?)
}

/// Central finite differences on two entries of every variable.
fn check_grads(vm: &VarMap, loss: &dyn Fn() -> Result<Tensor>, min_vars: usize) -> Result<()> {
    let l = loss()?;
    let grads = l.backward()?;
    let vars: Vec<(String, Var)> = {
        let data = vm.data().lock().expect("lock");
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert!(vars.len() >= min_vars, "only {} variables", vars.len());
    let eps = 1e-5;
    let mut worst = (0.0f64, String::new());
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        let gv: Vec<f64> = g.flatten_all()?.to_vec1()?;
        let norm: f64 = gv.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm > 0.0, "zero gradient for `{name}`");
        let n = gv.len();
        for idx in [0, n / 2 + n / 3].into_iter().filter(|&i| i < n) {
            let orig = var.as_tensor().copy()?;
            var.set(&perturbed(var, idx, eps)?)?;
            let lp: f64 = loss()?.to_scalar()?;
            var.set(&orig)?;
            var.set(&perturbed(var, idx, -eps)?)?;
            let lm: f64 = loss()?.to_scalar()?;
            var.set(&orig)?;
            let fd = (lp - lm) / (2.0 * eps);
            let err = (fd - gv[idx]).abs() / (fd.abs().max(gv[idx].abs()).max(1e-3));
            if err > worst.0 {
                worst = (
                    err,
                    format!("{name}[{idx}]: analytic {} vs numeric {fd}", gv[idx]),
                );
            }
        }
    }
    eprintln!("worst relative error {:.3e} at {}", worst.0, worst.1);
    assert!(
        worst.0 < 1e-4,
        "worst relative error {:.3e} at {}",
        worst.0,
        worst.1
    );
    Ok(())
}

#[test]
fn unet_gradients_match_finite_differences() -> Result<()> {
    let cfg = tiny_unet_config();
    let vm = var_map(|vb| UNet2DConditionModel::new(&cfg, vb).map(|_| ()))?;
    let unet =
        UNet2DConditionModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu))?;
    let dev = Device::Cpu;
    let x = randn(DType::F64, 1.0, (2, 4, 8, 8), "input1")?;
    let t = Tensor::new(&[900f32, 3.5], &dev)?;
    let ctx = randn(DType::F64, 1.0, (2, 5, 6), "input2")?;
    let w = randn(DType::F64, 1.0, (2, 4, 8, 8), "input3")?;
    let loss = || -> Result<Tensor> {
        let y = unet.forward(&x, &t, &ctx, None, Pass::TRAIN)?;
        Ok((y * &w)?.sum_all()?)
    };
    // Every parameter kind is present: convs, group and layer norms,
    // attention projections, time embedding, GEGLU feed-forward.
    let names: Vec<String> = vm.data().lock().expect("lock").keys().cloned().collect();
    for kind in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "down_blocks.0.resnets.0.norm1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
    ] {
        assert!(names.iter().any(|n| n == kind), "missing {kind}");
    }
    check_grads(&vm, &loss, 100)
}

#[test]
fn inference_pass_equals_training_pass() -> Result<()> {
    let cfg = tiny_unet_config();
    let vm = var_map_dtype(
        |vb| UNet2DConditionModel::new(&cfg, vb).map(|_| ()),
        DType::F32,
    )?;
    let unet =
        UNet2DConditionModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let dev = Device::Cpu;
    let x = randn(DType::F32, 1.0, (2, 4, 8, 8), "input4")?;
    let t = Tensor::new(&[10f32, 500.0], &dev)?;
    let ctx = randn(DType::F32, 1.0, (2, 5, 6), "input5")?;
    let a = unet.forward(&x, &t, &ctx, None, Pass::TRAIN)?;
    let b = unet.forward(&x, &t, &ctx, None, Pass::INFERENCE)?;
    let diff: f32 = (a - b)?.abs()?.max_all()?.to_scalar()?;
    assert!(diff < 1e-4, "passes differ by {diff}");
    Ok(())
}

#[test]
fn per_sample_timesteps_are_independent() -> Result<()> {
    let cfg = tiny_unet_config();
    let rw = RandomWeights::new(3);
    let unet = UNet2DConditionModel::new(&cfg, rw.var_builder(DType::F32, &Device::Cpu))?;
    let dev = Device::Cpu;
    let x = randn(DType::F32, 1.0, (1, 4, 8, 8), "input6")?;
    let ctx = randn(DType::F32, 1.0, (1, 5, 6), "input7")?;
    let x2 = Tensor::cat(&[&x, &x], 0)?;
    let c2 = Tensor::cat(&[&ctx, &ctx], 0)?;
    let both = unet.forward(
        &x2,
        &Tensor::new(&[10f32, 700.0], &dev)?,
        &c2,
        None,
        Pass::INFERENCE,
    )?;
    let one = unet.forward(
        &x,
        &Tensor::new(&[700f32], &dev)?,
        &ctx,
        None,
        Pass::INFERENCE,
    )?;
    let d: f32 = (both.get(1)? - one.get(0)?)?
        .abs()?
        .max_all()?
        .to_scalar()?;
    assert!(d < 1e-5, "sample 1 depends on sample 0's timestep: {d}");
    let d01: f32 = (both.get(0)? - both.get(1)?)?
        .abs()?
        .max_all()?
        .to_scalar()?;
    assert!(d01 > 1e-4, "different timesteps gave the same output");
    Ok(())
}

#[test]
fn lora_adapters_get_gradients_and_can_be_disabled() -> Result<()> {
    let cfg = tiny_unet_config();
    let rw = RandomWeights::new(5);
    let unet = UNet2DConditionModel::new(&cfg, rw.var_builder(DType::F64, &Device::Cpu))?;
    let dev = Device::Cpu;
    let slots = unet.lora().slots();
    let targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        // 1x1 convolutions of SD 1.x transformers (use_linear_projection false)
        "proj_in",
        "proj_out",
    ];
    assert!(!slots.is_empty());
    for (path, _) in &slots {
        assert!(
            targets.iter().any(|t| path.ends_with(t)),
            "unexpected slot {path}"
        );
    }
    let vm = VarMap::new();
    let mut lora_vars = HashMap::new();
    for (path, slot) in &slots {
        let w = unet_weight_dims(&rw, path);
        let down = Var::from_tensor(&randn(DType::F64, 0.1, (2, w.1), "input8")?)?;
        let up = Var::from_tensor(&randn(DType::F64, 0.1, (w.0, 2), "input9")?)?;
        slot.push(LoraAdapter {
            name: "test".into(),
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale: 0.5,
        });
        let mut data = vm.data().lock().expect("lock");
        data.insert(format!("{path}.down"), down.clone());
        data.insert(format!("{path}.up"), up.clone());
        lora_vars.insert(path.clone(), (down, up));
    }
    let x = randn(DType::F64, 1.0, (1, 4, 8, 8), "input10")?;
    let t = Tensor::new(&[250f32], &dev)?;
    let ctx = randn(DType::F64, 1.0, (1, 5, 6), "input11")?;
    let w = randn(DType::F64, 1.0, (1, 4, 8, 8), "input12")?;
    let loss = || -> Result<Tensor> {
        Ok((unet.forward(&x, &t, &ctx, None, Pass::TRAIN)? * &w)?.sum_all()?)
    };
    check_grads(&vm, &loss, 2 * slots.len())?;
    // The reference pass ignores the adapters; the adapted pass does not.
    let adapted = unet.forward(&x, &t, &ctx, None, Pass::INFERENCE)?;
    let reference = unet.forward(&x, &t, &ctx, None, Pass::REFERENCE)?;
    for (_, slot) in &slots {
        assert_eq!(slot.remove("test"), 1);
    }
    let base = unet.forward(&x, &t, &ctx, None, Pass::INFERENCE)?;
    let d_ref: f64 = (&reference - &base)?.abs()?.max_all()?.to_scalar()?;
    let d_ad: f64 = (&adapted - &base)?.abs()?.max_all()?.to_scalar()?;
    assert!(d_ref < 1e-12, "reference pass used adapters: {d_ref}");
    assert!(d_ad > 1e-6, "adapters had no effect");
    Ok(())
}

fn unet_weight_dims(rw: &RandomWeights, path: &str) -> (usize, usize) {
    let t = rw
        .tensors()
        .remove(&format!("{path}.weight"))
        .unwrap_or_else(|| panic!("no weight for {path}"));
    let d = t.dims();
    (d[0], d[1])
}

#[test]
fn clip_text_gradients_match_finite_differences() -> Result<()> {
    let cfg: ClipTextConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 7, "hidden_act": "quick_gelu", "eos_token_id": 49,
        "projection_dim": 4
    }))?;
    let vm = var_map(|vb| ClipTextModel::new(&cfg, true, vb).map(|_| ()))?;
    let model = ClipTextModel::new(
        &cfg,
        true,
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )?;
    let dev = Device::Cpu;
    let ids = Tensor::new(
        &[[48u32, 3, 7, 11, 49, 49, 49], [48, 5, 5, 49, 0, 0, 0]],
        &dev,
    )?;
    let w = randn(DType::F64, 1.0, (2, 7, 8), "input13")?;
    let wp = randn(DType::F64, 1.0, (2, 4), "input14")?;
    let loss = || -> Result<Tensor> {
        let out = model.forward(&ids, TextLayer::Last, Pass::TRAIN)?;
        let pooled = out.pooled.expect("pooled output");
        Ok(((out.hidden * &w)?.sum_all()? + (pooled * &wp)?.sum_all()?)?)
    };
    check_grads(&vm, &loss, 20)
}

#[test]
fn merged_adapters_equal_attached_ones_and_unmerge_restores_the_base() -> Result<()> {
    let cfg = tiny_unet_config();
    let rw = RandomWeights::new(9);
    let unet = UNet2DConditionModel::new(&cfg, rw.var_builder(DType::F32, &Device::Cpu))?;
    let dev = Device::Cpu;
    let x = randn(DType::F32, 1.0, (1, 4, 8, 8), "input15")?;
    let t = Tensor::new(&[100f32], &dev)?;
    let ctx = randn(DType::F32, 1.0, (1, 5, 6), "input16")?;
    let base = unet.forward(&x, &t, &ctx, None, Pass::INFERENCE)?;
    let mut adapters = Vec::new();
    for (_, slot) in unet.lora().slots() {
        let (out, inp) = slot.shape();
        let a = LoraAdapter {
            name: "m".into(),
            down: randn(DType::F32, 0.2, (2, inp), "input17")?,
            up: randn(DType::F32, 0.2, (out, 2), "input18")?,
            scale: 0.7,
        };
        slot.push(a.clone());
        adapters.push((slot, a));
    }
    let attached = unet.forward(&x, &t, &ctx, None, Pass::INFERENCE)?;
    for (slot, a) in &adapters {
        assert_eq!(slot.remove("m"), 1);
        slot.merge(a.clone())?;
    }
    let merged = unet.forward(&x, &t, &ctx, None, Pass::INFERENCE)?;
    let d: f32 = (&merged - &attached)?.abs()?.max_all()?.to_scalar()?;
    assert!(d < 1e-4, "merged differs from attached by {d}");
    // Merged adapters are part of the weights, so even the reference pass sees them.
    let reference = unet.forward(&x, &t, &ctx, None, Pass::REFERENCE)?;
    let d: f32 = (&reference - &merged)?.abs()?.max_all()?.to_scalar()?;
    assert!(d < 1e-6, "{d}");
    for (slot, _) in &adapters {
        assert!(slot.unmerge("m")?);
        assert!(!slot.unmerge("m")?);
    }
    let restored = unet.forward(&x, &t, &ctx, None, Pass::INFERENCE)?;
    let d: f32 = (&restored - &base)?.abs()?.max_all()?.to_scalar()?;
    assert!(d < 1e-4, "unmerge left {d}");
    let moved: f32 = (&attached - &base)?.abs()?.max_all()?.to_scalar()?;
    assert!(moved > 1e-3, "adapters had no effect");
    Ok(())
}
