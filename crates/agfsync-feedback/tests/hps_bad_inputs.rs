//! Bad HPS checkpoints are refused with an error that names the file and
//! what is wrong (the key, for missing or misshapen tensors), never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use agfsync_feedback::hps::{HpsLoadOptions, HpsScorer};
use agfsync_feedback::FeedbackError;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/hps")
}

fn load(path: &Path) -> std::result::Result<HpsScorer, FeedbackError> {
    HpsScorer::load(path, &HpsLoadOptions::default())
}

/// A copy of the fixture model, edited, in a folder with its config and
/// tokenizer.
fn edited(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<PathBuf> {
    let mut t = candle_core::safetensors::load(root().join("tiny-hps.safetensors"), &Device::Cpu)?;
    edit(&mut t);
    std::fs::copy(
        root().join("open_clip_config.json"),
        dir.join("open_clip_config.json"),
    )?;
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok)?;
    for e in std::fs::read_dir(root().join("tokenizer"))? {
        let e = e?;
        std::fs::copy(e.path(), tok.join(e.file_name()))?;
    }
    let path = dir.join("edited.safetensors");
    candle_core::safetensors::save(&t, &path)?;
    Ok(path)
}

fn message(r: std::result::Result<HpsScorer, FeedbackError>) -> Result<String> {
    match r {
        Ok(_) => anyhow::bail!("a bad checkpoint loaded"),
        Err(e) => Ok(e.to_string()),
    }
}

#[test]
fn wrong_shape_names_the_file_and_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = edited(dir.path(), |t| {
        let key = "visual.transformer.resblocks.1.attn.in_proj_weight";
        if let Ok(z) = Tensor::zeros((96, 31), candle_core::DType::F32, &Device::Cpu) {
            t.insert(key.into(), z);
        }
    })?;
    let msg = message(load(&path))?;
    assert!(msg.contains("edited.safetensors"), "{msg}");
    assert!(
        msg.contains("visual.transformer.resblocks.1.attn.in_proj_weight"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn missing_key_names_the_file_and_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = edited(dir.path(), |t| {
        t.remove("transformer.resblocks.1.mlp.c_proj.bias");
    })?;
    let msg = message(load(&path))?;
    assert!(msg.contains("edited.safetensors"), "{msg}");
    assert!(
        msg.contains("transformer.resblocks.1.mlp.c_proj.bias"),
        "{msg}"
    );

    // Without the vision tower it is not an open_clip checkpoint at all.
    let dir = tempfile::tempdir()?;
    let path = edited(dir.path(), |t| {
        t.retain(|k, _| !k.starts_with("visual."));
    })?;
    let msg = message(load(&path))?;
    assert!(
        msg.contains("visual.conv1.weight") && msg.contains("open_clip"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn prefixed_keys_load() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = edited(dir.path(), |t| {
        let old = std::mem::take(t);
        t.extend(old.into_iter().map(|(k, v)| (format!("module.{k}"), v)));
    })?;
    load(&path).context("module. prefix")?;
    Ok(())
}

#[test]
fn non_tensor_objects_in_a_pt_are_refused() -> Result<()> {
    let path = root().join("bad-object.pt");
    let msg = message(load(&path))?;
    assert!(msg.contains("bad-object.pt"), "{msg}");
    assert!(msg.contains("`note`") && msg.contains(".set`"), "{msg}");
    // A file that is neither a zip nor safetensors.
    let dir = tempfile::tempdir()?;
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, b"not a checkpoint")?;
    let msg = message(load(&junk))?;
    assert!(msg.contains("junk.pt"), "{msg}");
    Ok(())
}

#[test]
fn bad_versions_and_missing_files_are_errors() -> Result<()> {
    let r = HpsScorer::load(
        &root().join("tiny-hps.pt"),
        &HpsLoadOptions {
            version: Some("v3".into()),
            ..HpsLoadOptions::default()
        },
    );
    assert!(message(r)?.contains("v2.0 and v2.1"));
    let msg = message(load(&root().join("nope.pt")))?;
    assert!(msg.contains("nope.pt"), "{msg}");
    Ok(())
}
