//! AdamW, gradient clipping and LR schedules against PyTorch / diffusers
//! (tools/parity/make_dpo_fixtures.py).

use std::path::PathBuf;

use agfsync_dpo::optim::{clip_grad_norm, AdamW, AdamWParams, LrScheduler};
use anyhow::Result;
use candle_core::{Device, IndexOp, Var};

#[test]
fn adamw_and_schedules_match_pytorch() -> Result<()> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/parity/dpo/dpo_loss.safetensors");
    let f = candle_core::safetensors::load(p, &Device::Cpu)?;
    let var = Var::from_tensor(&f["adamw.p0"])?;
    let mut opt = AdamW::new(
        vec![var.clone()],
        AdamWParams {
            weight_decay: 1e-2,
            ..AdamWParams::default()
        },
    )?;
    let norms: Vec<f64> = f["adamw.norms"].to_vec1()?;
    for (k, want) in norms.iter().enumerate() {
        let mut g = vec![Some(f["adamw.grads"].i(k)?)];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - want).abs() < 1e-12, "norm {n} vs {want}");
        opt.step(&g, 1e-2)?;
    }
    let d = (var.as_tensor() - &f["adamw.p4"])?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    assert!(d < 1e-12, "AdamW differs from torch by {d}");

    for (name, s) in [
        ("constant", LrScheduler::Constant),
        ("constant_with_warmup", LrScheduler::ConstantWithWarmup),
        ("cosine", LrScheduler::Cosine),
    ] {
        let want: Vec<f64> = f[&format!("lr.{name}")].to_vec1()?;
        for (step, w) in want.iter().enumerate() {
            let got = s.lr_at(0.5, step, 3, 12);
            assert!((got - w).abs() < 1e-12, "{name} step {step}: {got} vs {w}");
        }
    }
    Ok(())
}
