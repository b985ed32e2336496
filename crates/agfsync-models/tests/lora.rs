//! LoRA files: parsing the diffusers/PEFT, legacy diffusers and kohya layouts,
//! parity with diffusers when attached or merged (fixtures/parity/lora, made by
//! tools/parity/make_lora_fixtures.py), removal, several adapters at once,
//! SDXL block names, and every bad-input error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use agfsync_models::clip_text::TextLayer;
use agfsync_models::hub::ModelSource;
use agfsync_models::lora::{
    apply_lora, remove_lora, LoraError, LoraFile, LoraFormat, LoraMode, LoraModel, LoraTargets,
};
use agfsync_models::nn::Pass;
use agfsync_models::stable_diffusion::{LoadOptions, StableDiffusion};
use agfsync_models::tiny::{write_tiny_sd_pipeline, TinyPreset};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

fn parity() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity")
}

fn lora_file(name: &str) -> PathBuf {
    parity().join("lora").join(name)
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}", path.display()))
}

fn tensor<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    m.get(k)
        .unwrap_or_else(|| panic!("fixture has no tensor `{k}`"))
}

fn sd15() -> Result<StableDiffusion> {
    Ok(StableDiffusion::load(
        &ModelSource::local(parity().join("tiny-sd15")),
        &LoadOptions::default(),
    )?)
}

/// The UNet and text-encoder inputs of the base references.
struct Inputs {
    sample: Tensor,
    timestep: Tensor,
    ehs: Tensor,
    ids: Tensor,
    base_unet: Tensor,
    base_te: Tensor,
}

fn inputs() -> Result<Inputs> {
    let u = load(&parity().join("ref-tiny-sd15-unet.safetensors"))?;
    let t = load(&parity().join("ref-tiny-sd15-text-encoder.safetensors"))?;
    Ok(Inputs {
        sample: tensor(&u, "sample").clone(),
        timestep: tensor(&u, "timestep").to_dtype(DType::F32)?,
        ehs: tensor(&u, "encoder_hidden_states").clone(),
        ids: tensor(&t, "input_ids").to_dtype(DType::U32)?,
        base_unet: tensor(&u, "out").clone(),
        base_te: tensor(&t, "last_hidden_state").clone(),
    })
}

/// UNet output and text-encoder last hidden state.
fn run(sd: &StableDiffusion, x: &Inputs, pass: Pass) -> Result<(Tensor, Tensor)> {
    let u = sd
        .unet
        .forward(&x.sample, &x.timestep, &x.ehs, None, pass)?;
    let t = sd.text_encoder.forward(&x.ids, TextLayer::Last, pass)?;
    Ok((u, t.hidden))
}

/// Largest difference relative to the reference's largest magnitude.
fn rel(ours: &Tensor, theirs: &Tensor) -> Result<f32> {
    assert_eq!(ours.dims(), theirs.dims());
    let d: f32 = (ours - theirs)?.abs()?.max_all()?.to_scalar()?;
    let s: f32 = theirs.abs()?.max_all()?.to_scalar()?;
    Ok(d / s.max(1e-12))
}

fn check_ref(sd: &StableDiffusion, x: &Inputs, reference: &str, what: &str) -> Result<()> {
    let r = load(&lora_file(&format!("ref-{reference}.safetensors")))?;
    let (u, t) = run(sd, x, Pass::INFERENCE)?;
    let du = rel(&u, tensor(&r, "unet_out"))?;
    let dt = rel(&t, tensor(&r, "te_last_hidden_state"))?;
    assert!(
        du < 1e-4,
        "{what}: UNet differs from diffusers by {du} (relative)"
    );
    assert!(
        dt < 1e-4,
        "{what}: text encoder differs from diffusers by {dt} (relative)"
    );
    // Make sure the comparison is meaningful: the adapter moves the outputs.
    assert!(rel(&u, &x.base_unet)? > 1e-2, "{what}: UNet unchanged");
    assert!(
        rel(&t, &x.base_te)? > 1e-2,
        "{what}: text encoder unchanged"
    );
    Ok(())
}

fn check_base(sd: &StableDiffusion, x: &Inputs, what: &str) -> Result<()> {
    let (u, t) = run(sd, x, Pass::INFERENCE)?;
    let du = rel(&u, &x.base_unet)?;
    let dt = rel(&t, &x.base_te)?;
    assert!(du < 1e-5, "{what}: UNet not restored ({du})");
    assert!(dt < 1e-5, "{what}: text encoder not restored ({dt})");
    Ok(())
}

// ---------------------------------------------------------------------------
// parsing

#[test]
fn parses_every_format() -> Result<()> {
    let peft = LoraFile::load(&lora_file("sd15-peft.safetensors"))?;
    assert_eq!(peft.format(), LoraFormat::Peft);
    assert_eq!(peft.modules_for(LoraModel::Unet).count(), 48);
    assert_eq!(peft.modules_for(LoraModel::TextEncoder).count(), 12);
    assert_eq!(peft.rank(), 4);
    assert_eq!(peft.ranks(), vec![2, 4]);
    // lora_alpha 8, alpha_pattern {attn2.to_v: 2}, rank_pattern {attn2.to_k: 2}
    for m in peft.modules() {
        let want_alpha = if m.name.ends_with("attn2.to_v") {
            2.0
        } else {
            8.0
        };
        let want_rank = if m.name.ends_with("attn2.to_k") { 2 } else { 4 };
        assert_eq!(m.alpha, want_alpha, "{}", m.name);
        assert_eq!(m.rank(), want_rank, "{}", m.name);
    }
    assert!(peft
        .modules()
        .iter()
        .any(|m| m.name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"));

    let kohya = LoraFile::load(&lora_file("sd15-kohya.safetensors"))?;
    assert_eq!(kohya.format(), LoraFormat::Kohya);
    assert_eq!(kohya.modules().len(), 60);
    // Same adapter as the PEFT file: same tensors and alphas, module by module.
    let by_flat: HashMap<String, _> = kohya
        .modules()
        .iter()
        .map(|m| (m.name.clone(), m))
        .collect();
    for m in peft.modules() {
        let flat = match m.model {
            LoraModel::Unet => m.name.replace('.', "_"),
            _ => format!("text_model_{}", m.name.replace('.', "_")),
        };
        let k = by_flat
            .get(&flat)
            .unwrap_or_else(|| panic!("kohya file lacks {flat}"));
        assert_eq!(k.model, m.model);
        assert_eq!(k.alpha, m.alpha, "{flat}");
        assert_eq!(rel(&k.down, &m.down)?, 0.0);
        assert_eq!(rel(&k.up, &m.up)?, 0.0);
    }

    let legacy = LoraFile::load(&lora_file("sd15-legacy.safetensors"))?;
    assert_eq!(legacy.format(), LoraFormat::DiffusersLegacy);
    assert_eq!(legacy.modules().len(), 60);
    let legacy_by: HashMap<(LoraModel, String), _> = legacy
        .modules()
        .iter()
        .map(|m| {
            (
                (
                    m.model,
                    m.name.trim_start_matches("text_model.").to_string(),
                ),
                m,
            )
        })
        .collect();
    for m in peft.modules() {
        let l = legacy_by
            .get(&(m.model, m.name.clone()))
            .unwrap_or_else(|| panic!("legacy file lacks {}", m.name));
        // No alphas in legacy files: alpha = rank.
        assert_eq!(l.alpha, l.rank() as f64);
        assert_eq!(rel(&l.down, &m.down)?, 0.0);
    }

    let conv = LoraFile::load(&lora_file("sd15-kohya-conv-ff.safetensors"))?;
    assert_eq!(conv.format(), LoraFormat::Kohya);
    assert_eq!(conv.modules_for(LoraModel::Unet).count(), 72);
    assert_eq!(conv.modules_for(LoraModel::TextEncoder).count(), 18);
    assert_eq!(conv.ranks(), vec![2]);
    let proj_in = conv
        .modules()
        .iter()
        .find(|m| m.name == "down_blocks_0_attentions_0_proj_in")
        .context("proj_in")?;
    // [2, 16, 1, 1] in the file, flattened to [rank, in].
    assert_eq!(proj_in.down.dims(), &[2, 16]);
    assert_eq!(proj_in.up.dims(), &[16, 2]);
    assert_eq!(proj_in.alpha, 3.0);
    assert_eq!(proj_in.base_scale(), 1.5);
    Ok(())
}

#[test]
fn a_diffusers_folder_loads_its_weights_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        lora_file("sd15-peft.safetensors"),
        dir.path().join("pytorch_lora_weights.safetensors"),
    )?;
    assert_eq!(LoraFile::load(dir.path())?.format(), LoraFormat::Peft);
    Ok(())
}

// ---------------------------------------------------------------------------
// parity with diffusers

fn attach_and_merge_match(file: &str, reference: &str) -> Result<()> {
    let x = inputs()?;
    let lora = LoraFile::load(&lora_file(file))?;
    for mode in [LoraMode::Attach, LoraMode::Merge] {
        let sd = sd15()?;
        let targets = LoraTargets::of(&sd);
        let report = apply_lora(&lora, &targets, "style", 0.7, mode)?;
        assert_eq!(report.matched, lora.modules().len(), "{file}: {report:?}");
        assert!(report.unmatched.is_empty());
        check_ref(&sd, &x, reference, &format!("{file} {mode:?}"))?;
        // The reference pass skips attached adapters but sees merged ones.
        let (u_ref, _) = run(&sd, &x, Pass::REFERENCE)?;
        let base_gap = rel(&u_ref, &x.base_unet)?;
        match mode {
            LoraMode::Attach => assert!(base_gap < 1e-5, "reference pass used the adapter"),
            LoraMode::Merge => assert!(base_gap > 1e-2, "merged adapter missing"),
        }
        let removed = remove_lora(&targets, "style")?;
        match mode {
            LoraMode::Attach => assert_eq!(
                (removed.detached, removed.unmerged),
                (lora.modules().len(), 0)
            ),
            LoraMode::Merge => assert_eq!(
                (removed.detached, removed.unmerged),
                (0, lora.modules().len())
            ),
        }
        check_base(&sd, &x, &format!("{file} {mode:?} removed"))?;
        assert!(targets.adapter_names().is_empty());
    }
    Ok(())
}

#[test]
fn peft_file_matches_diffusers() -> Result<()> {
    attach_and_merge_match("sd15-peft.safetensors", "sd15-peft")
}

#[test]
fn kohya_file_matches_diffusers() -> Result<()> {
    // The same adapter as sd15-peft, with per-module `.alpha` (see the README).
    attach_and_merge_match("sd15-kohya.safetensors", "sd15-peft")
}

#[test]
fn kohya_conv_and_feed_forward_file_matches_diffusers() -> Result<()> {
    attach_and_merge_match("sd15-kohya-conv-ff.safetensors", "sd15-kohya-conv-ff")
}

#[test]
fn legacy_diffusers_file_matches_diffusers() -> Result<()> {
    attach_and_merge_match("sd15-legacy.safetensors", "sd15-legacy")
}

#[test]
fn two_adapters_at_once_match_diffusers() -> Result<()> {
    let x = inputs()?;
    let a = LoraFile::load(&lora_file("sd15-peft.safetensors"))?;
    let b = LoraFile::load(&lora_file("sd15-kohya-conv-ff.safetensors"))?;
    for (mode_a, mode_b) in [
        (LoraMode::Attach, LoraMode::Attach),
        (LoraMode::Merge, LoraMode::Merge),
        (LoraMode::Merge, LoraMode::Attach),
    ] {
        let sd = sd15()?;
        let targets = LoraTargets::of(&sd);
        apply_lora(&a, &targets, "a", 0.7, mode_a)?;
        apply_lora(&b, &targets, "b", 0.5, mode_b)?;
        assert_eq!(targets.adapter_names(), vec!["a", "b"]);
        let what = format!("two adapters {mode_a:?}+{mode_b:?}");
        check_ref(&sd, &x, "two-adapters", &what)?;
        // Removing one leaves the other: compare with the single-adapter reference.
        remove_lora(&targets, "b")?;
        let r = load(&lora_file("ref-sd15-peft.safetensors"))?;
        let (u, t) = run(&sd, &x, Pass::INFERENCE)?;
        assert!(rel(&u, tensor(&r, "unet_out"))? < 1e-4, "{what}: a alone");
        assert!(
            rel(&t, tensor(&r, "te_last_hidden_state"))? < 1e-4,
            "{what}: a alone"
        );
        remove_lora(&targets, "a")?;
        check_base(&sd, &x, &what)?;
    }
    Ok(())
}

#[test]
fn unet_only_targets_leave_the_text_encoder_alone() -> Result<()> {
    let x = inputs()?;
    let sd = sd15()?;
    let lora = LoraFile::load(&lora_file("sd15-peft.safetensors"))?;
    let targets = LoraTargets {
        unet: sd.unet.lora(),
        text_encoder: None,
        text_encoder_2: None,
    };
    let report = apply_lora(&lora, &targets, "u", 0.7, LoraMode::Attach)?;
    assert_eq!(report.matched, 48);
    assert_eq!(report.unmatched.len(), 12);
    let te = report.per_model[&LoraModel::TextEncoder];
    assert_eq!((te.matched, te.total), (0, 12));
    let (_, t) = run(&sd, &x, Pass::INFERENCE)?;
    assert!(rel(&t, &x.base_te)? < 1e-6);
    Ok(())
}

// ---------------------------------------------------------------------------
// hand-written files

/// Writes a safetensors file of F32 tensors with optional header metadata.
fn write_st(path: &Path, tensors: &[(&str, Tensor)], metadata: &[(&str, &str)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in tensors {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let start = data.len();
        for x in v {
            data.extend_from_slice(&x.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [start, data.len()]}),
        );
    }
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out)?;
    Ok(())
}

fn randn(shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 0.1, shape, &Device::Cpu)?)
}

/// A LoRA pair for a layer with weight `[out, in]`.
fn pair(
    stem: &str,
    down: &str,
    up: &str,
    out: usize,
    inp: usize,
    r: usize,
) -> Result<[(String, Tensor); 2]> {
    Ok([
        (format!("{stem}{down}"), randn(&[r, inp])?),
        (format!("{stem}{up}"), randn(&[out, r])?),
    ])
}

fn write_owned(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: &[(&str, &str)],
) -> Result<()> {
    let refs: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    write_st(path, &refs, metadata)
}

#[test]
fn peft_without_metadata_uses_alpha_equal_to_rank_and_patterns_apply() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let v = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v";
    let mut t = Vec::new();
    t.extend(pair(q, ".lora_A.weight", ".lora_B.weight", 16, 16, 4)?);
    t.extend(pair(v, ".lora_A.weight", ".lora_B.weight", 16, 16, 4)?);
    let plain = dir.path().join("plain.safetensors");
    write_owned(&plain, t.clone(), &[])?;
    let f = LoraFile::load(&plain)?;
    assert!(f
        .modules()
        .iter()
        .all(|m| m.alpha == 4.0 && m.base_scale() == 1.0));

    let meta = r#"{"unet.lora_alpha": 16, "unet.r": 4, "unet.alpha_pattern": {"attn1.to_v": 2}, "unet.use_rslora": true}"#;
    let with = dir.path().join("meta.safetensors");
    write_owned(
        &with,
        t,
        &[("format", "pt"), ("lora_adapter_metadata", meta)],
    )?;
    let f = LoraFile::load(&with)?;
    for m in f.modules() {
        let alpha = if m.name.ends_with("to_v") { 2.0 } else { 16.0 };
        assert_eq!(m.alpha, alpha);
        assert!(m.rslora);
        assert_eq!(m.base_scale(), alpha / 2.0); // alpha / sqrt(4)
    }
    Ok(())
}

#[test]
fn kohya_alpha_scales_each_layer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let mut t: Vec<(String, Tensor)> =
        pair(stem, ".lora_down.weight", ".lora_up.weight", 16, 16, 4)?.into();
    t.push((format!("{stem}.alpha"), Tensor::new(1f32, &Device::Cpu)?));
    let p = dir.path().join("k.safetensors");
    write_owned(&p, t, &[])?;
    let f = LoraFile::load(&p)?;
    let sd = sd15()?;
    let targets = LoraTargets::of(&sd);
    apply_lora(&f, &targets, "k", 0.5, LoraMode::Attach)?;
    let slot = sd
        .unet
        .lora()
        .get("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        .context("slot")?;
    let a = slot.adapters();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].scale, 1.0 / 4.0 * 0.5);
    Ok(())
}

/// SDXL's block layout, the LDM names of sd-scripts and both text encoders.
#[test]
fn sdxl_kohya_block_names_map_onto_diffusers_modules() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_sd_pipeline(&dir.path().join("xl"), TinyPreset::Sdxl, 3)?;
    let sd = StableDiffusion::load(
        &ModelSource::local(dir.path().join("xl")),
        &LoadOptions::default(),
    )?;
    let targets = LoraTargets::of(&sd);
    // (kohya name, diffusers module, model)
    let cases = [
        (
            "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
            LoraModel::Unet,
        ),
        (
            "lora_unet_middle_block_1_proj_in",
            "mid_block.attentions.0.proj_in",
            LoraModel::Unet,
        ),
        (
            "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_2",
            "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
            LoraModel::Unet,
        ),
        (
            "lora_unet_output_blocks_0_1_proj_out",
            "up_blocks.0.attentions.0.proj_out",
            LoraModel::Unet,
        ),
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "text_model.encoder.layers.0.self_attn.q_proj",
            LoraModel::TextEncoder,
        ),
        (
            "lora_te2_text_model_encoder_layers_1_mlp_fc1",
            "text_model.encoder.layers.1.mlp.fc1",
            LoraModel::TextEncoder2,
        ),
    ];
    let registry = |m: LoraModel| match m {
        LoraModel::Unet => sd.unet.lora(),
        LoraModel::TextEncoder => sd.text_encoder.lora(),
        LoraModel::TextEncoder2 => sd.text_encoder_2.as_ref().expect("te2").lora(),
    };
    let find = |m: LoraModel, path: &str| {
        registry(m)
            .slots()
            .into_iter()
            .find(|(p, _)| {
                p.trim_start_matches("text_model.") == path.trim_start_matches("text_model.")
            })
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("model has no slot {path}"))
    };
    let mut t = Vec::new();
    for (k, path, m) in &cases {
        let (out, inp) = find(*m, path).shape();
        t.extend(pair(
            k,
            ".lora_down.weight",
            ".lora_up.weight",
            out,
            inp,
            2,
        )?);
        t.push((format!("{k}.alpha"), Tensor::new(1f32, &Device::Cpu)?));
    }
    let p = dir.path().join("xl-lora.safetensors");
    write_owned(&p, t, &[])?;
    let f = LoraFile::load(&p)?;
    let report = apply_lora(&f, &targets, "xl", 1.0, LoraMode::Attach)?;
    assert_eq!(report.matched, cases.len(), "{report:?}");
    for (_, path, m) in &cases {
        let a = find(*m, path).adapters();
        assert_eq!(a.len(), 1, "{path}");
        assert_eq!(a[0].scale, 0.5);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// bad input

fn err_text(r: Result<impl std::fmt::Debug, LoraError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn files_that_are_not_safetensors_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = dir.path().join("notes.safetensors");
    std::fs::write(&text, "this is a text file, not a LoRA at all")?;
    let msg = err_text(LoraFile::load(&text));
    assert!(
        msg.contains("notes.safetensors") && msg.contains("not a readable safetensors"),
        "{msg}"
    );

    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"")?;
    let msg = err_text(LoraFile::load(&empty));
    assert!(msg.contains("empty.safetensors"), "{msg}");

    let bytes = std::fs::read(lora_file("sd15-peft.safetensors"))?;
    for cut in [bytes.len() / 2, 100, 9] {
        let short = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&short, &bytes[..cut])?;
        let msg = err_text(LoraFile::load(&short));
        assert!(msg.contains(&format!("cut{cut}.safetensors")), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");
    }

    let missing = dir.path().join("missing.safetensors");
    let msg = err_text(LoraFile::load(&missing));
    assert!(msg.contains("missing.safetensors"), "{msg}");

    // A safetensors file without LoRA tensors.
    let weights = dir.path().join("weights.safetensors");
    write_st(&weights, &[("conv_in.weight", randn(&[4, 4])?)], &[])?;
    let msg = err_text(LoraFile::load(&weights));
    assert!(
        msg.contains("no LoRA tensors") && msg.contains("conv_in.weight"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn keys_that_match_nothing_are_listed_with_the_models_modules() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut t = Vec::new();
    for i in 0..7 {
        t.extend(pair(
            &format!("lora_unet_single_transformer_blocks_{i}_attn_to_q"),
            ".lora_down.weight",
            ".lora_up.weight",
            16,
            16,
            4,
        )?);
    }
    let p = dir.path().join("flux.safetensors");
    write_owned(&p, t, &[])?;
    let f = LoraFile::load(&p)?;
    let sd = sd15()?;
    let targets = LoraTargets::of(&sd);
    let e = apply_lora(&f, &targets, "x", 1.0, LoraMode::Attach).expect_err("no match");
    let LoraError::NoMatch(ref details) = e else {
        panic!("wrong error {e}")
    };
    assert_eq!((details.matched, details.total), (0, 7));
    assert_eq!(details.example_keys.len(), 5);
    assert_eq!(details.example_modules.len(), 5);
    let msg = e.to_string();
    assert!(msg.contains("flux.safetensors"), "{msg}");
    assert!(msg.contains("0 of the 7"), "{msg}");
    assert!(
        msg.contains("lora_unet_single_transformer_blocks_0_attn_to_q"),
        "{msg}"
    );
    assert!(
        msg.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        "{msg}"
    );
    // Nothing was applied.
    assert!(targets.adapter_names().is_empty());
    Ok(())
}

#[test]
fn partly_unmatched_files_apply_and_report_the_rest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut t = Vec::new();
    t.extend(pair(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        ".lora_down.weight",
        ".lora_up.weight",
        16,
        16,
        4,
    )?);
    t.extend(pair(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
        ".lora_down.weight",
        ".lora_up.weight",
        16,
        16,
        4,
    )?);
    // No LoRA slot on time_emb_proj.
    t.extend(pair(
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        ".lora_down.weight",
        ".lora_up.weight",
        16,
        64,
        4,
    )?);
    let p = dir.path().join("partial.safetensors");
    write_owned(&p, t, &[])?;
    let sd = sd15()?;
    let r = apply_lora(
        &LoraFile::load(&p)?,
        &LoraTargets::of(&sd),
        "p",
        1.0,
        LoraMode::Attach,
    )?;
    assert_eq!((r.matched, r.total), (2, 3));
    assert_eq!(
        r.unmatched,
        vec!["lora_unet_down_blocks_0_resnets_0_time_emb_proj"]
    );
    Ok(())
}

#[test]
fn shape_and_rank_mismatches_name_the_module_and_shapes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
    // Rank mismatch inside the file.
    let p = dir.path().join("rank.safetensors");
    write_st(
        &p,
        &[
            (&format!("{stem}.lora_A.weight"), randn(&[4, 32])?),
            (&format!("{stem}.lora_B.weight"), randn(&[16, 2])?),
        ],
        &[],
    )?;
    let msg = err_text(LoraFile::load(&p));
    assert!(
        msg.contains(stem) && msg.contains("[4, 32]") && msg.contains("[16, 2]"),
        "{msg}"
    );
    assert!(msg.contains("rank"), "{msg}");

    // Shapes that do not fit the layer (a 768-wide text conditioning).
    let p = dir.path().join("shape.safetensors");
    write_st(
        &p,
        &[
            (&format!("{stem}.lora_A.weight"), randn(&[4, 768])?),
            (&format!("{stem}.lora_B.weight"), randn(&[16, 4])?),
        ],
        &[],
    )?;
    let sd = sd15()?;
    let targets = LoraTargets::of(&sd);
    let msg = err_text(apply_lora(
        &LoraFile::load(&p)?,
        &targets,
        "s",
        1.0,
        LoraMode::Merge,
    ));
    assert!(
        msg.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
        "{msg}"
    );
    assert!(
        msg.contains("[4, 768]") && msg.contains("[16, 32]"),
        "{msg}"
    );
    assert!(targets.adapter_names().is_empty());
    Ok(())
}

fn sdxl_style_file(path: &Path) -> Result<()> {
    let mut t = Vec::new();
    for (k, out, inp) in [
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            640,
            640,
        ),
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
            640,
            2048,
        ),
        (
            "lora_unet_input_blocks_7_1_transformer_blocks_5_attn1_to_v",
            1280,
            1280,
        ),
        (
            "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
            1280,
            5120,
        ),
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            768,
            768,
        ),
        (
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
            1280,
            1280,
        ),
    ] {
        t.extend(pair(
            k,
            ".lora_down.weight",
            ".lora_up.weight",
            out,
            inp,
            1,
        )?);
    }
    write_owned(path, t, &[])
}

#[test]
fn an_sdxl_lora_on_an_sd15_model_says_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("xl.safetensors");
    sdxl_style_file(&p)?;
    let sd = sd15()?;
    let msg = err_text(apply_lora(
        &LoraFile::load(&p)?,
        &LoraTargets::of(&sd),
        "xl",
        1.0,
        LoraMode::Attach,
    ));
    assert!(
        msg.contains("this looks like an SDXL LoRA")
            || msg.contains("This looks like an SDXL LoRA"),
        "{msg}"
    );
    assert!(msg.contains("second text encoder"), "{msg}");
    Ok(())
}

#[test]
fn an_sd15_lora_on_an_sdxl_model_says_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_sd_pipeline(&dir.path().join("xl"), TinyPreset::Sdxl, 3)?;
    let sd = StableDiffusion::load(
        &ModelSource::local(dir.path().join("xl")),
        &LoadOptions::default(),
    )?;
    let msg = err_text(apply_lora(
        &LoraFile::load(&lora_file("sd15-kohya.safetensors"))?,
        &LoraTargets::of(&sd),
        "sd15",
        1.0,
        LoraMode::Attach,
    ));
    assert!(msg.contains("looks like an SD 1.x/2.x LoRA"), "{msg}");
    assert!(msg.contains("but the model is SDXL"), "{msg}");
    Ok(())
}

#[test]
fn unsupported_variants_are_refused_clearly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // LoCon on a 3x3 ResNet convolution.
    let p = dir.path().join("locon.safetensors");
    let mut t: Vec<(String, Tensor)> = pair(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        ".lora_down.weight",
        ".lora_up.weight",
        16,
        16,
        4,
    )?
    .into();
    t.push((
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight".into(),
        randn(&[4, 16, 3, 3])?,
    ));
    t.push((
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight".into(),
        randn(&[16, 4, 1, 1])?,
    ));
    write_owned(&p, t, &[])?;
    let msg = err_text(LoraFile::load(&p));
    assert!(
        msg.contains("not supported yet: 2 tensors for 3x3 convolutions"),
        "{msg}"
    );
    assert!(
        msg.contains("lora_unet_down_blocks_0_resnets_0_conv1"),
        "{msg}"
    );

    // DoRA.
    let p = dir.path().join("dora.safetensors");
    let stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let mut t: Vec<(String, Tensor)> =
        pair(stem, ".lora_down.weight", ".lora_up.weight", 16, 16, 4)?.into();
    t.push((format!("{stem}.dora_scale"), randn(&[1, 16])?));
    write_owned(&p, t, &[])?;
    let msg = err_text(LoraFile::load(&p));
    assert!(msg.contains("not supported yet: DoRA"), "{msg}");

    // LyCORIS LoHa.
    let p = dir.path().join("loha.safetensors");
    write_st(
        &p,
        &[(
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
            randn(&[4, 4])?,
        )],
        &[],
    )?;
    let msg = err_text(LoraFile::load(&p));
    assert!(
        msg.contains("not supported yet") && msg.contains("LyCORIS"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn names_must_be_unique_and_known() -> Result<()> {
    let sd = sd15()?;
    let targets = LoraTargets::of(&sd);
    let f = LoraFile::load(&lora_file("sd15-peft.safetensors"))?;
    apply_lora(&f, &targets, "one", 1.0, LoraMode::Attach)?;
    let msg = err_text(apply_lora(&f, &targets, "one", 1.0, LoraMode::Merge));
    assert!(msg.contains("`one` is already attached"), "{msg}");
    let msg = err_text(remove_lora(&targets, "two"));
    assert!(msg.contains("no adapter named `two`"), "{msg}");
    let msg = err_text(apply_lora(&f, &targets, "nan", f64::NAN, LoraMode::Attach));
    assert!(msg.contains("not a finite number"), "{msg}");
    Ok(())
}
