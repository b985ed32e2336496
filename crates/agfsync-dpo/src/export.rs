//! Exporting what was trained: LoRA adapters in the diffusers/PEFT layout,
//! the base UNet with an adapter merged in (`--merge`), and, for full
//! training, a diffusers `unet/` folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use agfsync_models::nn::LoraRegistry;
use candle_core::{DType, Device};

use crate::error::DpoError;
use crate::safetensors_io::write_safetensors;
use crate::trainer::{ModelSpec, Trainer};

/// Writes the adapter `adapter` attached to the UNet's `registry` as a
/// diffusers/PEFT LoRA file: `unet.<module>.lora_A.weight` (`[r, in]`),
/// `unet.<module>.lora_B.weight` (`[out, r]`; for convolutions
/// `[r, in, k, k]` and `[out, r, 1, 1]`), and the `lora_adapter_metadata`
/// header entry (`unet.r`, `unet.lora_alpha`, `unet.target_modules`) that
/// diffusers' `load_lora_weights` and [`agfsync_models::lora::LoraFile`]
/// read. The file is written to a temporary name, synced and renamed.
/// Returns the number of modules written.
pub fn export_peft_lora(
    registry: &LoraRegistry,
    adapter: &str,
    path: &Path,
) -> Result<usize, DpoError> {
    let mut tensors = HashMap::new();
    let mut modules = Vec::new();
    let mut rank_alpha: Option<(usize, f64)> = None;
    let mut slots = registry.slots();
    slots.sort_by(|a, b| a.0.cmp(&b.0));
    for (module, slot) in slots {
        let Some(a) = slot.adapters().into_iter().find(|a| a.name == adapter) else {
            continue;
        };
        let rank = a.down.dim(0)?;
        let alpha = a.scale * rank as f64;
        match rank_alpha {
            None => rank_alpha = Some((rank, alpha)),
            Some((r, al)) if r == rank && (al - alpha).abs() <= 1e-9 * al.abs().max(1.0) => {}
            Some((r, al)) => {
                return Err(DpoError::Export(format!(
                    "adapter `{adapter}` mixes rank/alpha {r}/{al} and {rank}/{alpha} ({module}); a single LoraConfig cannot describe it"
                )))
            }
        }
        let w = slot.weight();
        let (down, up) = if w.rank() == 4 {
            let (out_c, in_c, kh, kw) = w.dims4()?;
            (
                a.down.reshape((rank, in_c, kh, kw))?,
                a.up.reshape((out_c, rank, 1, 1))?,
            )
        } else {
            (a.down.clone(), a.up.clone())
        };
        tensors.insert(format!("unet.{module}.lora_A.weight"), down.detach());
        tensors.insert(format!("unet.{module}.lora_B.weight"), up.detach());
        modules.push(module);
    }
    let Some((rank, alpha)) = rank_alpha else {
        return Err(DpoError::Export(format!(
            "no adapter named `{adapter}` is attached to the UNet"
        )));
    };
    let meta = serde_json::json!({
        "unet.r": rank,
        "unet.lora_alpha": alpha,
        "unet.target_modules": modules,
    });
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("lora_adapter_metadata".to_string(), meta.to_string());
    let tmp = path.with_extension("safetensors.tmp");
    write_safetensors(&tmp, &tensors, &metadata)?;
    // Crash tests: the new file complete under its temporary name.
    agfsync_fault::point("export.before_rename");
    std::fs::rename(&tmp, path).map_err(|e| DpoError::io(path, e))?;
    Ok(modules.len())
}

/// Writes the fully trained UNet as a diffusers `unet/` folder
/// (`config.json` and `diffusion_pytorch_model.safetensors`) at `dir`.
pub fn save_full_unet(trainer: &Trainer, dir: &Path) -> Result<PathBuf, DpoError> {
    if !trainer.config().full {
        return Err(DpoError::Export(
            "save_full_unet needs a full-UNet run; LoRA runs export adapters".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| DpoError::io(dir, e))?;
    let tensors: HashMap<_, _> = trainer
        .trainables()
        .iter()
        .map(|t| (t.name.clone(), t.var.as_tensor().clone()))
        .collect();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let tmp = dir.join("diffusion_pytorch_model.safetensors.tmp");
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    write_safetensors(&tmp, &tensors, &metadata)?;
    // Crash tests: the new file complete under its temporary name.
    agfsync_fault::point("export.before_rename");
    std::fs::rename(&tmp, &file).map_err(|e| DpoError::io(&file, e))?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, &trainer.spec().unet_config_json).map_err(|e| DpoError::io(&cfg, e))?;
    Ok(dir.to_path_buf())
}

/// Writes `spec`'s UNet with the adapter `adapter` of `registry` merged into
/// its weights (`W += alpha / rank * up @ down`) as a diffusers `unet/`
/// folder at `dir` (`config.json`, `diffusion_pytorch_model.safetensors`;
/// half-precision weights are written as f32). Returns the number of merged
/// modules.
pub fn export_merged_unet(
    spec: &ModelSpec,
    registry: &LoraRegistry,
    adapter: &str,
    dir: &Path,
) -> Result<usize, DpoError> {
    let mut tensors = spec.read_weights(&Device::Cpu)?;
    let mut merged = 0;
    for (module, slot) in registry.slots() {
        let Some(a) = slot.adapters().into_iter().find(|a| a.name == adapter) else {
            continue;
        };
        let key = format!("{module}.weight");
        let Some(base) = tensors.get(&key) else {
            return Err(DpoError::Export(format!(
                "the UNet weights have no `{key}` to merge into"
            )));
        };
        let up = a.up.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let down = a.down.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let delta = (up.matmul(&down)? * a.scale)?.reshape(base.shape())?;
        let new = (base.to_dtype(DType::F32)? + delta)?;
        tensors.insert(key, new);
        merged += 1;
    }
    if merged == 0 {
        return Err(DpoError::Export(format!(
            "no adapter named `{adapter}` is attached to the UNet"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| DpoError::io(dir, e))?;
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let tmp = dir.join("diffusion_pytorch_model.safetensors.tmp");
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    write_safetensors(&tmp, &tensors, &metadata)?;
    // Crash tests: the new file complete under its temporary name.
    agfsync_fault::point("export.before_rename");
    std::fs::rename(&tmp, &file).map_err(|e| DpoError::io(&file, e))?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, &spec.unet_config_json).map_err(|e| DpoError::io(&cfg, e))?;
    Ok(merged)
}

/// Writes the adapter `adapter` of the UNet's `registry` with kohya
/// sd-scripts keys: `lora_unet_<module with dots as underscores>.lora_down.weight`
/// (`[r, in]`, convolutions `[r, in, k, k]`), `.lora_up.weight` (`[out, r]`,
/// convolutions `[out, r, 1, 1]`) and `.alpha`, plus the `ss_network_dim` /
/// `ss_network_alpha` metadata. Module names are diffusers' (as sd-scripts
/// writes them for SD 1.x/2.x); tools that require the original LDM block
/// names for SDXL are not served by this layout. Returns the number of
/// modules written.
pub fn export_kohya_lora(
    registry: &LoraRegistry,
    adapter: &str,
    path: &Path,
) -> Result<usize, DpoError> {
    let mut tensors = HashMap::new();
    let mut count = 0;
    let mut rank_alpha = None;
    for (module, slot) in registry.slots() {
        let Some(a) = slot.adapters().into_iter().find(|a| a.name == adapter) else {
            continue;
        };
        let rank = a.down.dim(0)?;
        let alpha = a.scale * rank as f64;
        rank_alpha.get_or_insert((rank, alpha));
        let w = slot.weight();
        let (down, up) = if w.rank() == 4 {
            let (out_c, in_c, kh, kw) = w.dims4()?;
            (
                a.down.reshape((rank, in_c, kh, kw))?,
                a.up.reshape((out_c, rank, 1, 1))?,
            )
        } else {
            (a.down.clone(), a.up.clone())
        };
        let stem = format!("lora_unet_{}", module.replace('.', "_"));
        tensors.insert(format!("{stem}.lora_down.weight"), down.detach());
        tensors.insert(format!("{stem}.lora_up.weight"), up.detach());
        tensors.insert(
            format!("{stem}.alpha"),
            candle_core::Tensor::new(alpha as f32, &Device::Cpu)?,
        );
        count += 1;
    }
    let Some((rank, alpha)) = rank_alpha else {
        return Err(DpoError::Export(format!(
            "no adapter named `{adapter}` is attached to the UNet"
        )));
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("ss_network_module".to_string(), "networks.lora".to_string());
    metadata.insert("ss_network_dim".to_string(), rank.to_string());
    metadata.insert("ss_network_alpha".to_string(), alpha.to_string());
    let tmp = path.with_extension("safetensors.tmp");
    write_safetensors(&tmp, &tensors, &metadata)?;
    // Crash tests: the new file complete under its temporary name.
    agfsync_fault::point("export.before_rename");
    std::fs::rename(&tmp, path).map_err(|e| DpoError::io(path, e))?;
    Ok(count)
}
