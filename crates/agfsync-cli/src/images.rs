//! Writing PNGs with their generation parameters, and latents files.

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

/// Writes an 8-bit RGB PNG with text chunks, atomically (temporary file then
/// rename), so an interrupted run never leaves a truncated image.
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
    text: &[(&str, String)],
) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    {
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            // Non-Latin-1 text needs an iTXt chunk; tEXt is what most viewers show.
            if v.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(k.to_string(), v.clone())
                    .with_context(|| format!("adding PNG text chunk `{k}`"))?;
            } else {
                enc.add_itxt_chunk(k.to_string(), v.clone())
                    .with_context(|| format!("adding PNG text chunk `{k}`"))?;
            }
        }
        let mut w = enc
            .write_header()
            .with_context(|| format!("writing {}", tmp.display()))?;
        w.write_image_data(rgb)
            .with_context(|| format!("writing {}", tmp.display()))?;
        w.finish()
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("moving {} into place", path.display()))
}

/// Reads the tensor `latents` from a safetensors file.
pub fn read_latents(path: &Path) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| {
        format!(
            "cannot read latents from {} (expected a safetensors file with a tensor named `latents`)",
            path.display()
        )
    })?;
    match tensors.get("latents") {
        Some(t) => Ok(t.clone()),
        None => {
            let mut names: Vec<_> = tensors.keys().cloned().collect();
            names.sort();
            bail!(
                "{} has no tensor named `latents` (it has: {})",
                path.display(),
                names.join(", ")
            )
        }
    }
}

/// Writes `latents` as the tensor `latents` of a safetensors file, atomically.
pub fn write_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let mut map = HashMap::new();
    map.insert("latents".to_string(), latents.clone());
    agfsync_models::weights::save_safetensors(&map, path)
        .with_context(|| format!("writing latents to {}", path.display()))
}
