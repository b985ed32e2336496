//! The planted-preference test: on a tiny model, pairs whose winners all
//! share a property (channel 0 shifted up, "redder") must teach a LoRA DPO
//! run to prefer it: held-out implicit accuracy well above 0.5, and the
//! model's denoised predictions move toward the property compared with the
//! base model on the same inputs. Fixed seeds throughout.

mod common;

use agfsync_diffusion::rng::Generator;
use agfsync_dpo::data::PairDataset;
use agfsync_dpo::trainer::{TrainConfig, Trainer};
use agfsync_models::nn::Pass;
use agfsync_models::tiny::TinyPreset;
use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor};

use common::{pairs, tiny_spec};

/// Mean of channel 0 of the x0 predicted from noisy versions of held-out
/// loser latents (which lack the property), at t = 300, 600 and 900 with
/// noises drawn from `seed`, with adapters on (tuned) or off (base).
fn denoised_channel0(
    trainer: &Trainer,
    data: &PairDataset,
    alphas: &[f64],
    adapters: bool,
    seed: u64,
) -> Result<Vec<f64>> {
    let dev = Device::Cpu;
    let n = data.len();
    let mut g = Generator::new(seed);
    let mut out = Vec::new();
    let ts = [300u32, 600, 900];
    for &t in &ts {
        let noise = g.randn((n, 4, 8, 8), DType::F32, &dev)?;
        let a = alphas[t as usize];
        let x0 = &data.latents_l;
        let xt = ((x0 * a.sqrt())? + (&noise * (1.0 - a).sqrt())?)?;
        let tt = Tensor::from_vec(vec![t; n], n, &dev)?;
        let pass = if adapters {
            Pass::INFERENCE
        } else {
            Pass::REFERENCE
        };
        let eps = trainer
            .unet()
            .forward(&xt, &tt, &data.prompt_embeds, None, pass)?;
        let x0_hat = ((xt - (eps * (1.0 - a).sqrt())?)? / a.sqrt())?;
        let v = x0_hat.i((.., 0))?.mean_all()?.to_scalar::<f32>()? as f64;
        out.push(v);
    }
    Ok(out)
}

/// Mean of channel 0 of latents sampled with 20 DDIM steps (no guidance)
/// from seeded noise, conditioned on the held-out prompts, with adapters on
/// (tuned) or off (base): the same seeds for both.
fn sampled_channel0(trainer: &Trainer, data: &PairDataset, adapters: bool) -> Result<f64> {
    let dev = Device::Cpu;
    let sched_cfg = agfsync_diffusion::schedulers::SchedulerConfig::from_json_str(
        &agfsync_models::tiny::tiny_scheduler_config(TinyPreset::Sd15).to_string(),
    )?;
    let mut sched = agfsync_diffusion::schedulers::build(
        agfsync_diffusion::schedulers::SchedulerKind::Ddim,
        &sched_cfg,
    )?;
    sched.set_timesteps(20)?;
    let n = data.len();
    let mut g = Generator::new(31);
    let mut x = (g.randn((n, 4, 8, 8), DType::F32, &dev)? * sched.init_noise_sigma())?;
    let pass = if adapters {
        Pass::INFERENCE
    } else {
        Pass::REFERENCE
    };
    let steps = sched.timesteps().to_vec();
    for (i, &t) in steps.iter().enumerate() {
        let inp = sched.scale_model_input(&x, i)?;
        let tt = Tensor::from_vec(vec![t as f32; n], n, &dev)?;
        let eps = trainer
            .unet()
            .forward(&inp, &tt, &data.prompt_embeds, None, pass)?;
        x = sched.step(&eps, i, &x, &mut g)?;
    }
    Ok(x.i((.., 0))?.mean_all()?.to_scalar::<f32>()? as f64)
}

#[test]
fn planted_preference_is_learned() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = tiny_spec(&dir.path().join("model"), TinyPreset::Sd15)?;
    let dev = Device::Cpu;
    let train_set = pairs(16, 100, 2.0)?;
    let held_out = pairs(8, 200, 2.0)?;
    let cfg = TrainConfig {
        steps: 20,
        lr: 2e-3,
        beta: 1000.0,
        batch_size: 4,
        grad_accum: 1,
        seed: 7,
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&spec, &cfg, &dev)?;
    let idx: Vec<usize> = (0..held_out.len()).collect();
    let before = trainer.evaluate(&held_out, &idx, 4, 99)?;
    let base_c0 = denoised_channel0(&trainer, &held_out, &spec.alphas_cumprod, false, 5)?;
    let start = std::time::Instant::now();
    for _ in 0..cfg.steps {
        let m = trainer.train_step(&train_set)?;
        assert!(m.loss.is_finite());
    }
    let after = trainer.evaluate(&held_out, &idx, 4, 99)?;
    let tuned_c0 = denoised_channel0(&trainer, &held_out, &spec.alphas_cumprod, true, 5)?;
    eprintln!(
        "train {:?}; held-out acc {} -> {}, margin {} -> {}; channel-0 of x0_hat base {base_c0:?} tuned {tuned_c0:?}",
        start.elapsed(),
        before.implicit_acc,
        after.implicit_acc,
        before.reward_margin,
        after.reward_margin
    );
    assert!(
        after.implicit_acc > 0.8,
        "held-out implicit accuracy {}",
        after.implicit_acc
    );
    assert!(after.reward_margin > 0.0);
    // At every noise level the tuned model denoises toward redder latents.
    for (b, t) in base_c0.iter().zip(&tuned_c0) {
        assert!(t > b, "x0 channel 0: base {base_c0:?}, tuned {tuned_c0:?}");
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&tuned_c0) > mean(&base_c0) + 0.01,
        "x0 channel 0: base {base_c0:?}, tuned {tuned_c0:?}"
    );
    // Whole samples, same seeds: the tuned model's latents are redder.
    let base_sample = sampled_channel0(&trainer, &held_out, false)?;
    let tuned_sample = sampled_channel0(&trainer, &held_out, true)?;
    eprintln!("sampled channel 0: base {base_sample}, tuned {tuned_sample}");
    assert!(
        tuned_sample > base_sample + 0.01,
        "sampled channel 0: base {base_sample}, tuned {tuned_sample}"
    );
    Ok(())
}
