//! Scheduler parity with diffusers (fixtures from `tools/parity/make_scheduler_fixtures.py`)
//! and behaviour tests.

use std::path::PathBuf;

use agfsync_diffusion::rng::Generator;
use agfsync_diffusion::schedulers::{
    build, DdimScheduler, DdpmScheduler, DpmSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LcmOptions, LcmScheduler, Scheduler,
    SchedulerConfig, SchedulerError, SchedulerKind,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// Relative tolerance for sigmas and trajectories (f32 arithmetic on both sides).
const REL_TOL: f64 = 1e-4;
/// Absolute floor for elements near zero.
const ABS_FLOOR: f64 = 1e-5;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/schedulers")
}

fn load(name: &str) -> Result<Value> {
    let path = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn floats(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .context("expected an array")?
        .iter()
        .map(|x| x.as_f64().context("expected a number"))
        .collect()
}

fn tensor(values: &[f64], shape: &[usize]) -> Result<Tensor> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn sample() -> Result<(Tensor, Vec<usize>)> {
    let common = load("common.json")?;
    let shape: Vec<usize> = floats(&common["sample_shape"])?
        .into_iter()
        .map(|x| x as usize)
        .collect();
    Ok((tensor(&floats(&common["sample"])?, &shape)?, shape))
}

fn case_config(case: &Value) -> Result<SchedulerConfig> {
    if let Some(file) = case["config_file"].as_str() {
        Ok(SchedulerConfig::from_file(fixtures_dir().join(file))?)
    } else {
        Ok(serde_json::from_value(case["config"].clone())?)
    }
}

fn describe(case: &Value) -> String {
    let cfg = if case["config_file"].is_string() {
        case["config_file"].to_string()
    } else {
        case["config"].to_string()
    };
    let cfg: String = cfg.chars().take(300).collect();
    format!("{cfg} steps={}", case["num_inference_steps"])
}

/// Max relative error of `got` against `want`, with an absolute floor.
fn check_close(what: &str, got: &[f64], want: &[f64], rel: f64) -> Result<f64> {
    if got.len() != want.len() {
        bail!(
            "{what}: length {} != expected {}\n got {got:?}\nwant {want:?}",
            got.len(),
            want.len()
        );
    }
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let allowed = rel * w.abs() + ABS_FLOOR;
        if err.is_nan() || err > allowed {
            bail!(
                "{what}[{i}]: got {g}, expected {w} (rel tol {rel})\n got {got:?}\nwant {want:?}"
            );
        }
        worst = worst.max(err / w.abs().max(1e-3));
    }
    Ok(worst)
}

/// Timesteps: exact (1e-9) when diffusers' are integers, else 1e-4 relative.
fn check_timesteps(got: &[f64], want: &[f64]) -> Result<()> {
    if got.len() != want.len() {
        bail!("timesteps: got {got:?}, expected {want:?}");
    }
    for (&g, &w) in got.iter().zip(want) {
        let ok = if w.fract() == 0.0 {
            (g - w).abs() <= 1e-9
        } else {
            (g - w).abs() <= 1e-4 * w.abs().max(1.0)
        };
        if !ok {
            bail!("timesteps: got {got:?}, expected {want:?}");
        }
    }
    Ok(())
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// How a trajectory step is taken: by the trait (`None` noise) or with replayed noise.
type StepFn<'a, S> =
    &'a mut dyn FnMut(&mut S, &Tensor, usize, &Tensor, Option<&Tensor>) -> Result<Tensor>;

/// Runs the fixture's toy model loop; `noise[i]` is passed to step `i`.
fn trajectory<S: Scheduler + ?Sized>(
    s: &mut S,
    sample: &Tensor,
    noise: &[Tensor],
    step: StepFn<'_, S>,
) -> Result<Tensor> {
    let mut x = (sample * s.init_noise_sigma())?;
    let timesteps = s.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let inp = s.scale_model_input(&x, i)?;
        let out = (inp * 0.3)?.affine(1.0, 0.1 * (t / 100.0).sin())?;
        x = step(s, &out, i, &x, noise.get(i))?;
    }
    Ok(x)
}

fn case_noise(case: &Value, shape: &[usize]) -> Result<Vec<Tensor>> {
    match case["noise"].as_array() {
        None => Ok(Vec::new()),
        Some(list) => list.iter().map(|n| tensor(&floats(n)?, shape)).collect(),
    }
}

#[derive(Default)]
struct Report {
    cases: usize,
    trajectories: usize,
    worst_sigma: f64,
    worst_sample: f64,
}

/// Checks one case: schedule, sigmas, init_noise_sigma and (if present) the trajectory.
fn check_case<S: Scheduler + ?Sized>(
    s: &mut S,
    case: &Value,
    report: &mut Report,
    step: StepFn<'_, S>,
) -> Result<()> {
    let (sample, shape) = sample()?;
    let steps = case["num_inference_steps"].as_u64().context("steps")? as usize;
    s.set_timesteps(steps)?;
    check_timesteps(s.timesteps(), &floats(&case["timesteps"])?)?;
    if case["sigmas"].is_array() {
        let got = s.sigmas().context("scheduler has no sigmas")?;
        let w = check_close("sigmas", got, &floats(&case["sigmas"])?, REL_TOL)?;
        report.worst_sigma = report.worst_sigma.max(w);
    }
    let want_sigma = case["init_noise_sigma"]
        .as_f64()
        .context("init_noise_sigma")?;
    check_close(
        "init_noise_sigma",
        &[s.init_noise_sigma()],
        &[want_sigma],
        1e-5,
    )?;
    if case["final_sample"].is_array() {
        let noise = case_noise(case, &shape)?;
        let got = trajectory(s, &sample, &noise, step)?;
        let w = check_close(
            "final_sample",
            &flat(&got)?,
            &floats(&case["final_sample"])?,
            REL_TOL,
        )?;
        report.worst_sample = report.worst_sample.max(w);
        report.trajectories += 1;
    }
    report.cases += 1;
    Ok(())
}

fn run_fixture(
    file: &str,
    mut run: impl FnMut(&Value, &SchedulerConfig, &mut Report) -> Result<()>,
) -> Result<()> {
    let fixture = load(file)?;
    let mut report = Report::default();
    for case in fixture["cases"].as_array().context("cases")? {
        let config = case_config(case)?;
        run(case, &config, &mut report).with_context(|| format!("{file}: {}", describe(case)))?;
    }
    eprintln!(
        "{file}: {} cases, {} trajectories, worst relative error: sigmas {:.2e}, samples {:.2e}",
        report.cases, report.trajectories, report.worst_sigma, report.worst_sample
    );
    assert!(report.cases > 0);
    Ok(())
}

fn trait_step<S: Scheduler>(
    s: &mut S,
    out: &Tensor,
    i: usize,
    x: &Tensor,
    _noise: Option<&Tensor>,
) -> Result<Tensor> {
    let mut rng = Generator::new(0);
    Ok(s.step(out, i, x, &mut rng)?)
}

#[test]
fn alphas_cumprod_match_diffusers() -> Result<()> {
    let common = load("common.json")?;
    for (name, entry) in common["alphas_cumprod"].as_object().context("alphas")? {
        let config: SchedulerConfig = serde_json::from_value(entry["config"].clone())?;
        let got = config.alphas_cumprod()?;
        let worst = check_close(name, &got, &floats(&entry["alphas_cumprod"])?, 1e-6)?;
        eprintln!("alphas_cumprod {name}: worst relative error {worst:.2e}");
    }
    Ok(())
}

#[test]
fn ddim_matches_diffusers() -> Result<()> {
    run_fixture("ddim.json", |case, config, report| {
        let eta = case["eta"].as_f64().unwrap_or(0.0);
        let mut s = DdimScheduler::new(config, eta)?;
        check_case(&mut s, case, report, &mut |s, out, i, x, noise| {
            Ok(s.step_with_noise(out, i, x, noise)?)
        })
    })
}

#[test]
fn euler_matches_diffusers() -> Result<()> {
    run_fixture("euler.json", |case, config, report| {
        let mut s = EulerDiscreteScheduler::new(config)?;
        check_case(&mut s, case, report, &mut trait_step)
    })
}

#[test]
fn euler_ancestral_matches_diffusers_with_replayed_noise() -> Result<()> {
    run_fixture("euler_ancestral.json", |case, config, report| {
        let mut s = EulerAncestralDiscreteScheduler::new(config)?;
        check_case(&mut s, case, report, &mut |s, out, i, x, noise| {
            Ok(s.step_with_noise(out, i, x, noise.context("noise")?)?)
        })
    })
}

#[test]
fn dpm_solver_matches_diffusers() -> Result<()> {
    run_fixture("dpm_solver_multistep.json", |case, config, report| {
        let mut s = DpmSolverMultistepScheduler::new(config)?;
        check_case(&mut s, case, report, &mut |s, out, i, x, noise| {
            Ok(s.step_with_noise(out, i, x, noise)?)
        })
    })
}

#[test]
fn ddpm_matches_diffusers_with_replayed_noise() -> Result<()> {
    run_fixture("ddpm.json", |case, config, report| {
        let mut s = DdpmScheduler::new(config)?;
        check_case(&mut s, case, report, &mut |s, out, i, x, noise| {
            Ok(s.step_with_noise(out, i, x, noise)?)
        })
    })
}

#[test]
fn configs_written_by_diffusers_load_and_match() -> Result<()> {
    run_fixture("from_config_files.json", |case, config, report| {
        let kind: SchedulerKind = case["kind"].as_str().context("kind")?.parse()?;
        let mut s = build(kind, config)?;
        check_case(s.as_mut(), case, report, &mut |s, out, i, x, _| {
            let mut rng = Generator::new(0);
            Ok(s.step(out, i, x, &mut rng)?)
        })
    })
}

#[test]
fn ddpm_training_utilities_match_diffusers() -> Result<()> {
    let fixture = load("ddpm.json")?;
    let training = &fixture["training"];
    let shape: Vec<usize> = floats(&training["shape"])?
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let x0 = tensor(&floats(&training["x0"])?, &shape)?;
    let noise = tensor(&floats(&training["noise"])?, &shape)?;
    let ts = floats(&training["timesteps"])?;
    let dev = Device::Cpu;
    let timestep_tensors = [
        Tensor::new(ts.iter().map(|&t| t as i64).collect::<Vec<_>>(), &dev)?,
        Tensor::new(ts.iter().map(|&t| t as u32).collect::<Vec<_>>(), &dev)?,
        Tensor::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), &dev)?,
    ];
    for case in training["cases"].as_array().context("cases")? {
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone())?;
        let s = DdpmScheduler::new(&config)?;
        for t in &timestep_tensors {
            let noisy = s.add_noise(&x0, &noise, t)?;
            check_close(
                "add_noise",
                &flat(&noisy)?,
                &floats(&case["add_noise"])?,
                1e-5,
            )?;
            let v = s.get_velocity(&x0, &noise, t)?;
            check_close(
                "get_velocity",
                &flat(&v)?,
                &floats(&case["get_velocity"])?,
                1e-5,
            )?;
        }
    }
    // a single timestep broadcasts over the batch; out-of-range timesteps are errors
    let s = DdpmScheduler::new(&SchedulerConfig::default())?;
    let one = Tensor::new(&[500u32], &dev)?;
    assert_eq!(s.add_noise(&x0, &noise, &one)?.dims(), x0.dims());
    assert!(s
        .add_noise(&x0, &noise, &Tensor::new(&[1000u32, 0, 0], &dev)?)
        .is_err());
    assert!(s
        .add_noise(&x0, &noise, &Tensor::new(&[1u32, 2], &dev)?)
        .is_err());
    // sampled timesteps are in range and reproducible
    let a = s
        .sample_timesteps(64, &mut Generator::new(3), &dev)?
        .to_vec1::<u32>()?;
    let b = s
        .sample_timesteps(64, &mut Generator::new(3), &dev)?
        .to_vec1::<u32>()?;
    assert_eq!(a, b);
    assert!(a.iter().all(|&t| t < 1000));
    Ok(())
}

#[test]
fn unknown_scheduler_name_lists_valid_names() {
    let err = "heun"
        .parse::<SchedulerKind>()
        .expect_err("heun is not offered");
    assert!(matches!(err, SchedulerError::UnknownScheduler { .. }));
    let msg = err.to_string();
    assert!(msg.contains("heun"), "{msg}");
    for name in SchedulerKind::NAMES {
        assert!(msg.contains(name), "{msg} should list {name}");
    }
    let err =
        SchedulerKind::from_class_name("HeunDiscreteScheduler").expect_err("unsupported class");
    assert!(err.to_string().contains("DDIMScheduler"), "{err}");
}

#[test]
fn scheduler_names_round_trip() -> Result<()> {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.to_string().parse::<SchedulerKind>()?, kind);
    }
    assert_eq!(
        "euler-a".parse::<SchedulerKind>()?,
        SchedulerKind::EulerAncestral
    );
    assert_eq!(
        " DPM++2M-Karras ".parse::<SchedulerKind>()?,
        SchedulerKind::DpmPlusPlus2MKarras
    );
    let map = [
        ("DDIMScheduler", SchedulerKind::Ddim),
        ("PNDMScheduler", SchedulerKind::Ddim),
        ("EulerDiscreteScheduler", SchedulerKind::Euler),
        ("LMSDiscreteScheduler", SchedulerKind::Euler),
        (
            "EulerAncestralDiscreteScheduler",
            SchedulerKind::EulerAncestral,
        ),
        ("DPMSolverMultistepScheduler", SchedulerKind::DpmPlusPlus2M),
        ("DDPMScheduler", SchedulerKind::Ddpm),
        ("LCMScheduler", SchedulerKind::Lcm),
    ];
    for (class, kind) in map {
        assert_eq!(SchedulerKind::from_class_name(class)?, kind);
    }
    let dpm = SchedulerConfig::from_file(fixtures_dir().join("scheduler_config_dpm.json"))?;
    assert!(dpm.lambda_min_clipped.is_infinite());
    assert_eq!(
        SchedulerKind::from_config(&dpm)?,
        SchedulerKind::DpmPlusPlus2MKarras
    );
    let pndm = SchedulerConfig::from_file(fixtures_dir().join("scheduler_config_pndm.json"))?;
    assert_eq!(SchedulerKind::from_config(&pndm)?, SchedulerKind::Ddim);
    Ok(())
}

#[test]
fn invalid_step_counts_are_errors() -> Result<()> {
    let config = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        let mut s = build(kind, &config)?;
        let err = s.set_timesteps(0).expect_err("0 steps");
        assert!(
            matches!(err, SchedulerError::InvalidSteps { steps: 0, .. }),
            "{kind}: {err}"
        );
        let err = s.set_timesteps(1001).expect_err("too many steps");
        assert!(err.to_string().contains("1000"), "{kind}: {err}");
        // stepping before set_timesteps is an error, not a panic
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(s.step(&x, 0, &x, &mut Generator::new(0)).is_err());
        s.set_timesteps(4)?;
        assert!(s.step(&x, 4, &x, &mut Generator::new(0)).is_err());
    }
    // steps_offset pushing leading timesteps out of range
    let mut c = SchedulerConfig::default();
    c.steps_offset = 1;
    let mut s = build(SchedulerKind::Ddim, &c)?;
    assert!(s.set_timesteps(1000).is_err());
    Ok(())
}

#[test]
fn thresholding_is_a_clear_error() {
    let config = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#).expect("config");
    for kind in SchedulerKind::ALL {
        let err = build(kind, &config)
            .err()
            .expect("thresholding must be rejected");
        assert!(matches!(err, SchedulerError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("thresholding"), "{err}");
    }
}

#[test]
fn unsupported_options_are_errors() {
    for json in [
        r#"{"use_exponential_sigmas": true}"#,
        r#"{"interpolation_type": "log_linear"}"#,
    ] {
        let config = SchedulerConfig::from_json_str(json).expect("config");
        assert!(build(SchedulerKind::Euler, &config).is_err(), "{json}");
    }
    let config = SchedulerConfig::from_json_str(r#"{"algorithm_type": "dpmsolver"}"#).expect("c");
    assert!(DpmSolverMultistepScheduler::new(&config).is_err());
    let config = SchedulerConfig::from_json_str(r#"{"solver_order": 4}"#).expect("c");
    assert!(DpmSolverMultistepScheduler::new(&config).is_err());
    let config =
        SchedulerConfig::from_json_str(r#"{"variance_type": "learned_range"}"#).expect("c");
    assert!(build(SchedulerKind::Ddpm, &config).is_err());
    let config = SchedulerConfig::from_json_str(r#"{"prediction_type": "sample"}"#).expect("c");
    assert!(build(SchedulerKind::EulerAncestral, &config).is_err());
    assert!(SchedulerConfig::from_json_str(r#"{"beta_schedule": "sigmoid"}"#).is_err());
}

#[test]
fn config_errors_name_the_file() {
    let missing = fixtures_dir().join("no_such_scheduler_config.json");
    let err = SchedulerConfig::from_file(&missing).expect_err("missing file");
    assert!(
        err.to_string().contains("no_such_scheduler_config.json"),
        "{err}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("scheduler_config.json");
    std::fs::write(&bad, r#"{"beta_schedule": "nope"}"#).expect("write");
    let err = SchedulerConfig::from_file(&bad).expect_err("bad file");
    assert!(matches!(err, SchedulerError::Parse { .. }));
    assert!(err.to_string().contains("scheduler_config.json"), "{err}");
}

fn sample_with(kind_or_ddim_eta: &str, seed: u64) -> Result<Vec<f64>> {
    let config = SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
    )?;
    let mut s: Box<dyn Scheduler> = match kind_or_ddim_eta {
        "ddim-eta1" => Box::new(DdimScheduler::new(&config, 1.0)?),
        kind => build(kind.parse()?, &config)?,
    };
    s.set_timesteps(10)?;
    let (x, _) = sample()?;
    let mut rng = Generator::new(seed);
    let out = trajectory(s.as_mut(), &x, &[], &mut |s, out, i, x, _| {
        Ok(s.step(out, i, x, &mut rng)?)
    })?;
    flat(&out)
}

#[test]
fn stochastic_schedulers_are_reproducible_per_seed() -> Result<()> {
    for kind in ["euler-ancestral", "ddim-eta1", "ddpm", "lcm"] {
        let a = sample_with(kind, 1)?;
        let b = sample_with(kind, 1)?;
        let c = sample_with(kind, 2)?;
        assert_eq!(a, b, "{kind}: same seed must give the same sample");
        assert_ne!(a, c, "{kind}: different seeds must differ");
        assert!(a.iter().all(|v| v.is_finite()));
    }
    // deterministic schedulers ignore the generator
    for kind in ["ddim", "euler", "dpm++2m", "dpm++2m-karras"] {
        assert_eq!(sample_with(kind, 1)?, sample_with(kind, 2)?, "{kind}");
    }
    Ok(())
}

#[test]
fn generator_is_deterministic() -> Result<()> {
    let dev = Device::Cpu;
    let a = Generator::new(42).randn((2, 3, 4), DType::F32, &dev)?;
    let b = Generator::new(42).randn((2, 3, 4), DType::F32, &dev)?;
    let c = Generator::new(43).randn((2, 3, 4), DType::F32, &dev)?;
    assert_eq!(flat(&a)?, flat(&b)?);
    assert_ne!(flat(&a)?, flat(&c)?);
    assert_eq!(Generator::new(42).seed(), 42);
    // dtype conversion of the same draws
    let h = Generator::new(42).randn((2, 3, 4), DType::BF16, &dev)?;
    assert_eq!(h.dtype(), DType::BF16);
    let v = flat(&a)?;
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean.abs() < 1.0);
    // a large draw is roughly standard normal
    let big = flat(&Generator::new(7).randn(100_000, DType::F32, &dev)?)?;
    let mean = big.iter().sum::<f64>() / big.len() as f64;
    let var = big.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / big.len() as f64;
    assert!(
        mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
        "{mean} {var}"
    );
    Ok(())
}

#[test]
fn dpm_solver_requires_in_order_steps() -> Result<()> {
    let mut s = DpmSolverMultistepScheduler::new(&SchedulerConfig::default())?;
    s.set_timesteps(5)?;
    let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
    let mut rng = Generator::new(0);
    s.step(&x, 0, &x, &mut rng)?;
    assert!(s.step(&x, 2, &x, &mut rng).is_err());
    s.set_timesteps(5)?;
    s.step(&x, 0, &x, &mut rng)?;
    s.step(&x, 1, &x, &mut rng)?;
    Ok(())
}

#[test]
fn half_precision_inputs_keep_their_dtype() -> Result<()> {
    let config = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        let mut s = build(kind, &config)?;
        s.set_timesteps(3)?;
        let x = Tensor::ones((1, 1, 2, 2), DType::BF16, &Device::Cpu)?;
        let inp = s.scale_model_input(&x, 0)?;
        assert_eq!(inp.dtype(), DType::BF16, "{kind}");
        let out = s.step(&inp, 0, &x, &mut Generator::new(0))?;
        assert_eq!(out.dtype(), DType::BF16, "{kind}");
    }
    Ok(())
}

/// The LCM options of a fixture case: from its config file, or from its config dict.
fn lcm_options(case: &Value) -> Result<LcmOptions> {
    if let Some(file) = case["config_file"].as_str() {
        Ok(LcmOptions::from_file(fixtures_dir().join(file))?)
    } else {
        Ok(serde_json::from_value(case["config"].clone())?)
    }
}

#[test]
fn lcm_matches_diffusers_with_replayed_noise() -> Result<()> {
    let fixture = load("lcm.json")?;
    let mut refused = 0;
    for case in fixture["cases"].as_array().context("cases")? {
        if let Some(msg) = case["error"].as_str() {
            // diffusers refuses more steps than original_inference_steps; so must we
            let config = case_config(case)?;
            let mut s = LcmScheduler::with_options(&config, lcm_options(case)?)?;
            let steps = case["num_inference_steps"].as_u64().context("steps")? as usize;
            let err = s
                .set_timesteps(steps)
                .expect_err("diffusers refused these steps");
            assert!(
                matches!(err, SchedulerError::InvalidSteps { .. }),
                "{err} (diffusers: {msg})"
            );
            assert!(
                err.to_string().contains("original_inference_steps"),
                "{err}"
            );
            refused += 1;
        }
    }
    assert!(refused > 0);
    run_fixture("lcm.json", |case, config, report| {
        if case["error"].is_string() {
            return Ok(());
        }
        let mut s = LcmScheduler::with_options(config, lcm_options(case)?)?;
        if let Some(file) = case["config_file"].as_str() {
            // a config file: LcmScheduler::from_file reads the LCM fields too, and `build` (the
            // kind's default options) agrees when the file has none
            let kind: SchedulerKind = case["kind"].as_str().context("kind")?.parse()?;
            assert_eq!(kind, SchedulerKind::Lcm);
            let file = fixtures_dir().join(file);
            let steps = case["num_inference_steps"].as_u64().context("steps")? as usize;
            let want = floats(&case["timesteps"])?;
            let mut from_file = LcmScheduler::from_file(&file)?;
            from_file.set_timesteps(steps)?;
            check_timesteps(from_file.timesteps(), &want)?;
            if LcmOptions::from_file(&file)? == LcmOptions::default() {
                let mut built = build(kind, config)?;
                built.set_timesteps(steps)?;
                check_timesteps(built.timesteps(), &want)?;
            }
        }
        check_case(&mut s, case, report, &mut |s, out, i, x, noise| {
            Ok(s.step_with_noise(out, i, x, noise)?)
        })
    })
}

#[test]
fn lcm_options_and_errors() -> Result<()> {
    let config = SchedulerConfig::default();
    let mut s = LcmScheduler::new(&config)?;
    assert_eq!(s.original_inference_steps(), 50);
    assert_eq!(s.timestep_scaling(), 10.0);
    // more steps than the skipping-step schedule has
    let err = s.set_timesteps(51).expect_err("51 > 50");
    assert!(
        err.to_string().contains("original_inference_steps (50)"),
        "{err}"
    );
    s.set_timesteps(50)?;
    assert_eq!(s.timesteps().len(), 50);
    // a per-call original_inference_steps, as diffusers' set_timesteps(original_inference_steps=)
    s.set_timesteps_with_original(4, Some(4))?;
    assert_eq!(s.timesteps(), [999.0, 749.0, 499.0, 249.0]);
    assert!(s.set_timesteps_with_original(4, Some(1001)).is_err());
    assert!(s.set_timesteps_with_original(4, Some(0)).is_err());
    // invalid options are config errors
    for options in [
        LcmOptions {
            original_inference_steps: 0,
            ..LcmOptions::default()
        },
        LcmOptions {
            original_inference_steps: 1001,
            ..LcmOptions::default()
        },
        LcmOptions {
            timestep_scaling: f64::NAN,
            ..LcmOptions::default()
        },
    ] {
        let err = LcmScheduler::with_options(&config, options).expect_err("invalid");
        assert!(matches!(err, SchedulerError::InvalidConfig(_)), "{err}");
    }
    // every step but the last needs noise; the last one returns the denoised sample
    s.set_timesteps(3)?;
    let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
    assert!(s.step_with_noise(&x, 0, &x, None).is_err());
    let last = s.step_with_noise(&x, 2, &x, None)?;
    assert_eq!(flat(&last)?, flat(&s.denoised(&x, 2, &x)?)?);
    Ok(())
}

/// Replays the scheduler side of the tiny SDXL LCM pipeline run
/// (`fixtures/parity/ref-tiny-sdxl-sample-lcm.safetensors`, see tools/parity/README.md §5.4):
/// the model output each step saw is recovered from the recorded `step_denoised`, then
/// `step_with_noise` with the recorded noise must reproduce diffusers' `step_latents`.
#[test]
fn lcm_replays_the_tiny_sdxl_pipeline_noise() -> Result<()> {
    let parity = fixtures_dir().join("..");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(parity.join("ref-tiny-sdxl.json"))?)?;
    let run = &meta["sampling"]["lcm"];
    let refs = candle_core::safetensors::load(
        parity.join("ref-tiny-sdxl-sample-lcm.safetensors"),
        &Device::Cpu,
    )?;
    let get = |k: &str| refs.get(k).cloned().with_context(|| k.to_string());
    let config =
        SchedulerConfig::from_file(parity.join("tiny-sdxl/scheduler/scheduler_config.json"))?;
    assert_eq!(config.class_name, "EulerDiscreteScheduler");
    let mut s = build(SchedulerKind::Lcm, &config)?;
    let steps = run["num_inference_steps"].as_u64().context("steps")? as usize;
    s.set_timesteps(steps)?;
    check_timesteps(s.timesteps(), &floats(&run["timesteps"])?)?;
    let mut lcm = LcmScheduler::new(&config)?;
    lcm.set_timesteps(steps)?;
    let (noise, denoised, want) = (get("noise")?, get("step_denoised")?, get("step_latents")?);
    let mut x = get("init_latents")?;
    let mut worst = 0f64;
    for i in 0..steps {
        let t = lcm.timesteps()[i];
        let a = f64::from(lcm.alphas_cumprod()[t as usize]);
        let (c_skip, c_out) = lcm.boundary_condition_scalings(t);
        // epsilon such that the LCM denoised estimate equals the recorded one
        let x0 = ((denoised.get(i)? - (&x * f64::from(c_skip))?)? / f64::from(c_out))?;
        let eps = ((&x - (x0 * a.sqrt())?)? / (1.0 - a).sqrt())?;
        let n = (i + 1 < steps).then(|| noise.get(i)).transpose()?;
        let next = lcm.step_with_noise(&eps, i, &x, n.as_ref())?;
        let want_i = want.get(i)?;
        let scale = flat(&want_i)?.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = flat(&(&next - &want_i)?.abs()?)?
            .into_iter()
            .fold(0f64, f64::max);
        assert!(
            err <= 1e-4 * scale,
            "step {i}: max error {err} (scale {scale})"
        );
        worst = worst.max(err / scale);
        x = want_i;
    }
    eprintln!("tiny-sdxl LCM replay: worst relative error {worst:.2e}");
    Ok(())
}

#[test]
fn build_honours_lcm_options_from_the_config() -> anyhow::Result<()> {
    use agfsync_diffusion::schedulers::{
        build, LcmOptions, LcmScheduler, Scheduler, SchedulerConfig, SchedulerKind,
    };
    let cfg = SchedulerConfig::from_json_str(
        r#"{"_class_name": "LCMScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "original_inference_steps": 8,
            "timestep_scaling": 5.0}"#,
    )?;
    assert_eq!(cfg.original_inference_steps, Some(8));
    let mut built = build(SchedulerKind::Lcm, &cfg)?;
    built.set_timesteps(4)?;
    let mut direct = LcmScheduler::with_options(
        &cfg,
        LcmOptions {
            original_inference_steps: 8,
            timestep_scaling: 5.0,
        },
    )?;
    direct.set_timesteps(4)?;
    assert_eq!(built.timesteps(), direct.timesteps());
    let mut default = build(SchedulerKind::Lcm, &SchedulerConfig::from_json_str("{}")?)?;
    default.set_timesteps(4)?;
    assert_ne!(
        built.timesteps(),
        default.timesteps(),
        "options were ignored"
    );
    Ok(())
}
