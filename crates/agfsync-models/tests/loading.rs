//! Loading diffusers pipeline folders: the tiny pipelines we write, weight
//! variants, and every kind of bad input named in a clear error.

use std::path::Path;

use agfsync_models::hub::ModelSource;
use agfsync_models::stable_diffusion::{LoadOptions, SdFamily, StableDiffusion};
use agfsync_models::tiny::{write_tiny_sd_pipeline, TinyPreset};
use agfsync_models::ModelError;
use anyhow::Result;

fn tiny(preset: TinyPreset) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    write_tiny_sd_pipeline(dir.path(), preset, 1)?;
    Ok(dir)
}

fn load(dir: &Path) -> Result<StableDiffusion, ModelError> {
    StableDiffusion::load(&ModelSource::local(dir), &LoadOptions::default())
}

#[test]
fn tiny_pipelines_load_with_their_family() -> Result<()> {
    let d = tiny(TinyPreset::Sd15)?;
    let sd = load(d.path())?;
    assert_eq!(sd.family, SdFamily::V1);
    assert!(sd.scheduler_config.contains("DDIMScheduler"));
    let d = tiny(TinyPreset::Sd2)?;
    let sd = load(d.path())?;
    assert_eq!(sd.family, SdFamily::V2);
    assert!(sd.unet.config().use_linear_projection);
    assert!(sd.scheduler_config.contains("v_prediction"));
    let d = tiny(TinyPreset::Sdxl)?;
    let sd = load(d.path())?;
    assert_eq!(sd.family, SdFamily::Xl);
    assert!(sd
        .text_encoder_2
        .as_ref()
        .is_some_and(|t| t.config().has_projection()));
    assert_eq!(sd.tokenizer_2.as_ref().map(|t| t.pad_id()), Some(0));
    assert!(sd.force_zeros_for_empty_prompt);
    assert_eq!(sd.vae.config().force_upcast, Some(true));
    Ok(())
}

#[test]
fn tiny_writer_is_deterministic() -> Result<()> {
    let a = tiny(TinyPreset::Sd15)?;
    let b = tiny(TinyPreset::Sd15)?;
    let f = "unet/diffusion_pytorch_model.safetensors";
    assert_eq!(
        std::fs::read(a.path().join(f))?,
        std::fs::read(b.path().join(f))?
    );
    Ok(())
}

#[test]
fn fp16_variant_file_names_load() -> Result<()> {
    let d = tiny(TinyPreset::Sd15)?;
    // Replace the unet weights by an fp16 variant file, as diffusers'
    // save_pretrained(variant="fp16") names it.
    let unet = d.path().join("unet");
    let tensors = candle_core::safetensors::load(
        unet.join("diffusion_pytorch_model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let half: std::collections::HashMap<_, _> = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(candle_core::DType::F16)?)))
        .collect::<Result<_>>()?;
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors"))?;
    candle_core::safetensors::save(&half, unet.join("diffusion_pytorch_model.fp16.safetensors"))?;
    let sd = StableDiffusion::load(
        &ModelSource::local(d.path()),
        &LoadOptions {
            variant: Some("fp16".into()),
            ..LoadOptions::default()
        },
    )?;
    assert_eq!(sd.unet.dtype(), candle_core::DType::F32);
    // Without asking for the variant, the only weights present are used too.
    load(d.path())?;
    Ok(())
}

#[test]
fn missing_weight_file_names_the_folder() -> Result<()> {
    let d = tiny(TinyPreset::Sd15)?;
    std::fs::remove_file(d.path().join("vae/diffusion_pytorch_model.safetensors"))?;
    let err = load(d.path()).expect_err("must fail").to_string();
    assert!(err.contains("vae"), "{err}");
    Ok(())
}

#[test]
fn truncated_weight_file_is_reported_with_its_path() -> Result<()> {
    let d = tiny(TinyPreset::Sd15)?;
    let f = d.path().join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f)?;
    std::fs::write(&f, &bytes[..bytes.len() / 2])?;
    let err = load(d.path()).expect_err("must fail").to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("truncated"), "{err}");
    Ok(())
}

#[test]
fn config_that_does_not_match_weights_names_tensor_and_shapes() -> Result<()> {
    let d = tiny(TinyPreset::Sd15)?;
    let cfg = d.path().join("unet/config.json");
    let text = std::fs::read_to_string(&cfg)?
        .replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 48");
    std::fs::write(&cfg, text)?;
    let err = load(d.path()).expect_err("must fail").to_string();
    assert!(err.contains("attn2.to_k.weight"), "{err}");
    assert!(err.contains("48") && err.contains("32"), "{err}");
    Ok(())
}

#[test]
fn broken_config_json_names_the_file() -> Result<()> {
    let d = tiny(TinyPreset::Sd15)?;
    std::fs::write(d.path().join("vae/config.json"), "{ not json")?;
    let err = load(d.path()).expect_err("must fail").to_string();
    assert!(err.contains("vae/config.json"), "{err}");
    Ok(())
}

#[test]
fn folder_without_model_index_is_explained() -> Result<()> {
    let d = tempfile::tempdir()?;
    let err = load(d.path()).expect_err("must fail").to_string();
    assert!(err.contains("model_index.json"), "{err}");
    Ok(())
}

#[test]
fn bf16_and_f16_weights_load_into_an_f32_model() -> Result<()> {
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        let d = tiny(TinyPreset::Sd15)?;
        let f = d.path().join("text_encoder/model.safetensors");
        let tensors = candle_core::safetensors::load(&f, &candle_core::Device::Cpu)?;
        let converted: std::collections::HashMap<_, _> = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&converted, &f)?;
        let sd = load(d.path())?;
        assert_eq!(sd.text_encoder.config().hidden_size, 32);
    }
    Ok(())
}
