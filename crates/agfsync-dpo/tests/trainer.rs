//! The trainer: config validation, resume equality, checkpoints, export,
//! full and SFT modes, NaN handling.

mod common;

use std::collections::HashMap;

use agfsync_dpo::checkpoint::{self, ResumeFrom};
use agfsync_dpo::trainer::{train, StepMetrics, TrainConfig, Trainer, ADAPTER_NAME};
use agfsync_dpo::DpoError;
use agfsync_models::lora::{apply_lora, LoraFile, LoraMode, LoraTargets};
use agfsync_models::nn::Pass;
use agfsync_models::tiny::TinyPreset;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use common::{pairs, small_cfg, tiny_spec};

fn snapshot(t: &Trainer) -> Result<HashMap<String, Vec<f32>>> {
    let mut out = HashMap::new();
    for tr in t.trainables() {
        out.insert(
            tr.name.clone(),
            tr.var.as_tensor().flatten_all()?.to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

#[test]
fn invalid_settings_are_refused() {
    for (cfg, what) in [
        (
            TrainConfig {
                beta: 0.0,
                ..TrainConfig::default()
            },
            "beta",
        ),
        (
            TrainConfig {
                beta: -1.0,
                ..TrainConfig::default()
            },
            "beta",
        ),
        (
            TrainConfig {
                lr: 0.0,
                ..TrainConfig::default()
            },
            "lr",
        ),
        (
            TrainConfig {
                lr: -1e-4,
                ..TrainConfig::default()
            },
            "lr",
        ),
        (
            TrainConfig {
                lr: f64::NAN,
                ..TrainConfig::default()
            },
            "lr",
        ),
        (
            TrainConfig {
                batch_size: 0,
                ..TrainConfig::default()
            },
            "batch_size",
        ),
    ] {
        let e = cfg.validate().expect_err(what).to_string();
        assert!(e.contains(what), "{e}");
    }
    // missing fields take their defaults; unknown fields are refused
    let c: TrainConfig = serde_json::from_str(r#"{"steps": 3}"#).expect("defaults");
    assert_eq!(c.beta, 5000.0);
    assert_eq!(c.lora_rank, 4);
    assert_eq!(c.alpha(), 4.0);
    assert_eq!(c.lora_targets, ["to_q", "to_k", "to_v", "to_out.0"]);
    assert!(serde_json::from_str::<TrainConfig>(r#"{"betta": 3}"#).is_err());
}

#[test]
fn resume_is_bit_for_bit_and_mismatches_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd15)?;
    let data = pairs(5, 1, 0.0)?;
    let dev = Device::Cpu;
    let cfg = TrainConfig {
        lr_scheduler: agfsync_dpo::optim::LrScheduler::Cosine,
        warmup_steps: 1,
        ..small_cfg(4)
    };

    // straight: 4 steps
    let straight = dir.path().join("straight");
    let mut seen: Vec<StepMetrics> = Vec::new();
    let s = train(&spec, &data, &cfg, &straight, None, &dev, &mut |m| {
        seen.push(m.clone())
    })?;
    assert_eq!(s.steps, 4);
    assert_eq!(seen.len(), 4);
    // the reference is the same UNet with the (zero-initialised) adapters
    // off: the first step starts exactly at inside = 0
    assert_eq!(seen[0].implicit_acc, Some(0.5));
    assert!(
        (seen[0].loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        seen[0].loss
    );
    assert_eq!(seen[0].reward_margin, Some(0.0));
    for m in &seen {
        assert!(m.loss.is_finite() && m.grad_norm.is_finite());
        assert!(m.implicit_acc.is_some() && m.ref_loss.is_some());
    }
    let lines = std::fs::read_to_string(&s.metrics_path)?;
    assert_eq!(lines.lines().count(), 4);
    // the TensorBoard event file holds the same numbers
    let tb: Vec<_> = std::fs::read_dir(straight.join("tensorboard"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(tb.len(), 1);
    let scalars = agfsync_dpo::tensorboard::read_scalars(&tb[0])?;
    let losses: Vec<f32> = scalars
        .iter()
        .filter(|(_, tag, _)| tag == "train/loss")
        .map(|(_, _, v)| *v)
        .collect();
    let want: Vec<f32> = seen.iter().map(|m| m.loss as f32).collect();
    assert_eq!(losses, want);
    assert!(scalars
        .iter()
        .any(|(s, tag, _)| *s == 4 && tag == "train/implicit_acc"));
    let mut t_straight = Trainer::new(&spec, &cfg, &dev)?;
    checkpoint::load(&mut t_straight, s.last_checkpoint.as_ref().expect("ckpt"))?;

    // interrupted: 2 steps, then resume to 4
    let split = dir.path().join("split");
    let first = TrainConfig {
        steps: 2,
        ..cfg.clone()
    };
    // The interrupted run must use the same schedule length as the straight
    // one to be comparable, so stop it by hand after 2 steps instead.
    let _ = first;
    let mut t = Trainer::new(&spec, &cfg, &dev)?;
    t.train_step(&data)?;
    t.train_step(&data)?;
    let ck = checkpoint::save(&t, &split)?;
    drop(t);
    let s2 = train(
        &spec,
        &data,
        &cfg,
        &split,
        Some(ResumeFrom::Latest),
        &dev,
        &mut |_| {},
    )?;
    assert_eq!(s2.steps, 4);
    let steps: Vec<u64> = std::fs::read_to_string(&s2.metrics_path)?
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["step"]
                .as_u64()
                .expect("step")
        })
        .collect();
    assert_eq!(steps, [3, 4]);
    let mut t_split = Trainer::new(&spec, &cfg, &dev)?;
    checkpoint::load(&mut t_split, s2.last_checkpoint.as_ref().expect("ckpt"))?;
    assert_eq!(t_split.data_position(), t_straight.data_position());
    let (a, b) = (snapshot(&t_straight)?, snapshot(&t_split)?);
    assert!(!a.is_empty());
    for (k, v) in &a {
        assert!(v == &b[k], "{k} differs after resume");
    }
    // the LoRA B matrices moved away from zero
    assert!(a
        .iter()
        .any(|(k, v)| k.ends_with("lora_B.weight") && v.iter().any(|x| *x != 0.0)));
    // the exported files are identical too
    assert_eq!(std::fs::read(&s.output)?, std::fs::read(&s2.output)?);

    // retention: keep_checkpoints = 2
    let kept = checkpoint::list(&straight.join("checkpoints"))?;
    assert_eq!(kept.len(), 2, "{kept:?}");

    // a different config or model is refused, naming the difference
    let other = TrainConfig {
        beta: 2500.0,
        ..cfg.clone()
    };
    let mut t = Trainer::new(&spec, &other, &dev)?;
    let e = checkpoint::load(&mut t, &ck)
        .expect_err("beta differs")
        .to_string();
    assert!(
        e.contains("beta is 5000.0 in the checkpoint but 2500.0 now"),
        "{e}"
    );
    let spec2 = tiny_spec(&dir.path().join("model2"), TinyPreset::Sd2)?;
    let mut t = Trainer::new(&spec2, &cfg, &dev)?;
    let e = checkpoint::load(&mut t, &ck)
        .expect_err("model differs")
        .to_string();
    assert!(e.contains("UNet config differs"), "{e}");
    Ok(())
}

#[test]
fn exported_lora_reproduces_the_trained_policy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd15)?;
    let data = pairs(4, 2, 1.0)?;
    let dev = Device::Cpu;
    let cfg = TrainConfig {
        lora_alpha: Some(8.0),
        ..small_cfg(3)
    };
    let out = dir.path().join("run");
    let s = train(&spec, &data, &cfg, &out, None, &dev, &mut |_| {})?;
    let mut trainer = Trainer::new(&spec, &cfg, &dev)?;
    checkpoint::load(&mut trainer, s.last_checkpoint.as_ref().expect("ckpt"))?;

    let file = LoraFile::load(&s.output)?;
    assert_eq!(file.rank(), 4);
    assert_eq!(file.modules().len() * 2, trainer.trainables().len());
    assert!(file.modules().iter().all(|m| (m.alpha - 8.0).abs() < 1e-12));
    let base = spec.load_unet(&dev)?;
    let targets = LoraTargets {
        unet: base.lora(),
        text_encoder: None,
        text_encoder_2: None,
    };
    let report = apply_lora(&file, &targets, "loaded", 1.0, LoraMode::Attach)?;
    assert_eq!(report.matched, file.modules().len());
    assert!(report.unmatched.is_empty());

    let mut g = agfsync_diffusion::rng::Generator::new(9);
    let x = g.randn((2, 4, 8, 8), DType::F32, &dev)?;
    let ehs = g.randn((2, 8, 32), DType::F32, &dev)?;
    let t = Tensor::new(&[10u32, 700], &dev)?;
    let ours = trainer.unet().forward(&x, &t, &ehs, None, Pass::TRAIN)?;
    let loaded = base.forward(&x, &t, &ehs, None, Pass::TRAIN)?;
    let plain = base.forward(&x, &t, &ehs, None, Pass::REFERENCE)?;
    let d = (&ours - &loaded)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let moved = (&ours - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        d < 1e-6,
        "exported LoRA differs from the trained policy by {d}"
    );
    assert!(moved > 1e-4, "training did not change the model ({moved})");
    // the adapter is attached under its name on the trainer's UNet
    assert!(trainer
        .unet()
        .lora()
        .slots()
        .iter()
        .any(|(_, s)| s.adapters().iter().any(|a| a.name == ADAPTER_NAME)));
    Ok(())
}

#[test]
fn full_and_sft_modes_train() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd2)?;
    let data = pairs(3, 4, 1.0)?;
    let dev = Device::Cpu;
    let full = TrainConfig {
        full: true,
        lr: 1e-4,
        batch_size: 1,
        grad_accum: 1,
        ..small_cfg(2)
    };
    let mut seen = Vec::new();
    let s = train(
        &spec,
        &data,
        &full,
        &dir.path().join("full"),
        None,
        &dev,
        &mut |m| seen.push(m.clone()),
    )?;
    assert!(seen.iter().all(|m| m.loss.is_finite() && m.grad_norm > 0.0));
    let unet_dir = s.output;
    assert!(unet_dir.join("config.json").exists());
    let sched = agfsync_diffusion::schedulers::SchedulerConfig::from_file(
        dir.path().join("model/scheduler/scheduler_config.json"),
    )?;
    let trained = agfsync_dpo::trainer::ModelSpec::from_unet_dir(&unet_dir, &sched)?;
    trained.load_unet(&dev)?;

    let sft = TrainConfig {
        sft: true,
        batch_size: 1,
        grad_accum: 1,
        ..small_cfg(2)
    };
    let mut seen = Vec::new();
    train(
        &spec,
        &data,
        &sft,
        &dir.path().join("sft"),
        None,
        &dev,
        &mut |m| seen.push(m.clone()),
    )?;
    assert!(seen
        .iter()
        .all(|m| m.loss.is_finite() && m.implicit_acc.is_none()));
    Ok(())
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd15)?;
    let dev = Device::Cpu;
    let good = pairs(2, 5, 0.0)?;
    let cfg = TrainConfig {
        batch_size: 1,
        grad_accum: 1,
        checkpoint_every: 1,
        ..small_cfg(1)
    };
    let out = dir.path().join("run");
    let s = train(&spec, &good, &cfg, &out, None, &dev, &mut |_| {})?;
    let ck = s.last_checkpoint.expect("checkpoint");
    let bad_w = (good.latents_w.clone() * f64::NAN)?;
    let bad = agfsync_dpo::data::PairDataset::new(
        bad_w,
        good.latents_l.clone(),
        good.prompt_embeds.clone(),
        None,
    )?;
    let more = TrainConfig { steps: 3, ..cfg };
    let e = train(
        &spec,
        &bad,
        &more,
        &out,
        Some(ResumeFrom::Latest),
        &dev,
        &mut |_| {},
    )
    .expect_err("NaN");
    match e {
        DpoError::NonFinite {
            step,
            last_checkpoint,
            ..
        } => {
            assert_eq!(step, 2);
            assert_eq!(last_checkpoint.as_ref(), Some(&ck));
        }
        e => panic!("unexpected {e}"),
    }
    assert!(ck.join("state.json").exists());
    assert_eq!(checkpoint::read_state(&ck)?.step, 1);
    Ok(())
}

#[test]
fn lora_gradients_match_finite_differences() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd15)?;
    let data = pairs(3, 6, 1.0)?;
    let dev = Device::Cpu;
    // A small beta keeps the f32 loss smooth enough for finite differences.
    let cfg = TrainConfig {
        beta: 20.0,
        batch_size: 2,
        grad_accum: 2,
        ..small_cfg(3)
    };
    let mut t = Trainer::new(&spec, &cfg, &dev)?;
    // move off the zero-initialised B matrices first
    t.train_step(&data)?;
    let g = t.gradients(&data)?;
    // f32 losses carry ~1e-6 of rounding noise: large steps, and an absolute
    // floor in the comparison.
    let eps = 5e-2f32;
    let mut checked = 0;
    for (i, tr) in t.trainables().iter().enumerate().step_by(16) {
        let grad = g.grads[i].as_ref().expect("every adapter gets a gradient");
        let gv: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        let k = gv
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(k, _)| k)
            .unwrap_or(0);
        let orig = tr.var.as_tensor().copy()?;
        let mut v: Vec<f32> = orig.flatten_all()?.to_vec1()?;
        let shape = orig.shape().clone();
        v[k] += eps;
        tr.var
            .set(&Tensor::from_vec(v.clone(), shape.clone(), &dev)?)?;
        let lp = t.gradients(&data)?.loss;
        v[k] -= 2.0 * eps;
        tr.var.set(&Tensor::from_vec(v, shape, &dev)?)?;
        let lm = t.gradients(&data)?.loss;
        tr.var.set(&orig)?;
        let fd = (lp - lm) / (2.0 * eps as f64);
        let an = gv[k] as f64;
        let rel = (fd - an).abs() / an.abs().max(fd.abs()).max(1e-4);
        assert!(
            rel < 5e-2,
            "{}[{k}]: analytic {an} vs numeric {fd}",
            tr.name
        );
        checked += 1;
    }
    assert!(checked >= 3);
    Ok(())
}

/// Writes a tiny pipeline, a LoRA trained and exported by us, UNet inputs
/// and our outputs for `tools/parity/check_dpo_lora_diffusers.py` (which
/// loads the LoRA with diffusers' `load_lora_weights`). Run with
/// `AGFSYNC_DPO_EXPORT_DIR=/tmp/x cargo test -p agfsync-dpo --test trainer
/// -- --ignored export_for_diffusers`.
#[test]
#[ignore = "writes files for a Python check"]
fn export_for_diffusers() -> Result<()> {
    let Ok(out) = std::env::var("AGFSYNC_DPO_EXPORT_DIR") else {
        return Ok(());
    };
    let out = std::path::PathBuf::from(out);
    let spec = tiny_spec(&out.join("pipeline"), TinyPreset::Sd15)?;
    let data = pairs(4, 2, 1.0)?;
    let dev = Device::Cpu;
    let cfg = TrainConfig {
        lora_alpha: Some(8.0),
        ..small_cfg(3)
    };
    let s = train(
        &spec,
        &data,
        &cfg,
        &out.join("run"),
        None,
        &dev,
        &mut |_| {},
    )?;
    let mut trainer = Trainer::new(&spec, &cfg, &dev)?;
    checkpoint::load(&mut trainer, s.last_checkpoint.as_ref().expect("ckpt"))?;
    let mut g = agfsync_diffusion::rng::Generator::new(9);
    let x = g.randn((2, 4, 8, 8), DType::F32, &dev)?;
    let ehs = g.randn((2, 8, 32), DType::F32, &dev)?;
    let t = Tensor::new(&[10f32, 700.0], &dev)?;
    let ours = trainer
        .unet()
        .forward(&x, &t, &ehs, None, Pass::INFERENCE)?;
    let base = trainer
        .unet()
        .forward(&x, &t, &ehs, None, Pass::REFERENCE)?;
    let mut io = HashMap::new();
    io.insert("sample".to_string(), x);
    io.insert("timesteps".to_string(), t);
    io.insert("encoder_hidden_states".to_string(), ehs);
    io.insert("out_lora".to_string(), ours);
    io.insert("out_base".to_string(), base);
    candle_core::safetensors::save(&io, out.join("io.safetensors"))?;
    Ok(())
}

#[test]
fn interrupted_saves_never_hide_the_previous_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd15)?;
    let data = pairs(2, 8, 0.0)?;
    let dev = Device::Cpu;
    let cfg = TrainConfig {
        batch_size: 1,
        grad_accum: 1,
        checkpoint_every: 1,
        ..small_cfg(2)
    };
    let out = dir.path().join("run");
    let s = train(&spec, &data, &cfg, &out, None, &dev, &mut |_| {})?;
    let good = s.last_checkpoint.expect("checkpoint");
    let root = out.join("checkpoints");
    // a crash while writing step 3: a half-written temporary folder
    std::fs::create_dir_all(root.join(".tmp-step-00000003"))?;
    std::fs::write(
        root.join(".tmp-step-00000003/trainable.safetensors"),
        b"partial",
    )?;
    assert_eq!(checkpoint::resolve(&out, &ResumeFrom::Latest)?, good);
    // a crash after the rename but before `latest` was updated is no
    // different; a `latest` naming a missing folder falls back to the
    // newest complete one
    std::fs::write(root.join("latest"), "step-00000009\n")?;
    assert_eq!(checkpoint::resolve(&out, &ResumeFrom::Latest)?, good);
    // resuming from the output folder or the checkpoint folder itself
    assert_eq!(
        checkpoint::resolve(&out, &ResumeFrom::Path(good.clone()))?,
        good
    );
    let more = TrainConfig { steps: 3, ..cfg };
    let s = train(
        &spec,
        &data,
        &more,
        &out,
        Some(ResumeFrom::Path(out.clone())),
        &dev,
        &mut |_| {},
    )?;
    assert_eq!(s.steps, 3);
    assert!(!root.join(".tmp-step-00000003").exists());
    Ok(())
}

#[test]
fn pair_files_are_read_and_bad_ones_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ds = pairs(3, 1, 0.0)?;
    let mut t = HashMap::new();
    t.insert("latents_w".to_string(), ds.latents_w.clone());
    t.insert("latents_l".to_string(), ds.latents_l.clone());
    t.insert("prompt_embeds".to_string(), ds.prompt_embeds.clone());
    let p = dir.path().join("pairs.safetensors");
    candle_core::safetensors::save(&t, &p)?;
    let back = agfsync_dpo::data::PairDataset::load(&p, &Device::Cpu)?;
    assert_eq!(back.len(), 3);
    assert_eq!(back.latent_shape(), (4, 8, 8));
    // the order is a permutation per epoch, fixed by the seed
    let a = back.indices(5, 0, 6);
    assert_eq!(a, back.indices(5, 0, 6));
    let mut e0 = a[..3].to_vec();
    e0.sort();
    assert_eq!(e0, [0, 1, 2]);
    // data that does not fit the model is refused with a clear message
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sdxl)?;
    let e = train(
        &spec,
        &back,
        &small_cfg(1),
        &dir.path().join("x"),
        None,
        &Device::Cpu,
        &mut |_| {},
    )
    .expect_err("sd15-sized embeddings on an SDXL UNet")
    .to_string();
    assert!(e.contains("cross_attention_dim is 64"), "{e}");
    assert_eq!(ResumeFrom::parse("latest"), ResumeFrom::Latest);
    t.remove("prompt_embeds");
    candle_core::safetensors::save(&t, &p)?;
    let e = agfsync_dpo::data::PairDataset::load(&p, &Device::Cpu)
        .expect_err("missing")
        .to_string();
    assert!(e.contains("prompt_embeds"), "{e}");
    Ok(())
}

#[test]
fn sdxl_pairs_with_added_conditioning_train() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sdxl)?;
    let dev = Device::Cpu;
    let mut g = agfsync_diffusion::rng::Generator::new(12);
    let n = 2;
    let added = agfsync_dpo::data::AddedCond {
        text_embeds: g.randn((n, 32), DType::F32, &dev)?,
        time_ids: Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]; 2], &dev)?,
    };
    let data = agfsync_dpo::data::PairDataset::new(
        g.randn((n, 4, 8, 8), DType::F32, &dev)?,
        g.randn((n, 4, 8, 8), DType::F32, &dev)?,
        g.randn((n, 8, 64), DType::F32, &dev)?,
        Some(added),
    )?;
    let cfg = TrainConfig {
        batch_size: 2,
        grad_accum: 1,
        ..small_cfg(2)
    };
    let mut seen = Vec::new();
    let s = train(
        &spec,
        &data,
        &cfg,
        &dir.path().join("run"),
        None,
        &dev,
        &mut |m| seen.push(m.clone()),
    )?;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|m| m.loss.is_finite() && m.grad_norm > 0.0));
    assert!(!LoraFile::load(&s.output)?.modules().is_empty());
    Ok(())
}
