//! Single-file checkpoints (original Stability layout): the files that
//! tools/parity/make_single_file_fixtures.py verified with diffusers'
//! `from_single_file` are rebuilt here from their recipes
//! (fixtures/parity/single-file/*.recipe.json, see that script) and must load
//! into networks that match the diffusers folder pipeline they came from.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use agfsync_models::clip_text::TextLayer;
use agfsync_models::hub::{HubOptions, ModelSource};
use agfsync_models::nn::Pass;
use agfsync_models::single_file::{
    default_config_id, detect_family, load_single_file, load_single_file_auto,
    load_single_file_with, SingleFile, SingleFileError, SingleFileOptions, UnetWeights,
};
use agfsync_models::stable_diffusion::{LoadOptions, SdFamily, StableDiffusion};
use agfsync_models::unet_2d_condition::AddedCondition;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

const FAMILIES: [(&str, SdFamily); 3] = [
    ("tiny-sd15", SdFamily::V1),
    ("tiny-sd2", SdFamily::V2),
    ("tiny-sdxl", SdFamily::Xl),
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/single-file")
}

struct Recipe {
    /// The diffusers pipeline folder the file was made from (and its config).
    source: PathBuf,
    json: serde_json::Value,
}

fn recipe(name: &str) -> Result<Recipe> {
    let p = fixtures().join(format!("{name}.recipe.json"));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| p.display().to_string())?,
    )?;
    let source = fixtures().join(json["source"].as_str().context("recipe source")?);
    Ok(Recipe { source, json })
}

fn dims(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as usize)
                .collect()
        })
        .unwrap_or_default()
}

/// The single file's tensors, built from the recipe as the Python script does.
fn rebuild(r: &Recipe) -> Result<BTreeMap<String, Tensor>> {
    let cpu = Device::Cpu;
    let mut comps: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for (c, f) in r.json["components"].as_object().context("components")? {
        let p = r.source.join(f.as_str().context("component file")?);
        comps.insert(
            c.clone(),
            candle_core::safetensors::load(&p, &cpu).with_context(|| p.display().to_string())?,
        );
    }
    let mut out = BTreeMap::new();
    for e in r.json["tensors"].as_array().context("tensors")? {
        let key = e["key"].as_str().context("key")?.to_string();
        let shape = dims(&e["shape"]);
        let dtype = match e["dtype"].as_str() {
            Some("I64") => DType::I64,
            _ => DType::F32,
        };
        let srcs = e["src"]
            .as_array()
            .context("src")?
            .iter()
            .map(|s| {
                let s = s.as_str().context("src name")?;
                let (c, k) = s.split_once('/').context("component/key")?;
                comps
                    .get(c)
                    .and_then(|m| m.get(k))
                    .cloned()
                    .with_context(|| format!("no source tensor {s}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let n: usize = shape.iter().product();
        let t = match e["op"].as_str().context("op")? {
            "copy" => srcs[0].reshape(shape.clone())?,
            "cat0" => Tensor::cat(&srcs, 0)?.reshape(shape.clone())?,
            "transpose" => srcs[0].t()?.contiguous()?.reshape(shape.clone())?,
            "zeros" => Tensor::zeros(shape.clone(), dtype, &cpu)?,
            "arange" => Tensor::arange(0i64, n as i64, &cpu)?.reshape(shape.clone())?,
            op => anyhow::bail!("unknown recipe op {op}"),
        };
        out.insert(key, t.to_dtype(dtype)?.contiguous()?);
    }
    Ok(out)
}

fn write(tensors: &BTreeMap<String, Tensor>, dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &p)?;
    Ok(p)
}

fn reference(name: &str) -> Result<HashMap<String, Tensor>> {
    let p = fixtures().join(format!("ref-{name}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).with_context(|| p.display().to_string())
}

fn get<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    m.get(k).unwrap_or_else(|| panic!("reference has no `{k}`"))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    Ok(d.abs()?.max_all()?.to_scalar()?)
}

fn shapes(t: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<usize>> {
    t.iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

fn folder(source: &Path) -> Result<StableDiffusion> {
    Ok(StableDiffusion::load(
        &ModelSource::local(source),
        &LoadOptions::default(),
    )?)
}

fn unet_out(sd: &StableDiffusion, r: &HashMap<String, Tensor>) -> Result<Tensor> {
    let added = match (r.get("unet_text_embeds"), r.get("unet_time_ids")) {
        (Some(e), Some(t)) => Some(AddedCondition {
            text_embeds: e.clone(),
            time_ids: t.clone(),
        }),
        _ => None,
    };
    Ok(sd.unet.forward(
        get(r, "unet_sample"),
        get(r, "unet_timestep"),
        get(r, "unet_context"),
        added.as_ref(),
        Pass::INFERENCE,
    )?)
}

/// Every output the references hold, computed by `sd`.
fn outputs(
    sd: &StableDiffusion,
    r: &HashMap<String, Tensor>,
) -> Result<Vec<(&'static str, Tensor)>> {
    let mut o = vec![("unet_out", unet_out(sd, r)?)];
    o.push((
        "vae_decoded",
        sd.vae.decode(get(r, "vae_latents"), Pass::INFERENCE)?,
    ));
    o.push((
        "vae_enc_mean",
        sd.vae.encode(get(r, "vae_image"), Pass::INFERENCE)?.mean,
    ));
    let ids = get(r, "te_input_ids").to_dtype(DType::U32)?;
    let last = sd
        .text_encoder
        .forward(&ids, TextLayer::Last, Pass::INFERENCE)?;
    o.push(("te_last_hidden_state", last.hidden));
    o.push(("te_pooled", last.pooled.context("pooled")?));
    let raw = sd
        .text_encoder
        .forward(&ids, TextLayer::PenultimateRaw, Pass::INFERENCE)?;
    o.push(("te_hidden_states_minus2", raw.hidden));
    if let Some(te2) = &sd.text_encoder_2 {
        let ids = get(r, "te2_input_ids").to_dtype(DType::U32)?;
        let last = te2.forward(&ids, TextLayer::Last, Pass::INFERENCE)?;
        o.push(("te2_last_hidden_state", last.hidden));
        o.push(("te2_text_embeds", last.pooled.context("pooled")?));
        let raw = te2.forward(&ids, TextLayer::PenultimateRaw, Pass::INFERENCE)?;
        o.push(("te2_hidden_states_minus2", raw.hidden));
    }
    Ok(o)
}

#[test]
fn each_family_matches_the_folder_pipeline_and_diffusers() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (name, family) in FAMILIES {
        let r = recipe(name)?;
        let file = write(&rebuild(&r)?, tmp.path(), &format!("{name}.safetensors"))?;
        let single = load_single_file(
            &file,
            &ModelSource::local(&r.source),
            &LoadOptions::default(),
        )?;
        assert_eq!(single.family, family, "{name}");
        assert_eq!(single.text_encoder_2.is_some(), family == SdFamily::Xl);
        let folder = folder(&r.source)?;
        assert_eq!(single.scheduler_config, folder.scheduler_config);
        assert_eq!(
            single.tokenizer.encode_raw("a photo")?,
            folder.tokenizer.encode_raw("a photo")?
        );
        let refs = reference(name)?;
        let ours = outputs(&single, &refs)?;
        let theirs = outputs(&folder, &refs)?;
        for ((k, a), (_, b)) in ours.iter().zip(&theirs) {
            let d = max_diff(a, b)?;
            assert!(d <= 1e-5, "{name} {k}: single file vs folder differ by {d}");
            // Against diffusers' own from_single_file outputs (measured: at
            // most 1.3e-6).
            let d = max_diff(a, get(&refs, k))?;
            assert!(d <= 1e-5, "{name} {k}: differs from diffusers by {d}");
        }
    }
    Ok(())
}

#[test]
fn families_are_detected_from_keys_and_shapes() -> Result<()> {
    for (name, family) in FAMILIES {
        let s = shapes(&rebuild(&recipe(name)?)?);
        assert_eq!(detect_family(&s)?, family, "{name}");
    }
    // A UNet alone: the context width decides (768 / 1024 / 2048).
    let unet_only = |ctx: usize| {
        BTreeMap::from([
            (
                "model.diffusion_model.input_blocks.0.0.weight".to_string(),
                vec![320, 4, 3, 3],
            ),
            (
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
                    .to_string(),
                vec![320, ctx],
            ),
        ])
    };
    assert_eq!(detect_family(&unet_only(768))?, SdFamily::V1);
    assert_eq!(detect_family(&unet_only(1024))?, SdFamily::V2);
    assert_eq!(detect_family(&unet_only(2048))?, SdFamily::Xl);
    assert!(matches!(
        detect_family(&unet_only(32)),
        Err(SingleFileError::UnknownFamily { .. })
    ));

    // Inpainting, refiner, and files that are no checkpoint at all.
    let mut inpaint = unet_only(768);
    inpaint.insert(
        "model.diffusion_model.input_blocks.0.0.weight".into(),
        vec![320, 9, 3, 3],
    );
    let e = detect_family(&inpaint).expect_err("inpainting");
    assert!(e.to_string().contains("inpainting"), "{e}");
    let mut refiner = unet_only(1280);
    refiner.insert(
        "conditioner.embedders.0.model.token_embedding.weight".into(),
        vec![49408, 1280],
    );
    let e = detect_family(&refiner).expect_err("refiner");
    assert!(e.to_string().contains("SDXL refiner"), "{e}");
    let lora = BTreeMap::from([(
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".to_string(),
        vec![4, 320],
    )]);
    let e = detect_family(&lora).expect_err("lora");
    assert!(e.to_string().contains("LoRA"), "{e}");
    let diffusers_unet = BTreeMap::from([
        ("conv_in.weight".to_string(), vec![320, 4, 3, 3]),
        (
            "down_blocks.0.resnets.0.conv1.weight".to_string(),
            vec![320, 320, 3, 3],
        ),
    ]);
    let e = detect_family(&diffusers_unet).expect_err("diffusers unet");
    assert!(e.to_string().contains("diffusers-format UNet"), "{e}");
    Ok(())
}

#[test]
fn a_file_and_a_config_of_different_families_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let xl = recipe("tiny-sdxl")?;
    let sd15 = recipe("tiny-sd15")?;
    let xl_file = write(&rebuild(&xl)?, tmp.path(), "xl.safetensors")?;
    let e = load_single_file(
        &xl_file,
        &ModelSource::local(&sd15.source),
        &LoadOptions::default(),
    )
    .expect_err("SDXL file with an SD 1.x config");
    let msg = e.to_string();
    assert!(matches!(e, SingleFileError::FamilyMismatch { .. }), "{msg}");
    assert!(
        msg.contains("this file is an SDXL checkpoint but --config points to an SD 1.x pipeline"),
        "{msg}"
    );
    assert!(msg.contains("xl.safetensors"), "{msg}");
    assert!(msg.contains(default_config_id(SdFamily::Xl)), "{msg}");

    let sd15_file = write(&rebuild(&sd15)?, tmp.path(), "sd15.safetensors")?;
    let e = load_single_file(
        &sd15_file,
        &ModelSource::local(&xl.source),
        &LoadOptions::default(),
    )
    .expect_err("SD 1.x file with an SDXL config");
    assert!(
        e.to_string()
            .contains("this file is an SD 1.x checkpoint but --config points to an SDXL pipeline"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_truncated_file_is_reported_with_its_path() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let r = recipe("tiny-sd15")?;
    let file = write(&rebuild(&r)?, tmp.path(), "cut.safetensors")?;
    let bytes = std::fs::read(&file)?;
    std::fs::write(&file, &bytes[..bytes.len() / 2])?;
    let e = load_single_file(
        &file,
        &ModelSource::local(&r.source),
        &LoadOptions::default(),
    )
    .expect_err("truncated");
    let msg = e.to_string();
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");

    let missing = tmp.path().join("nope.safetensors");
    let e = load_single_file(
        &missing,
        &ModelSource::local(&r.source),
        &LoadOptions::default(),
    )
    .expect_err("missing");
    assert!(e.to_string().contains("nope.safetensors"), "{e}");
    Ok(())
}

/// Renames the UNet tensors to the flattened EMA names LDM training uses.
fn to_ema(t: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    t.iter()
        .map(|(k, v)| match k.strip_prefix("model.diffusion_model.") {
            Some(rest) => (
                format!("model_ema.diffusion_model{}", rest.replace('.', "")),
                v.clone(),
            ),
            None => (k.clone(), v.clone()),
        })
        .collect()
}

#[test]
fn ema_weights_are_used_when_they_are_the_only_ones_or_preferred() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let r = recipe("tiny-sd15")?;
    let refs = reference("tiny-sd15")?;
    let cfg = ModelSource::local(&r.source);
    let opts = LoadOptions::default();
    let tensors = rebuild(&r)?;
    let expected = unet_out(&folder(&r.source)?, &refs)?;

    let ema_only = write(&to_ema(&tensors), tmp.path(), "ema.safetensors")?;
    assert_eq!(
        SingleFile::open(&ema_only)?.info().unet_weights,
        UnetWeights::EmaOnly
    );
    let sd = load_single_file(&ema_only, &cfg, &opts)?;
    assert!(max_diff(&unet_out(&sd, &refs)?, &expected)? <= 1e-5);

    // Both: regular weights by default, the EMA copy (here scaled) on request.
    let mut both = tensors.clone();
    for (k, v) in to_ema(&tensors) {
        if k.starts_with("model_ema.diffusion_model") {
            both.insert(k, (v * 0.5)?);
        }
    }
    let both = write(&both, tmp.path(), "both.safetensors")?;
    assert_eq!(
        SingleFile::open(&both)?.info().unet_weights,
        UnetWeights::Both
    );
    let sd = load_single_file(&both, &cfg, &opts)?;
    assert!(max_diff(&unet_out(&sd, &refs)?, &expected)? <= 1e-5);
    let sd = load_single_file_with(
        &both,
        &cfg,
        &opts,
        &SingleFileOptions {
            prefer_ema: true,
            ..Default::default()
        },
    )?;
    assert!(max_diff(&unet_out(&sd, &refs)?, &expected)? > 1e-3);
    Ok(())
}

#[test]
fn missing_parts_come_from_the_config_and_old_clip_names_load() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let r = recipe("tiny-sd15")?;
    let refs = reference("tiny-sd15")?;
    let cfg = ModelSource::local(&r.source);
    let tensors = rebuild(&r)?;
    let expected = outputs(&folder(&r.source)?, &refs)?;
    let check = |sd: &StableDiffusion, what: &str| -> Result<()> {
        for ((k, a), (_, b)) in outputs(sd, &refs)?.iter().zip(&expected) {
            let d = max_diff(a, b)?;
            assert!(d <= 1e-5, "{what}: {k} differs by {d}");
        }
        Ok(())
    };

    // A UNet-only file: the VAE and text encoder come from the config folder.
    let unet_only: BTreeMap<_, _> = tensors
        .iter()
        .filter(|(k, _)| k.starts_with("model.diffusion_model."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let f = write(&unet_only, tmp.path(), "unet-only.safetensors")?;
    let sf = SingleFile::open(&f)?;
    assert!(sf.info().vae_prefix.is_none());
    assert_eq!(sf.info().text_encoders, vec![None]);
    assert_eq!(sf.info().family, None, "tiny context width: family unknown");
    check(
        &load_single_file(&f, &cfg, &LoadOptions::default())?,
        "unet-only",
    )?;

    // Older SD 1.x files: CLIP without `text_model.`, VAE under `vae.`.
    let old: BTreeMap<_, _> = tensors
        .iter()
        .map(|(k, v)| {
            let k = k
                .replace(
                    "cond_stage_model.transformer.text_model.",
                    "cond_stage_model.transformer.",
                )
                .replace("first_stage_model.", "vae.");
            (k, v.clone())
        })
        .collect();
    let f = write(&old, tmp.path(), "old.safetensors")?;
    check(
        &load_single_file(&f, &cfg, &LoadOptions::default())?,
        "old names",
    )?;

    // Half-precision files (most community releases) load into f32 models.
    let half: BTreeMap<_, _> = tensors
        .iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::F32 {
                v.to_dtype(DType::F16)
            } else {
                Ok(v.clone())
            };
            v.map(|v| (k.clone(), v))
        })
        .collect::<candle_core::Result<_>>()?;
    let f = write(&half, tmp.path(), "half.safetensors")?;
    let sd = load_single_file(&f, &cfg, &LoadOptions::default())?;
    assert_eq!(sd.unet.dtype(), DType::F32);
    let d = max_diff(&unet_out(&sd, &refs)?, &expected[0].1)?;
    assert!(d < 1e-2, "f16 file: UNet differs by {d}");
    Ok(())
}

#[test]
fn bad_files_are_refused_with_the_tensor_named() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let r = recipe("tiny-sd15")?;
    let cfg = ModelSource::local(&r.source);
    let opts = LoadOptions::default();
    let tensors = rebuild(&r)?;

    // Inpainting UNet.
    let mut t = tensors.clone();
    let k = "model.diffusion_model.input_blocks.0.0.weight";
    let w = t[k].clone();
    let (o, _, kh, kw) = w.dims4()?;
    t.insert(
        k.into(),
        Tensor::zeros((o, 9, kh, kw), DType::F32, &Device::Cpu)?,
    );
    let f = write(&t, tmp.path(), "inpaint.safetensors")?;
    let e = load_single_file(&f, &cfg, &opts).expect_err("inpainting");
    assert!(matches!(e, SingleFileError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("inpainting") && e.to_string().contains("inpaint.safetensors"));

    // A missing tensor is named in both layouts.
    let mut t = tensors.clone();
    t.remove("model.diffusion_model.output_blocks.2.1.conv.weight");
    let f = write(&t, tmp.path(), "missing.safetensors")?;
    let e = load_single_file(&f, &cfg, &opts).expect_err("missing tensor");
    let msg = e.to_string();
    assert!(
        msg.contains("model.diffusion_model.output_blocks.2.1.conv.weight")
            && msg.contains("up_blocks.0.upsamplers.0.conv.weight"),
        "{msg}"
    );

    // A tensor the config does not use: the config is not this checkpoint's.
    let mut t = tensors.clone();
    t.insert(
        "model.diffusion_model.input_blocks.99.0.in_layers.0.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu)?,
    );
    let f = write(&t, tmp.path(), "extra.safetensors")?;
    let e = load_single_file(&f, &cfg, &opts).expect_err("extra tensor");
    assert!(matches!(e, SingleFileError::UnusedTensors { .. }), "{e}");
    assert!(e.to_string().contains("input_blocks.99"), "{e}");

    // Wrong shapes say both shapes.
    let mut t = tensors.clone();
    t.insert(
        "model.diffusion_model.out.2.bias".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu)?,
    );
    let f = write(&t, tmp.path(), "shape.safetensors")?;
    let e = load_single_file(&f, &cfg, &opts).expect_err("wrong shape");
    assert!(
        e.to_string().contains("[5]") && e.to_string().contains("[4]"),
        "{e}"
    );

    // Pickle checkpoints are refused without being opened.
    let e = load_single_file(&tmp.path().join("model.ckpt"), &cfg, &opts).expect_err("ckpt");
    assert!(e.to_string().contains("pickle"), "{e}");
    Ok(())
}

#[test]
fn config_resolution_and_prediction_type() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let r = recipe("tiny-sd2")?;
    let file = write(&rebuild(&r)?, tmp.path(), "sd2.safetensors")?;
    let hub = HubOptions::offline(tmp.path().join("empty-cache"));
    let opts = LoadOptions::default();

    // No --config, offline, nothing cached: say where the configs would come from.
    let e = load_single_file_auto(&file, None, &hub, &opts, &SingleFileOptions::default())
        .expect_err("no config available");
    let msg = e.to_string();
    assert!(matches!(e, SingleFileError::DefaultConfig { .. }), "{msg}");
    assert!(msg.contains("stabilityai/stable-diffusion-2-1"), "{msg}");
    assert!(
        msg.contains("--config") && msg.contains("sd2.safetensors"),
        "{msg}"
    );

    // An explicit config folder; its scheduler's prediction type, or the override.
    let spec = r.source.display().to_string();
    let sd = load_single_file_auto(
        &file,
        Some(&spec),
        &hub,
        &opts,
        &SingleFileOptions::default(),
    )?;
    assert_eq!(sd.family, SdFamily::V2);
    let pred = |sd: &StableDiffusion| -> Result<String> {
        let v: serde_json::Value = serde_json::from_str(&sd.scheduler_config)?;
        Ok(v["prediction_type"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    assert_eq!(pred(&sd)?, "v_prediction");
    let eps = SingleFileOptions {
        prediction_type: Some("epsilon".into()),
        ..Default::default()
    };
    let sd = load_single_file_auto(&file, Some(&spec), &hub, &opts, &eps)?;
    assert_eq!(pred(&sd)?, "epsilon");
    let bad = SingleFileOptions {
        prediction_type: Some("x0".into()),
        ..Default::default()
    };
    let e = load_single_file_auto(&file, Some(&spec), &hub, &opts, &bad).expect_err("bad type");
    assert!(matches!(e, SingleFileError::PredictionType(_)), "{e}");
    Ok(())
}
