//! The Diffusion-DPO loss against PyTorch (tools/parity/make_dpo_fixtures.py):
//! loss, implicit accuracy, `inside`, targets and d loss / d prediction.

use std::collections::HashMap;
use std::path::PathBuf;

use agfsync_dpo::loss::{self, Target};
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

fn fixtures() -> Result<HashMap<String, Tensor>> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/parity/dpo/dpo_loss.safetensors");
    Ok(candle_core::safetensors::load(p, &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.flatten_all()?.get(0)?.to_scalar::<f64>()?)
}

#[test]
fn dpo_loss_matches_pytorch() -> Result<()> {
    let f = fixtures()?;
    for case in ["eps", "vpred", "tie", "large"] {
        let g = |k: &str| f[&format!("{case}.{k}")].clone();
        let beta = scalar(&g("beta"))?;
        let target = if scalar(&g("v"))? > 0.5 {
            Target::Velocity
        } else {
            Target::Epsilon
        };
        let abar: Vec<f64> = g("abar").to_vec1()?;
        let x_t_w = loss::noisy_latents(&g("x0_w"), &g("noise"), &abar)?;
        assert!(max_abs_diff(&x_t_w, &g("x_t_w"))? < 1e-12, "{case}: x_t");
        let tw = loss::training_target(target, &g("x0_w"), &g("noise"), &abar)?;
        let tl = loss::training_target(target, &g("x0_l"), &g("noise"), &abar)?;
        assert!(
            max_abs_diff(&tw, &g("target_w"))? < 1e-12,
            "{case}: target_w"
        );
        assert!(
            max_abs_diff(&tl, &g("target_l"))? < 1e-12,
            "{case}: target_l"
        );

        let mw = Var::from_tensor(&g("model_w"))?;
        let ml = Var::from_tensor(&g("model_l"))?;
        let out = loss::dpo_loss(
            mw.as_tensor(),
            ml.as_tensor(),
            &g("ref_w"),
            &g("ref_l"),
            &tw,
            &tl,
            beta,
        )?;
        let l = out.loss.to_scalar::<f64>()?;
        let want = scalar(&g("loss"))?;
        assert!(
            (l - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{case}: loss {l} vs torch {want}"
        );
        assert!(l.is_finite());
        let acc = scalar(&g("acc"))?;
        assert!(
            (out.implicit_acc - acc).abs() < 1e-12,
            "{case}: acc {} vs {acc}",
            out.implicit_acc
        );
        let scale = g("inside").abs()?.max(0)?.to_scalar::<f64>()?.max(1.0);
        assert!(
            max_abs_diff(&out.inside, &g("inside"))? <= 1e-6 * scale,
            "{case}: inside"
        );
        let grads = out.loss.backward()?;
        for (var, key) in [(&mw, "grad_w"), (&ml, "grad_l")] {
            let gr = grads.get(var.as_tensor()).expect("gradient");
            let want = g(key);
            let scale = want
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?
                .max(1e-12);
            let d = max_abs_diff(gr, &want)?;
            assert!(
                d <= 1e-6 * scale,
                "{case}: {key} differs by {d} (scale {scale})"
            );
        }

        let sw = Var::from_tensor(&g("model_w"))?;
        let sft = loss::sft_loss(sw.as_tensor(), &tw)?;
        assert!(
            (sft.to_scalar::<f64>()? - scalar(&g("sft"))?).abs() < 1e-9,
            "{case}: sft"
        );
        let sg = sft.backward()?;
        let d = max_abs_diff(sg.get(sw.as_tensor()).expect("grad"), &g("sft_grad_w"))?;
        assert!(d < 1e-9, "{case}: sft grad {d}");
    }
    Ok(())
}

#[test]
fn softplus_is_stable_and_has_the_right_gradient() -> Result<()> {
    let xs: [f64; 8] = [-1e4, -50.0, -1.0, 0.0, 1e-9, 1.0, 50.0, 1e4];
    let v = Var::from_tensor(&Tensor::new(&xs, &Device::Cpu)?)?;
    let y = loss::softplus(v.as_tensor())?;
    let g = y.sum_all()?.backward()?;
    let ys: Vec<f64> = y.to_vec1()?;
    let gs: Vec<f64> = g.get(v.as_tensor()).expect("grad").to_vec1()?;
    for ((x, y), gr) in xs.iter().zip(ys).zip(gs) {
        let want = if *x > 30.0 { *x } else { x.exp().ln_1p() };
        let sig = 1.0 / (1.0 + (-x).exp());
        assert!(
            (y - want).abs() < 1e-12 * want.abs().max(1.0),
            "softplus({x}) = {y}"
        );
        assert!(
            (gr - sig).abs() < 1e-12,
            "softplus'({x}) = {gr}, want {sig}"
        );
    }
    Ok(())
}

#[test]
fn f32_inputs_agree_with_f64() -> Result<()> {
    let f = fixtures()?;
    let g = |k: &str| f[&format!("eps.{k}")].to_dtype(candle_core::DType::F32);
    let out = loss::dpo_loss(
        &g("model_w")?,
        &g("model_l")?,
        &g("ref_w")?,
        &g("ref_l")?,
        &g("target_w")?,
        &g("target_l")?,
        5000.0,
    )?;
    let l = f64::from(out.loss.to_scalar::<f32>()?);
    let want = scalar(&f["eps.loss"])?;
    // beta = 5000 amplifies f32 rounding of the errors (~1e-7 relative)
    assert!((l - want).abs() < 2e-3, "f32 loss {l} vs {want}");
    Ok(())
}
