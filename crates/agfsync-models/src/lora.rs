//! Loading LoRA adapter files (diffusers/PEFT and kohya formats) onto our
//! models' LoRA slots.
//!
//! A LoRA ("Low-Rank Adaptation", Hu et al. 2021) adds `scale * up @ down` to a
//! layer's weight, with `scale = alpha / rank * weight` (`weight` is the user's
//! adapter strength, diffusers' `adapter_weights`). Three layouts are read:
//!
//! * [`LoraFormat::Peft`]: what diffusers' `save_lora_weights` writes today,
//!   `unet.<module>.lora_A.weight` / `lora_B.weight` (and `text_encoder.`,
//!   `text_encoder_2.`), with the `LoraConfig` of each model in the
//!   `lora_adapter_metadata` JSON of the safetensors header
//!   (`unet.lora_alpha`, `unet.r`, `unet.alpha_pattern`, `unet.rank_pattern`,
//!   `unet.use_rslora`). Without metadata, alpha = rank, as diffusers does.
//! * [`LoraFormat::DiffusersLegacy`]: diffusers' layout before PEFT,
//!   `unet.<attn>.processor.to_q_lora.down.weight`,
//!   `text_encoder.<layer>.self_attn.to_q_lora.down.weight`,
//!   `<module>.lora.down.weight` and `<module>.lora_linear_layer.down.weight`
//!   (alpha = rank unless an `<module>.alpha` tensor is present).
//! * [`LoraFormat::Kohya`]: sd-scripts / A1111, `lora_unet_<module>.lora_down.weight`,
//!   `.lora_up.weight`, `.alpha`, with `lora_te_`/`lora_te1_` for the (first)
//!   text encoder and `lora_te2_` for SDXL's second. Module paths have their
//!   dots replaced by underscores, which is ambiguous, so they are matched
//!   against the module paths the model actually has. SD 1.x/2.x files name the
//!   UNet as diffusers does; SDXL files use the original LDM block names
//!   (`input_blocks_4_1_...`, `middle_block_1_...`, `output_blocks_2_1_...`),
//!   which are mapped onto diffusers' `down_blocks`/`mid_block`/`up_blocks` for
//!   the block layout of the model at hand.
//!
//! Adapters go onto linear layers and 1x1 convolutions that have a LoRA slot
//! (see [`crate::nn`]): the attention projections, feed-forward layers and
//! `proj_in`/`proj_out` of the UNet and the attention and MLP layers of the
//! text encoders. They are either attached ([`LoraMode::Attach`]: applied on
//! every pass with adapters on, removable, and off on the Diffusion-DPO
//! reference pass) or merged into the weights ([`LoraMode::Merge`]: free at
//! inference). Several adapters, with different names and weights, can be
//! active at once.
//!
//! Not supported (refused with an error naming the tensors): LoRA on
//! convolutions larger than 1x1 (LoCon / LyCORIS on ResNet convolutions),
//! LyCORIS LoHa/LoKr, DoRA, PEFT `lora_bias`, and `.ckpt`/`.pt` pickles.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::nn::{LoraAdapter, LoraRegistry, NamedSlot};
use crate::stable_diffusion::StableDiffusion;

/// Everything that can go wrong while reading or applying a LoRA file.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file could not be read.
    #[error("cannot read LoRA file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a (complete) safetensors file.
    #[error("{path} is not a readable safetensors file: {reason}. LoRA files must be .safetensors; the file may be truncated or damaged (download it again), or a .ckpt/.pt pickle, which agfsync does not read")]
    NotSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tensors are not laid out as any supported LoRA format.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the keys at fault.
        reason: String,
    },
    /// The file uses a LoRA variant agfsync does not implement.
    #[error("{path}: not supported yet: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported, with counts and example keys.
        what: String,
    },
    /// Too few of the file's modules correspond to layers of the model (or the
    /// file was made for another model family).
    #[error(transparent)]
    NoMatch(Box<NoMatch>),
    /// A module of the file does not fit the layer it names.
    #[error(transparent)]
    ShapeMismatch(Box<ShapeMismatch>),
    /// The adapter name is already attached to or merged into the model.
    #[error("an adapter named `{0}` is already attached to or merged into the model: remove it first or choose another name")]
    NameInUse(String),
    /// No adapter of that name is attached or merged.
    #[error("no adapter named `{0}` is attached to or merged into the model")]
    UnknownAdapter(String),
    /// The adapter weight is not a finite number.
    #[error("adapter weight {0} is not a finite number")]
    BadWeight(f64),
    /// A tensor operation failed.
    #[error("LoRA tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Details of [`LoraError::NoMatch`].
#[derive(Debug, thiserror::Error)]
#[error("{}", no_match_message(.path, *.matched, *.total, .hint.as_deref(), .example_keys, .example_modules))]
pub struct NoMatch {
    /// The file.
    pub path: PathBuf,
    /// Modules of the file that match a layer with a LoRA slot.
    pub matched: usize,
    /// Modules in the file.
    pub total: usize,
    /// Why the file looks made for another model family, when it does.
    pub hint: Option<String>,
    /// Up to 5 keys of the file that match nothing.
    pub example_keys: Vec<String>,
    /// Up to 5 module paths the model has LoRA slots for.
    pub example_modules: Vec<String>,
}

/// Details of [`LoraError::ShapeMismatch`].
#[derive(Debug, thiserror::Error)]
#[error("{path}: `{key}` does not fit the model's layer `{module}`: the LoRA has down {down:?} and up {up:?}, but the layer's weight is {weight:?}, which needs down [rank, {need_in}] and up [{need_out}, rank]. Was the LoRA made for another base model?")]
pub struct ShapeMismatch {
    /// The file.
    pub path: PathBuf,
    /// The file's key (without the `.lora_down.weight`-like suffix).
    pub key: String,
    /// The model's module path.
    pub module: String,
    /// Shape of the down tensor in the file (flattened to 2D).
    pub down: Vec<usize>,
    /// Shape of the up tensor in the file (flattened to 2D).
    pub up: Vec<usize>,
    /// Shape of the layer's weight.
    pub weight: Vec<usize>,
    /// Input features the down tensor must have.
    pub need_in: usize,
    /// Output features the up tensor must have.
    pub need_out: usize,
}

fn no_match_message(
    path: &Path,
    matched: usize,
    total: usize,
    hint: Option<&str>,
    keys: &[String],
    modules: &[String],
) -> String {
    let mut s = format!(
        "{}: only {matched} of the {total} LoRA modules in the file match a layer of the model",
        path.display()
    );
    if let Some(h) = hint {
        s.push_str(&format!(". {h}"));
    }
    if !keys.is_empty() {
        s.push_str(&format!(
            ". Keys that match nothing, for example: {}",
            keys.join(", ")
        ));
    }
    if !modules.is_empty() {
        s.push_str(&format!(
            ". Layers the model has, for example: {}",
            modules.join(", ")
        ));
    }
    s
}

/// The layout of a LoRA file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraFormat {
    /// diffusers' current layout (PEFT's `lora_A` / `lora_B`).
    Peft,
    /// diffusers' layout before PEFT (`to_q_lora.down`, `lora.down`).
    DiffusersLegacy,
    /// kohya sd-scripts / A1111 (`lora_unet_..._lora_down`).
    Kohya,
}

/// Which network of the pipeline a LoRA module targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraModel {
    /// The denoising UNet.
    Unet,
    /// The (first) text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl LoraModel {
    /// The diffusers component name (`unet`, `text_encoder`, `text_encoder_2`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// One adapted layer as stored in a LoRA file.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The network the module belongs to.
    pub model: LoraModel,
    /// Its module path: dotted diffusers/transformers naming
    /// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`) for
    /// PEFT and legacy files, kohya's underscored name without the
    /// `lora_unet_`-like prefix for kohya files (resolved against the model).
    pub name: String,
    /// The file's key for the module, without the tensor suffix (for messages).
    pub key: String,
    /// Down projection, `[rank, in]` (`[rank, in * k * k]` for convolutions),
    /// as stored (any float dtype, on the CPU).
    pub down: Tensor,
    /// Up projection, `[out, rank]`.
    pub up: Tensor,
    /// Network alpha; the scale is `alpha / rank * weight`.
    pub alpha: f64,
    /// True for PEFT's rank-stabilised LoRA (`use_rslora`): the scale is then
    /// `alpha / sqrt(rank) * weight`.
    pub rslora: bool,
}

impl LoraModule {
    /// The rank of the adapter.
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// `alpha / rank` (or `alpha / sqrt(rank)` for rsLoRA), before the
    /// adapter weight.
    pub fn base_scale(&self) -> f64 {
        let r = self.rank().max(1) as f64;
        if self.rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }
}

/// A parsed LoRA file: its modules per target network, with their down/up
/// tensors and alphas.
#[derive(Clone, Debug)]
pub struct LoraFile {
    path: PathBuf,
    format: LoraFormat,
    modules: Vec<LoraModule>,
    ignored: Vec<String>,
}

/// Parsed safetensors header data.
struct RawFile {
    tensors: HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
}

fn read_safetensors(path: &Path) -> Result<RawFile, LoraError> {
    let bytes = std::fs::read(path).map_err(|source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| LoraError::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 8 {
        return Err(bad(format!("it has only {} bytes", bytes.len())));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len8);
    let available = (bytes.len() - 8) as u64;
    if header_len > 100_000_000 {
        return Err(bad(format!(
            "the first 8 bytes announce a {header_len}-byte header, so this is not a safetensors file"
        )));
    }
    if header_len > available {
        return Err(bad(format!(
            "the header needs {header_len} bytes but only {available} follow (truncated)"
        )));
    }
    let header_end = 8 + header_len as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| bad(format!("its header is not JSON ({e})")))?;
    let Some(entries) = header.as_object() else {
        return Err(bad("its header is not a JSON object".into()));
    };
    let data_len = bytes.len() - header_end;
    let mut metadata = HashMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    if let Some(s) = v.as_str() {
                        metadata.insert(k.clone(), s.to_string());
                    }
                }
            }
            continue;
        }
        let end = entry
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64());
        match end {
            Some(end) if end as usize <= data_len => {}
            Some(end) => {
                return Err(bad(format!(
                    "tensor `{name}` ends at data byte {end} but the file holds only {data_len} data bytes (truncated)"
                )))
            }
            None => return Err(bad(format!("tensor `{name}` has no data_offsets"))),
        }
        crate::weights::check_shape(name, entry).map_err(&bad)?;
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    Ok(RawFile { tensors, metadata })
}

/// One half (or the alpha) of a module while a file is parsed.
#[derive(Default)]
struct Parts {
    key: String,
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

fn scalar(t: &Tensor) -> Result<f64, candle_core::Error> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    v.first()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("empty alpha tensor".into()))
}

/// PEFT `LoraConfig` fields of one model, from `lora_adapter_metadata`.
#[derive(Default, Clone)]
struct PeftConfig {
    alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
    dora: bool,
}

/// peft's pattern rule, with the pattern taken literally: the pattern is the
/// module path itself or a dotted suffix of it.
fn pattern_matches(pattern: &str, module: &str) -> bool {
    module == pattern || module.ends_with(&format!(".{pattern}"))
}

fn peft_configs(
    path: &Path,
    metadata: &HashMap<String, String>,
) -> Result<HashMap<LoraModel, PeftConfig>, LoraError> {
    let mut out = HashMap::new();
    let Some(raw) = metadata.get("lora_adapter_metadata") else {
        return Ok(out);
    };
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| LoraError::Format {
        path: path.to_path_buf(),
        reason: format!("the `lora_adapter_metadata` header entry is not JSON: {e}"),
    })?;
    let Some(map) = v.as_object() else {
        return Ok(out);
    };
    for model in [
        LoraModel::Unet,
        LoraModel::TextEncoder,
        LoraModel::TextEncoder2,
    ] {
        let get = |field: &str| map.get(&format!("{}.{field}", model.name()));
        if !map
            .keys()
            .any(|k| k.starts_with(&format!("{}.", model.name())))
        {
            continue;
        }
        let mut cfg = PeftConfig {
            alpha: get("lora_alpha").and_then(|a| a.as_f64()),
            rslora: get("use_rslora").and_then(|b| b.as_bool()).unwrap_or(false),
            dora: get("use_dora").and_then(|b| b.as_bool()).unwrap_or(false),
            ..Default::default()
        };
        if let Some(p) = get("alpha_pattern").and_then(|p| p.as_object()) {
            for (k, a) in p {
                if let Some(a) = a.as_f64() {
                    cfg.alpha_pattern.push((k.clone(), a));
                }
            }
        }
        out.insert(model, cfg);
    }
    Ok(out)
}

/// Splits a PEFT / legacy key into the target model and the rest.
fn split_model_prefix(key: &str) -> (Option<LoraModel>, &str) {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    for (prefix, model) in [
        ("unet.", LoraModel::Unet),
        ("text_encoder_2.", LoraModel::TextEncoder2),
        ("text_encoder.", LoraModel::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return (Some(model), rest);
        }
    }
    // Unprefixed files: diffusers' `save_attn_procs` (UNet) and raw PEFT
    // adapters of a text encoder.
    if key.starts_with("text_model.") || key.starts_with("encoder.layers.") {
        return (Some(LoraModel::TextEncoder), key);
    }
    if [
        "down_blocks.",
        "mid_block.",
        "up_blocks.",
        "conv_in",
        "conv_out",
    ]
    .iter()
    .any(|p| key.starts_with(p))
    {
        return (Some(LoraModel::Unet), key);
    }
    (None, key)
}

/// The module path of a legacy diffusers stem (the key without
/// `.down.weight`/`.up.weight`/`.alpha`).
fn legacy_module(model: LoraModel, stem: &str) -> String {
    let text = model != LoraModel::Unet;
    for (tag, unet_proj, te_proj) in [
        ("to_q_lora", "to_q", "q_proj"),
        ("to_k_lora", "to_k", "k_proj"),
        ("to_v_lora", "to_v", "v_proj"),
        ("to_out_lora", "to_out.0", "out_proj"),
    ] {
        if let Some(base) = stem.strip_suffix(tag) {
            let base = base.strip_suffix("processor.").unwrap_or(base);
            return format!("{base}{}", if text { te_proj } else { unet_proj });
        }
    }
    for tag in [".lora_linear_layer", ".lora"] {
        if let Some(base) = stem.strip_suffix(tag) {
            return base.to_string();
        }
    }
    stem.to_string()
}

fn detect_format(keys: &[&String]) -> Option<LoraFormat> {
    if keys.iter().any(|k| {
        ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"]
            .iter()
            .any(|p| k.starts_with(p))
    }) {
        return Some(LoraFormat::Kohya);
    }
    if keys
        .iter()
        .any(|k| k.contains(".lora_A.") || k.contains(".lora_B."))
    {
        return Some(LoraFormat::Peft);
    }
    if keys.iter().any(|k| {
        k.ends_with(".down.weight")
            && (k.contains("_lora.") || k.contains(".lora.") || k.contains(".lora_linear_layer."))
    }) {
        return Some(LoraFormat::DiffusersLegacy);
    }
    None
}

/// A key without its tensor suffix: the module part, for messages.
fn key_stem(format: LoraFormat, key: &str) -> &str {
    if format == LoraFormat::Kohya {
        return key.split_once('.').map(|(s, _)| s).unwrap_or(key);
    }
    [
        ".lora_A.weight",
        ".lora_B.weight",
        ".down.weight",
        ".up.weight",
        ".alpha",
    ]
    .iter()
    .find_map(|suffix| key.strip_suffix(suffix))
    .or_else(|| key.rsplit_once(".lora").map(|(s, _)| s))
    .unwrap_or(key)
}

fn examples(keys: &[String]) -> String {
    keys.iter()
        .take(3)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl LoraFile {
    /// Reads a LoRA safetensors file (or the `pytorch_lora_weights.safetensors`
    /// of a folder saved by diffusers) and parses its layout.
    pub fn load(path: &Path) -> Result<Self, LoraError> {
        let path = if path.is_dir() {
            path.join("pytorch_lora_weights.safetensors")
        } else {
            path.to_path_buf()
        };
        let raw = read_safetensors(&path)?;
        Self::from_tensors(&path, raw.tensors, &raw.metadata)
    }

    /// Parses tensors already in memory (`metadata` is the safetensors header
    /// metadata; `path` only names the source in messages).
    pub fn from_tensors(
        path: &Path,
        tensors: HashMap<String, Tensor>,
        metadata: &HashMap<String, String>,
    ) -> Result<Self, LoraError> {
        let path = path.to_path_buf();
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        let unsupported = |what: String| LoraError::Unsupported {
            path: path.clone(),
            what,
        };
        // LyCORIS variants use sd-scripts' module names with other suffixes.
        let lycoris: Vec<String> = keys
            .iter()
            .filter(|k| {
                k.starts_with("lora_")
                    && k.split_once('.').is_some_and(|(_, suffix)| {
                        ["hada_", "lokr_", "lora_mid", "diff", "oft_", "on_input"]
                            .iter()
                            .any(|m| suffix.starts_with(m))
                    })
            })
            .map(|k| k.to_string())
            .collect();
        if !lycoris.is_empty() {
            return Err(unsupported(format!(
                "{} tensors of LyCORIS variants (LoHa, LoKr, LoCon with Tucker decomposition, OFT, IA3 or full diffs), e.g. {}; only plain LoRA (down/up pairs) is implemented",
                lycoris.len(),
                examples(&lycoris)
            )));
        }
        let dora: Vec<String> = keys
            .iter()
            .filter(|k| k.contains("dora_scale") || k.contains("lora_magnitude_vector"))
            .map(|k| k.to_string())
            .collect();
        if !dora.is_empty() {
            return Err(unsupported(format!(
                "DoRA ({} magnitude tensors, e.g. {})",
                dora.len(),
                examples(&dora)
            )));
        }
        let Some(format) = detect_format(&keys) else {
            let some: Vec<String> = keys.iter().take(5).map(|k| k.to_string()).collect();
            return Err(LoraError::Format {
                path,
                reason: format!(
                    "no LoRA tensors found ({} tensors, none named like `*.lora_A.weight`, `lora_unet_*.lora_down.weight` or `*_lora.down.weight`); first keys: {}",
                    keys.len(),
                    some.join(", ")
                ),
            });
        };
        let configs = if format == LoraFormat::Peft {
            peft_configs(&path, metadata)?
        } else {
            HashMap::new()
        };
        if let Some((m, _)) = configs.iter().find(|(_, c)| c.dora) {
            return Err(unsupported(format!(
                "DoRA (`{}.use_dora` is true in the file's metadata)",
                m.name()
            )));
        }

        // Group the tensors by module.
        let mut parts: BTreeMap<(LoraModel, String), Parts> = BTreeMap::new();
        let mut ignored = Vec::new();
        let mut ignored_modules: HashSet<String> = HashSet::new();
        for key in keys {
            let t = &tensors[key];
            let (model, name, kind) = match format {
                LoraFormat::Kohya => {
                    let (stem, suffix) = key.split_once('.').unwrap_or((key, ""));
                    let (model, name) = if let Some(n) = stem.strip_prefix("lora_unet_") {
                        (Some(LoraModel::Unet), n)
                    } else if let Some(n) = stem.strip_prefix("lora_te1_") {
                        (Some(LoraModel::TextEncoder), n)
                    } else if let Some(n) = stem.strip_prefix("lora_te2_") {
                        (Some(LoraModel::TextEncoder2), n)
                    } else if let Some(n) = stem.strip_prefix("lora_te_") {
                        (Some(LoraModel::TextEncoder), n)
                    } else {
                        (None, stem)
                    };
                    let kind = match suffix {
                        "lora_down.weight" => Some(0),
                        "lora_up.weight" => Some(1),
                        "alpha" => Some(2),
                        _ => None,
                    };
                    (model, name.to_string(), kind)
                }
                LoraFormat::Peft => {
                    let (model, rest) = split_model_prefix(key);
                    let (name, kind) = if let Some(n) = rest.strip_suffix(".lora_A.weight") {
                        (n, Some(0))
                    } else if let Some(n) = rest.strip_suffix(".lora_B.weight") {
                        (n, Some(1))
                    } else if rest.ends_with(".lora_B.bias") {
                        return Err(unsupported(format!(
                            "PEFT `lora_bias` (bias tensors on lora_B, e.g. `{key}`)"
                        )));
                    } else {
                        (rest, None)
                    };
                    (model, name.to_string(), kind)
                }
                LoraFormat::DiffusersLegacy => {
                    let (model, rest) = split_model_prefix(key);
                    let m = model.unwrap_or(LoraModel::Unet);
                    if let Some(stem) = rest.strip_suffix(".down.weight") {
                        (model, legacy_module(m, stem), Some(0))
                    } else if let Some(stem) = rest.strip_suffix(".up.weight") {
                        (model, legacy_module(m, stem), Some(1))
                    } else if let Some(stem) = rest.strip_suffix(".alpha") {
                        let stem = stem.strip_suffix(".down.weight").unwrap_or(stem);
                        (model, legacy_module(m, stem), Some(2))
                    } else {
                        (model, rest.to_string(), None)
                    }
                }
            };
            let stem = key_stem(format, key);
            let (Some(model), Some(kind)) = (model, kind) else {
                ignored.push(key.clone());
                ignored_modules.insert(stem.to_string());
                continue;
            };
            let entry = parts.entry((model, name)).or_default();
            if entry.key.is_empty() || kind == 0 {
                entry.key = stem.to_string();
            }
            match kind {
                0 => entry.down = Some(t.clone()),
                1 => entry.up = Some(t.clone()),
                _ => entry.alpha = Some(scalar(t)?),
            }
        }

        let mut modules = Vec::with_capacity(parts.len());
        let mut big_convs = Vec::new();
        for ((model, name), p) in parts {
            let (down, up) = match (p.down, p.up) {
                (Some(d), Some(u)) => (d, u),
                (Some(_), None) | (None, Some(_)) => {
                    return Err(LoraError::Format {
                        path,
                        reason: format!("`{}` has only one of its down/up tensors", p.key),
                    })
                }
                (None, None) => {
                    // An alpha without tensors: nothing to apply.
                    continue;
                }
            };
            let dd = down.dims().to_vec();
            let ud = up.dims().to_vec();
            let shape_err = |what: &str| LoraError::Format {
                path: path.clone(),
                reason: format!("`{}`: {what} (down {dd:?}, up {ud:?})", p.key),
            };
            let ok_down = dd.len() == 2 || dd.len() == 4;
            let ok_up = ud.len() == 2 || (ud.len() == 4 && ud[2] == 1 && ud[3] == 1);
            if !ok_down || !ok_up {
                return Err(shape_err(
                    "down must be [rank, in] or [rank, in, k, k] and up [out, rank] or [out, rank, 1, 1]",
                ));
            }
            if dd[0] != ud[1] {
                return Err(shape_err(&format!(
                    "rank mismatch: down has rank {} but up has rank {}",
                    dd[0], ud[1]
                )));
            }
            if dd.len() == 4 && (dd[2] != 1 || dd[3] != 1) {
                big_convs.push((p.key.clone(), format!("{}x{}", dd[2], dd[3])));
                continue;
            }
            let rank = dd[0];
            let down = down.reshape((rank, down.elem_count() / rank.max(1)))?;
            let up = up.reshape((ud[0], rank))?;
            let cfg = configs.get(&model);
            let alpha = match (format, cfg) {
                (LoraFormat::Peft, Some(c)) => c
                    .alpha_pattern
                    .iter()
                    .find(|(pat, _)| pattern_matches(pat, &name))
                    .map(|(_, a)| *a)
                    .or(c.alpha)
                    // peft's default lora_alpha
                    .unwrap_or(8.0),
                _ => p.alpha.unwrap_or(rank as f64),
            };
            modules.push(LoraModule {
                model,
                name,
                key: p.key,
                down,
                up,
                alpha,
                rslora: cfg.is_some_and(|c| c.rslora),
            });
        }
        if !big_convs.is_empty() {
            let mut kernels: Vec<String> = big_convs.iter().map(|(_, k)| k.clone()).collect();
            kernels.sort();
            kernels.dedup();
            let keys: Vec<String> = big_convs.iter().map(|(k, _)| k.clone()).collect();
            return Err(unsupported(format!(
                "{} tensors for {} convolutions ({} modules: LoCon on ResNet or sampler convolutions), e.g. {}; agfsync applies LoRA to linear layers and 1x1 convolutions only",
                2 * big_convs.len(),
                kernels.join("/"),
                big_convs.len(),
                examples(&keys)
            )));
        }
        if modules.is_empty() {
            return Err(LoraError::Format {
                path,
                reason: format!(
                    "no complete LoRA module (down and up tensors) found; unrecognised keys: {}",
                    examples(&ignored)
                ),
            });
        }
        let mut ignored: Vec<String> = ignored_modules.into_iter().collect();
        ignored.sort();
        Ok(Self {
            path,
            format,
            modules,
            ignored,
        })
    }

    /// The file the adapter was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layout of the file.
    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// Every module of the file.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// The modules for one network.
    pub fn modules_for(&self, model: LoraModel) -> impl Iterator<Item = &LoraModule> {
        self.modules.iter().filter(move |m| m.model == model)
    }

    /// Keys (module stems) the parser did not recognise: tensors for another
    /// network than the UNet and text encoders, or of unknown kinds. They count
    /// as unmatched modules when the file is applied.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// The rank most modules have (the larger one on a tie): what diffusers
    /// calls `r`. See [`LoraFile::ranks`] for all of them.
    pub fn rank(&self) -> usize {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for m in &self.modules {
            *counts.entry(m.rank()).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(r, c)| (*c, *r))
            .map(|(r, _)| r)
            .unwrap_or(0)
    }

    /// The distinct ranks of the modules, ascending.
    pub fn ranks(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.modules.iter().map(|m| m.rank()).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// Reasons to believe the file was made for SDXL.
    fn sdxl_signals(&self) -> Vec<String> {
        let mut out = Vec::new();
        let te2: Vec<&LoraModule> = self.modules_for(LoraModel::TextEncoder2).collect();
        if let Some(m) = te2.first() {
            out.push(format!(
                "{} modules for a second text encoder, like `{}`",
                te2.len(),
                m.key
            ));
        }
        if let Some(m) = self
            .modules_for(LoraModel::Unet)
            .find(|m| transformer_depth_index(&m.name).is_some_and(|d| d >= 1))
        {
            out.push(format!(
                "transformer blocks deeper than SD 1.x/2.x have, like `{}`",
                m.key
            ));
        }
        out
    }

    /// Reasons to believe the file was made for SD 1.x/2.x.
    fn sd1_signals(&self, layers_per_block: usize) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(m) = self
            .modules_for(LoraModel::Unet)
            .find(|m| first_block_attention(&m.name, layers_per_block))
        {
            out.push(format!(
                "attention in the first UNet block, which SDXL does not have, like `{}`",
                m.key
            ));
        }
        if self.format == LoraFormat::Kohya
            && self.modules_for(LoraModel::TextEncoder2).next().is_none()
        {
            if let Some(m) = self
                .modules
                .iter()
                .find(|m| m.model == LoraModel::TextEncoder && m.key.starts_with("lora_te_"))
            {
                out.push(format!("a single text encoder, like `{}`", m.key));
            }
        }
        out
    }
}

/// `k` of the first `transformer_blocks.k` / `transformer_blocks_k` in a path.
fn transformer_depth_index(name: &str) -> Option<usize> {
    for sep in ["transformer_blocks.", "transformer_blocks_"] {
        if let Some(i) = name.find(sep) {
            let rest = &name[i + sep.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            return rest[..end].parse().ok();
        }
    }
    None
}

/// True for attentions of the first down block (or the last up block), which
/// SD 1.x/2.x have and SDXL does not.
fn first_block_attention(name: &str, layers: usize) -> bool {
    if name.starts_with("down_blocks.0.attentions") || name.starts_with("down_blocks_0_attentions")
    {
        return true;
    }
    for j in 1..=layers {
        if name.starts_with(&format!("input_blocks_{j}_1_")) {
            return true;
        }
    }
    false
}

/// How to apply an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraMode {
    /// Keep the adapter beside the weights: applied on passes with adapters
    /// on, skipped on the reference pass, removable by detaching.
    Attach,
    /// Add the adapter into the weights: no inference cost, also seen by the
    /// reference pass, removable by unmerging.
    Merge,
}

/// The LoRA registries of the networks an adapter may target.
#[derive(Clone, Copy, Debug)]
pub struct LoraTargets<'a> {
    /// The UNet's slots.
    pub unet: &'a LoraRegistry,
    /// The (first) text encoder's slots; `None` leaves it alone (its modules
    /// in a file then count as unmatched).
    pub text_encoder: Option<&'a LoraRegistry>,
    /// SDXL's second text encoder's slots.
    pub text_encoder_2: Option<&'a LoraRegistry>,
}

impl<'a> LoraTargets<'a> {
    /// Every network of a loaded pipeline.
    pub fn of(sd: &'a StableDiffusion) -> Self {
        Self {
            unet: sd.unet.lora(),
            text_encoder: Some(sd.text_encoder.lora()),
            text_encoder_2: sd.text_encoder_2.as_ref().map(|t| t.lora()),
        }
    }

    fn registry(&self, model: LoraModel) -> Option<&'a LoraRegistry> {
        match model {
            LoraModel::Unet => Some(self.unet),
            LoraModel::TextEncoder => self.text_encoder,
            LoraModel::TextEncoder2 => self.text_encoder_2,
        }
    }

    fn all_slots(&self) -> Vec<NamedSlot> {
        [Some(self.unet), self.text_encoder, self.text_encoder_2]
            .into_iter()
            .flatten()
            .flat_map(|r| r.slots())
            .collect()
    }

    /// Names of the adapters attached to or merged into any of the networks.
    pub fn adapter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .all_slots()
            .iter()
            .flat_map(|(_, s)| {
                s.adapters()
                    .into_iter()
                    .map(|a| a.name)
                    .chain(s.merged())
                    .collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// How many of a file's modules matched, for one network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelMatch {
    /// Modules applied.
    pub matched: usize,
    /// Modules the file has for this network.
    pub total: usize,
}

/// What [`apply_lora`] did.
#[derive(Clone, Debug)]
pub struct LoraReport {
    /// The file's layout.
    pub format: LoraFormat,
    /// How the adapter was applied.
    pub mode: LoraMode,
    /// Modules applied, over all networks.
    pub matched: usize,
    /// Modules in the file (including unrecognised ones).
    pub total: usize,
    /// Per network.
    pub per_model: BTreeMap<LoraModel, ModelMatch>,
    /// Keys of the file that were not applied (no such layer, no LoRA slot on
    /// it, or its network not among the targets): callers should warn.
    pub unmatched: Vec<String>,
}

/// What [`remove_lora`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoveReport {
    /// Layers the adapter was detached from.
    pub detached: usize,
    /// Layers the adapter was unmerged from.
    pub unmerged: usize,
}

fn normalize(model: LoraModel, path: &str) -> &str {
    match model {
        LoraModel::Unet => path,
        _ => path.strip_prefix("text_model.").unwrap_or(path),
    }
}

/// The slots of one network, indexed for matching file names.
struct Index {
    model: LoraModel,
    slots: Vec<NamedSlot>,
    dotted: HashMap<String, usize>,
    flat: HashMap<String, Option<usize>>,
    layers_per_block: usize,
    up_attn: HashSet<usize>,
}

fn block_index(path: &str, prefix: &str) -> Option<(usize, usize)> {
    let rest = path.strip_prefix(prefix)?;
    let (i, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("attentions.")?;
    let (j, _) = rest.split_once('.')?;
    Some((i.parse().ok()?, j.parse().ok()?))
}

impl Index {
    fn new(model: LoraModel, registry: &LoraRegistry) -> Self {
        let slots = registry.slots();
        let mut dotted = HashMap::new();
        let mut flat: HashMap<String, Option<usize>> = HashMap::new();
        let mut layers = 0;
        let mut up_attn = HashSet::new();
        for (i, (path, _)) in slots.iter().enumerate() {
            let n = normalize(model, path);
            dotted.insert(n.to_string(), i);
            flat.entry(n.replace('.', "_"))
                .and_modify(|e| *e = None)
                .or_insert(Some(i));
            if let Some((_, j)) = block_index(path, "down_blocks.") {
                layers = layers.max(j + 1);
            }
            if let Some((i, _)) = block_index(path, "up_blocks.") {
                up_attn.insert(i);
            }
        }
        Self {
            model,
            slots,
            dotted,
            flat,
            layers_per_block: if layers == 0 { 2 } else { layers },
            up_attn,
        }
    }

    fn resolve(&self, format: LoraFormat, name: &str) -> Option<usize> {
        if format != LoraFormat::Kohya {
            return self.dotted.get(normalize(self.model, name)).copied();
        }
        let name = match self.model {
            LoraModel::Unet => name,
            _ => name.strip_prefix("text_model_").unwrap_or(name),
        };
        if let Some(i) = self.flat.get(name) {
            return *i;
        }
        if self.model == LoraModel::Unet {
            let mapped = ldm_to_diffusers(name, self.layers_per_block, &self.up_attn)?;
            return self.flat.get(&mapped).copied().flatten();
        }
        None
    }
}

fn take_num(s: &str) -> Option<(usize, &str)> {
    let end = s.find('_').unwrap_or(s.len());
    let n = s[..end].parse().ok()?;
    Some((n, s.get(end + 1..).unwrap_or("")))
}

fn join(prefix: String, rest: &str) -> String {
    if rest.is_empty() {
        prefix
    } else {
        format!("{prefix}_{rest}")
    }
}

/// Maps an underscored LDM (original Stable Diffusion / sgm) UNet name onto
/// diffusers' underscored naming, for a UNet with `layers` ResNets per down
/// block (SD 1.x, 2.x and SDXL all have 2). `up_attn` holds the up blocks
/// that have attentions.
fn ldm_to_diffusers(name: &str, layers: usize, up_attn: &HashSet<usize>) -> Option<String> {
    let per = layers + 1;
    if let Some(rest) = name.strip_prefix("input_blocks_") {
        let (n, rest) = take_num(rest)?;
        if n == 0 {
            return Some("conv_in".into());
        }
        let (m, rest) = take_num(rest)?;
        let (i, j) = ((n - 1) / per, (n - 1) % per);
        return Some(match m {
            0 if j == layers => format!("down_blocks_{i}_downsamplers_0_conv"),
            0 => join(format!("down_blocks_{i}_resnets_{j}"), rest),
            1 => join(format!("down_blocks_{i}_attentions_{j}"), rest),
            _ => return None,
        });
    }
    if let Some(rest) = name.strip_prefix("middle_block_") {
        let (m, rest) = take_num(rest)?;
        let prefix = match m {
            0 => "mid_block_resnets_0",
            1 => "mid_block_attentions_0",
            2 => "mid_block_resnets_1",
            _ => return None,
        };
        return Some(join(prefix.to_string(), rest));
    }
    if let Some(rest) = name.strip_prefix("output_blocks_") {
        let (n, rest) = take_num(rest)?;
        let (m, rest) = take_num(rest)?;
        let (i, j) = (n / per, n % per);
        return Some(match m {
            0 => join(format!("up_blocks_{i}_resnets_{j}"), rest),
            1 if up_attn.contains(&i) => join(format!("up_blocks_{i}_attentions_{j}"), rest),
            1 | 2 => format!("up_blocks_{i}_upsamplers_0_conv"),
            _ => return None,
        });
    }
    None
}

/// A matched module ready to apply.
struct Planned {
    slot: usize,
    model: LoraModel,
    down: Tensor,
    up: Tensor,
    scale: f64,
}

/// Applies `file` to the target networks as the adapter `name` at strength
/// `weight` (per layer `scale = alpha / rank * weight`, or
/// `alpha / sqrt(rank) * weight` for rsLoRA), attached or merged.
///
/// Every module is matched and checked before any layer changes, so a file
/// that is refused leaves the model as it was. Errors:
/// * [`LoraError::NameInUse`] when an adapter of that name is already there;
/// * [`LoraError::NoMatch`] (with up to 5 unmatched keys and 5 module paths
///   of the model) when no module matches, when more than half of them name
///   no layer with a LoRA slot, or when the file looks made for another
///   model family (SDXL vs SD 1.x/2.x) and does not fully match. Modules of
///   networks left out of `targets` are not counted against the file;
/// * [`LoraError::ShapeMismatch`] when a module's shapes do not fit its layer.
///
/// Otherwise the modules that matched nothing are listed in
/// [`LoraReport::unmatched`]; callers should warn about them.
pub fn apply_lora(
    file: &LoraFile,
    targets: &LoraTargets,
    name: &str,
    weight: f64,
    mode: LoraMode,
) -> Result<LoraReport, LoraError> {
    if !weight.is_finite() {
        return Err(LoraError::BadWeight(weight));
    }
    if targets.adapter_names().iter().any(|n| n == name) {
        return Err(LoraError::NameInUse(name.to_string()));
    }
    let mut indexes: BTreeMap<LoraModel, Index> = BTreeMap::new();
    for model in [
        LoraModel::Unet,
        LoraModel::TextEncoder,
        LoraModel::TextEncoder2,
    ] {
        if let Some(r) = targets.registry(model) {
            indexes.insert(model, Index::new(model, r));
        }
    }
    let mut per_model: BTreeMap<LoraModel, ModelMatch> = BTreeMap::new();
    let mut unmatched: Vec<String> = file.ignored().to_vec();
    let mut unmatched_models: Vec<LoraModel> = Vec::new();
    let mut planned: Vec<Planned> = Vec::new();
    let mut first_shape_error: Option<LoraError> = None;
    let mut misfits = 0usize;
    // Modules of networks that are not among the targets.
    let mut skipped = 0usize;
    let mut taken: HashMap<(LoraModel, usize), String> = HashMap::new();
    for m in file.modules() {
        let entry = per_model.entry(m.model).or_default();
        entry.total += 1;
        let found = indexes
            .get(&m.model)
            .and_then(|idx| idx.resolve(file.format(), &m.name).map(|i| (idx, i)));
        let Some((idx, i)) = found else {
            if !indexes.contains_key(&m.model) {
                skipped += 1;
            }
            unmatched.push(m.key.clone());
            unmatched_models.push(m.model);
            continue;
        };
        if let Some(other) = taken.insert((m.model, i), m.key.clone()) {
            return Err(LoraError::Format {
                path: file.path().to_path_buf(),
                reason: format!(
                    "`{other}` and `{}` both target the layer `{}`",
                    m.key, idx.slots[i].0
                ),
            });
        }
        let (path, slot) = &idx.slots[i];
        let w = slot.weight();
        let wd = w.dims().to_vec();
        let out = wd[0];
        let need_in = w.elem_count() / out.max(1);
        if m.down.dim(1)? != need_in || m.up.dim(0)? != out {
            misfits += 1;
            if first_shape_error.is_none() {
                first_shape_error = Some(LoraError::ShapeMismatch(Box::new(ShapeMismatch {
                    path: file.path().to_path_buf(),
                    key: m.key.clone(),
                    module: path.clone(),
                    down: m.down.dims().to_vec(),
                    up: m.up.dims().to_vec(),
                    weight: wd,
                    need_in,
                    need_out: out,
                })));
            }
            continue;
        }
        entry.matched += 1;
        let (device, dtype) = (w.device().clone(), w.dtype());
        let work = match mode {
            LoraMode::Attach => dtype,
            LoraMode::Merge => DType::F32,
        };
        planned.push(Planned {
            slot: i,
            model: m.model,
            down: m.down.to_device(&device)?.to_dtype(work)?,
            up: m.up.to_device(&device)?.to_dtype(work)?,
            scale: m.base_scale() * weight,
        });
    }
    let total = file.modules().len() + file.ignored().len();
    let matched = planned.len();

    // Family check: only decisive when something does not fit.
    let unet_layers = indexes
        .get(&LoraModel::Unet)
        .map(|i| i.layers_per_block)
        .unwrap_or(2);
    let model_is_xl = targets.text_encoder_2.is_some()
        || indexes.get(&LoraModel::Unet).is_some_and(|i| {
            i.slots
                .iter()
                .any(|(p, _)| transformer_depth_index(p).is_some_and(|d| d >= 1))
        });
    let incomplete = matched < total;

    let hint = if !incomplete {
        None
    } else if !model_is_xl {
        let s = file.sdxl_signals();
        (!s.is_empty()).then(|| {
            format!(
                "This looks like an SDXL LoRA ({}), but the model is SD 1.x/2.x: use a LoRA made for the model's family",
                s.join("; ")
            )
        })
    } else {
        let s = file.sd1_signals(unet_layers);
        (!s.is_empty() && file.sdxl_signals().is_empty()).then(|| {
            format!(
                "This looks like an SD 1.x/2.x LoRA ({}), but the model is SDXL: use a LoRA made for the model's family",
                s.join("; ")
            )
        })
    };
    // Mostly unmatched names (or a family mismatch) is a wrong-file error;
    // names that exist with the wrong shapes are reported as shape errors.
    // Modules of networks left out of the targets do not count here.
    let name_unmatched = unmatched.len() - skipped;
    let too_few = matched == 0 || 2 * (matched + misfits) < total - skipped;
    if hint.is_some() || matched + misfits == 0 || (too_few && name_unmatched >= misfits) {
        let side = unmatched_models
            .first()
            .and_then(|m| indexes.get(m))
            .or_else(|| indexes.get(&LoraModel::Unet));
        let example_modules = side
            .map(|i| i.slots.iter().take(5).map(|(p, _)| p.clone()).collect())
            .unwrap_or_default();
        return Err(LoraError::NoMatch(Box::new(NoMatch {
            path: file.path().to_path_buf(),
            matched,
            total,
            hint,
            example_keys: unmatched.iter().take(5).cloned().collect(),
            example_modules,
        })));
    }
    if let Some(e) = first_shape_error {
        return Err(e);
    }

    let slots_of = |m: LoraModel| indexes.get(&m).map(|i| &i.slots);
    for p in planned {
        let Some(slots) = slots_of(p.model) else {
            continue;
        };
        let slot = &slots[p.slot].1;
        let adapter = LoraAdapter {
            name: name.to_string(),
            down: p.down,
            up: p.up,
            scale: p.scale,
        };
        match mode {
            LoraMode::Attach => slot.push(adapter),
            LoraMode::Merge => slot.merge(adapter)?,
        }
    }
    Ok(LoraReport {
        format: file.format(),
        mode,
        matched,
        total,
        per_model,
        unmatched,
    })
}

/// Removes the adapter `name` from every target network: detaches it where
/// it is attached and subtracts it where it was merged.
pub fn remove_lora(targets: &LoraTargets, name: &str) -> Result<RemoveReport, LoraError> {
    let mut report = RemoveReport::default();
    for (_, slot) in targets.all_slots() {
        report.detached += usize::from(slot.remove(name) > 0);
        if slot.unmerge(name)? {
            report.unmerged += 1;
        }
    }
    if report.detached == 0 && report.unmerged == 0 {
        return Err(LoraError::UnknownAdapter(name.to_string()));
    }
    Ok(report)
}
