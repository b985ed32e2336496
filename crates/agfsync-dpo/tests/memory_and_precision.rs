//! Gradient checkpointing gives the gradients of the ordinary graph, and
//! mixed precision (bf16/f16 compute, f32 trained weights) trains with f32
//! masters and stays close to f32.

mod common;

use agfsync_dpo::checkpoint::ResumeFrom;
use agfsync_dpo::data::{AddedCond, PairDataset};
use agfsync_dpo::trainer::{train, ModelSpec, TrainConfig, TrainDtype, Trainer};
use agfsync_dpo::DpoError;
use agfsync_models::tiny::TinyPreset;
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};

use common::{pairs, small_cfg, tiny_spec};

/// Largest absolute difference between two gradient lists, relative to the
/// largest gradient entry; also checks both have the same `None`s.
fn max_rel_diff(a: &[Option<Tensor>], b: &[Option<Tensor>]) -> Result<f32> {
    let (mut diff, mut scale) = (0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (Some(x), Some(y)) => {
                diff = diff.max((x - y)?.abs()?.max_all()?.to_scalar::<f32>()?);
                scale = scale.max(x.abs()?.max_all()?.to_scalar::<f32>()?);
            }
            (None, None) => {}
            _ => return Err(anyhow!("a gradient is missing on one side")),
        }
    }
    if scale == 0.0 {
        return Err(anyhow!(
            "all gradients are zero: the comparison proves nothing"
        ));
    }
    Ok(diff / scale)
}

fn cosine(a: &[Option<Tensor>], b: &[Option<Tensor>]) -> Result<f64> {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        if let (Some(x), Some(y)) = (x, y) {
            let x = x.to_dtype(DType::F64)?;
            let y = y.to_dtype(DType::F64)?;
            dot += (&x * &y)?.sum_all()?.to_scalar::<f64>()?;
            na += x.sqr()?.sum_all()?.to_scalar::<f64>()?;
            nb += y.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    Ok(dot / (na.sqrt() * nb.sqrt()).max(1e-30))
}

/// Gives every all-zero trainable (the LoRA `up` matrices at init) small
/// seeded values, so that every adapter tensor gets a gradient.
fn perturb_zeros(t: &Trainer) -> Result<()> {
    let mut g = agfsync_diffusion::rng::Generator::new(77);
    for tr in t.trainables() {
        let v = tr.var.as_tensor();
        if v.abs()?.max_all()?.to_scalar::<f32>()? == 0.0 {
            tr.var
                .set(&(g.randn(v.shape(), DType::F32, v.device())? * 0.05)?)?;
        }
    }
    Ok(())
}

/// Compares the first step's gradients with and without checkpointing,
/// from the same state. (Not after an optimizer step: AdamW normalises each
/// entry, so float-order differences in near-zero gradients would grow to
/// learning-rate-sized differences in the weights.)
fn compare_gradients(
    spec: &ModelSpec,
    data: &PairDataset,
    cfg: &TrainConfig,
) -> Result<(f32, f64)> {
    let dev = Device::Cpu;
    let plain = Trainer::new(spec, cfg, &dev)?;
    let ckpt = Trainer::new(
        spec,
        &TrainConfig {
            gradient_checkpointing: true,
            ..cfg.clone()
        },
        &dev,
    )?;
    perturb_zeros(&plain)?;
    perturb_zeros(&ckpt)?;
    let g1 = plain.gradients(data)?;
    let g2 = ckpt.gradients(data)?;
    assert_eq!(
        g1.loss, g2.loss,
        "the checkpointed forward changed the loss"
    );
    Ok((
        max_rel_diff(&g1.grads, &g2.grads)?,
        cosine(&g1.grads, &g2.grads)?,
    ))
}

#[test]
fn checkpointed_gradients_equal_the_plain_graph() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sd15 = tiny_spec(&dir.path().join("sd15"), TinyPreset::Sd15)?;
    let data = pairs(4, 21, 1.0)?;
    let base = TrainConfig {
        lr: 1e-2,
        batch_size: 2,
        grad_accum: 1,
        ..small_cfg(4)
    };
    // LoRA on the attention projections.
    let (rel, cos) = compare_gradients(&sd15, &data, &base)?;
    assert!(rel < 1e-5 && cos > 0.999_999, "lora: rel {rel}, cos {cos}");
    // The whole UNet: every parameter, the time embedding included.
    let full = TrainConfig {
        full: true,
        lr: 1e-4,
        ..base.clone()
    };
    let (rel, cos) = compare_gradients(&sd15, &data, &full)?;
    assert!(rel < 1e-5 && cos > 0.999_999, "full: rel {rel}, cos {cos}");
    // The SFT baseline.
    let sft = TrainConfig {
        sft: true,
        ..base.clone()
    };
    let (rel, cos) = compare_gradients(&sd15, &data, &sft)?;
    assert!(rel < 1e-5 && cos > 0.999_999, "sft: rel {rel}, cos {cos}");

    // SDXL: the added (text, time) embedding runs inside a unit too.
    let sdxl = tiny_spec(&dir.path().join("sdxl"), TinyPreset::Sdxl)?;
    let dev = Device::Cpu;
    let mut g = agfsync_diffusion::rng::Generator::new(5);
    let n = 2;
    let added = AddedCond {
        text_embeds: g.randn((n, 32), DType::F32, &dev)?,
        time_ids: Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]; 2], &dev)?,
    };
    let xl = PairDataset::new(
        g.randn((n, 4, 8, 8), DType::F32, &dev)?,
        g.randn((n, 4, 8, 8), DType::F32, &dev)?,
        g.randn((n, 8, 64), DType::F32, &dev)?,
        Some(added),
    )?;
    let (rel, cos) = compare_gradients(&sdxl, &xl, &full)?;
    assert!(
        rel < 1e-5 && cos > 0.999_999,
        "sdxl full: rel {rel}, cos {cos}"
    );
    Ok(())
}

#[test]
fn bf16_lora_keeps_f32_adapters_and_follows_f32() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd15)?;
    let data = pairs(4, 22, 1.0)?;
    let dev = Device::Cpu;
    let cfg = TrainConfig {
        lr: 1e-2,
        batch_size: 2,
        grad_accum: 1,
        ..small_cfg(3)
    };
    for dtype in [TrainDtype::Bf16, TrainDtype::F16] {
        let low_cfg = TrainConfig {
            dtype,
            ..cfg.clone()
        };
        let mut low = Trainer::new(&spec, &low_cfg, &dev)?;
        assert_eq!(low.unet().dtype(), dtype.dtype());
        assert!(low.trainables().iter().all(|t| t.var.dtype() == DType::F32));
        let before: Vec<Vec<f32>> = low
            .trainables()
            .iter()
            .map(|t| t.var.as_tensor().flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let m = low.train_step(&data)?;
        assert!(m.loss.is_finite() && m.grad_norm > 0.0, "{dtype:?}: {m:?}");
        let changed = low
            .trainables()
            .iter()
            .zip(&before)
            .filter(|(t, b)| {
                t.var
                    .as_tensor()
                    .flatten_all()
                    .and_then(|v| v.to_vec1::<f32>())
                    .is_ok_and(|v| &v != *b)
            })
            .count();
        assert!(changed > 0, "{dtype:?}: no adapter moved");
    }
    // From the same state (adapters given small values, not an optimizer
    // step: after one, the f32 loss is already saturated while beta = 5000
    // times bf16's rounding of the errors is not, which says nothing about
    // the gradients' quality), low-precision gradients point the way f32's
    // do, for DPO and SFT.
    for sft in [false, true] {
        let cfg = TrainConfig { sft, ..cfg.clone() };
        let f32_run = Trainer::new(&spec, &cfg, &dev)?;
        let low = Trainer::new(
            &spec,
            &TrainConfig {
                dtype: TrainDtype::Bf16,
                ..cfg.clone()
            },
            &dev,
        )?;
        perturb_zeros(&f32_run)?;
        perturb_zeros(&low)?;
        let g32 = f32_run.gradients(&data)?;
        let g16 = low.gradients(&data)?;
        assert!(g16.grads.iter().flatten().all(|g| g.dtype() == DType::F32));
        let cos = cosine(&g32.grads, &g16.grads)?;
        assert!(
            cos > 0.99,
            "sft {sft}: bf16 gradients diverge from f32: cos {cos}"
        );
    }
    Ok(())
}

#[test]
fn bf16_full_training_updates_f32_masters() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd2)?;
    let data = pairs(3, 23, 1.0)?;
    let dev = Device::Cpu;
    let cfg = TrainConfig {
        full: true,
        dtype: TrainDtype::Bf16,
        gradient_checkpointing: true,
        lr: 1e-4,
        batch_size: 1,
        grad_accum: 1,
        ..small_cfg(2)
    };
    let mut seen = Vec::new();
    let out = dir.path().join("run");
    let s = train(&spec, &data, &cfg, &out, None, &dev, &mut |m| {
        seen.push(m.clone())
    })?;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|m| m.loss.is_finite() && m.grad_norm > 0.0));
    // The exported UNet holds the f32 masters, and they moved.
    let sched = agfsync_diffusion::schedulers::SchedulerConfig::from_file(
        dir.path().join("model/scheduler/scheduler_config.json"),
    )?;
    let trained = ModelSpec::from_unet_dir(&s.output, &sched)?;
    let a = spec.load_unet(&dev)?;
    let b = trained.load_unet(&dev)?;
    assert_eq!(b.dtype(), DType::F32);
    let x = pairs(1, 24, 0.0)?;
    let t = Tensor::new(&[500u32], &dev)?;
    let pa = a.forward(
        &x.latents_w,
        &t,
        &x.prompt_embeds,
        None,
        agfsync_models::nn::Pass::INFERENCE,
    )?;
    let pb = b.forward(
        &x.latents_w,
        &t,
        &x.prompt_embeds,
        None,
        agfsync_models::nn::Pass::INFERENCE,
    )?;
    let moved = (pa - pb)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(moved > 0.0, "full bf16 training left the UNet unchanged");

    // Resuming that run in f32 is refused, naming the dtype.
    let f32_cfg = TrainConfig {
        dtype: TrainDtype::F32,
        steps: 3,
        ..cfg.clone()
    };
    let err = train(
        &spec,
        &data,
        &f32_cfg,
        &out,
        Some(ResumeFrom::Latest),
        &dev,
        &mut |_| {},
    )
    .err()
    .ok_or_else(|| anyhow!("a resume in another dtype was accepted"))?;
    assert!(
        matches!(err, DpoError::ResumeMismatch { .. }) && err.to_string().contains("dtype"),
        "{err}"
    );
    Ok(())
}
