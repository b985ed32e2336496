//! Atomic, resumable checkpoints.
//!
//! A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
//! `trainable.safetensors` (the adapter or UNet weights being trained),
//! `optimizer.safetensors` (AdamW's moments, `m.<name>` / `v.<name>`) and
//! `state.json` ([`CheckpointState`]: step, data position, LR schedule
//! position, random state, the config and the model identity).
//!
//! It is written into `checkpoints/.tmp-step-NNNNNNNN/`, every file synced,
//! then renamed into place and the parent folder synced; only then is
//! `checkpoints/latest` (itself replaced by rename) pointed at it and are
//! checkpoints beyond `keep_checkpoints` deleted. A crash at any moment
//! leaves the previous checkpoint complete and `latest` naming a complete
//! checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::DpoError;
use crate::loss::Target;
use crate::safetensors_io::{read_safetensors, write_safetensors};
use crate::trainer::{fnv, ModelSpec, TrainConfig, Trainer, UNetWeights};

/// Version of the checkpoint layout.
pub const FORMAT_VERSION: u32 = 1;

/// Where to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest complete checkpoint of the output folder.
    Latest,
    /// A checkpoint folder (or an output folder, meaning its latest).
    Path(PathBuf),
}

impl ResumeFrom {
    /// Parses a `--resume` value: `latest`, or a path.
    pub fn parse(s: &str) -> Self {
        if s == "latest" {
            Self::Latest
        } else {
            Self::Path(PathBuf::from(s))
        }
    }
}

/// Identifies the model a checkpoint was trained on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// Hash of the UNet config (its parsed JSON, key order independent).
    pub unet_config_hash: String,
    /// Weight files: name and size in bytes.
    pub weight_files: Vec<(String, u64)>,
    /// Training target.
    pub target: Target,
    /// Hash of all the above.
    pub hash: String,
}

impl ModelIdentity {
    /// The identity of `spec`.
    pub fn new(spec: &ModelSpec) -> Self {
        let canonical = serde_json::from_str::<serde_json::Value>(&spec.unet_config_json)
            .map(|v| canonical_json(&v))
            .unwrap_or_else(|_| spec.unet_config_json.clone());
        let unet_config_hash = format!("{:016x}", fnv(&canonical));
        let weight_files: Vec<(String, u64)> = match &spec.weights {
            UNetWeights::Files(files) => files
                .iter()
                .map(|p| {
                    (
                        p.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
                    )
                })
                .collect(),
            UNetWeights::Tensors(map) => vec![(
                "<in memory>".to_string(),
                map.values()
                    .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
                    .sum(),
            )],
        };
        let all = format!("{unet_config_hash}|{weight_files:?}|{:?}", spec.target);
        Self {
            unet_config_hash,
            weight_files,
            target: spec.target,
            hash: format!("{:016x}", fnv(&all)),
        }
    }

    /// Human-readable differences from `other` (empty when equal).
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut d = Vec::new();
        if self.unet_config_hash != other.unet_config_hash {
            d.push(format!(
                "the UNet config differs (hash {} in the checkpoint, {} now)",
                self.unet_config_hash, other.unet_config_hash
            ));
        }
        if self.weight_files != other.weight_files {
            d.push(format!(
                "the UNet weight files differ ({:?} in the checkpoint, {:?} now)",
                self.weight_files, other.weight_files
            ));
        }
        if self.target != other.target {
            d.push(format!(
                "the prediction type differs ({:?} in the checkpoint, {:?} now)",
                self.target, other.target
            ));
        }
        d
    }
}

/// JSON with object keys sorted, for hashing.
fn canonical_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let sorted: BTreeMap<_, _> = m.iter().collect();
            let parts: Vec<String> = sorted
                .into_iter()
                .map(|(k, v)| format!("{k:?}:{}", canonical_json(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        serde_json::Value::Array(a) => {
            format!(
                "[{}]",
                a.iter().map(canonical_json).collect::<Vec<_>>().join(",")
            )
        }
        other => other.to_string(),
    }
}

/// The random state of a run: counter-based streams, so the seed and the
/// next micro-batch counter are all there is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// The micro-batch counter the next draw uses.
    pub next_micro_batch: u64,
}

/// `state.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Pairs consumed (position in the seeded epoch orders).
    pub data_position: u64,
    /// AdamW's update count (bias correction).
    pub optimizer_steps: usize,
    /// The schedule position (the next step) and the rate it gives.
    pub lr_schedule_position: usize,
    /// The learning rate of the next step.
    pub next_lr: f64,
    /// Random state.
    pub rng: RngState,
    /// Names of the trainable tensors, in optimizer order.
    pub trainable: Vec<String>,
    /// The run's config.
    pub config: TrainConfig,
    /// The model trained.
    pub model: ModelIdentity,
}

/// Config fields that may change on resume (they do not alter the steps
/// already taken): extending a run, checkpoint frequency and retention.
// Checkpointing only changes float summation order and memory use, so a run
// may resume with it switched on or off.
const RESUMABLE_CHANGES: [&str; 4] = [
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "gradient_checkpointing",
];

fn ck_err(path: &Path, reason: impl Into<String>) -> DpoError {
    DpoError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn sync_dir(dir: &Path) -> Result<(), DpoError> {
    // Directories can be opened and synced on Unix; elsewhere this is a
    // best effort.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}

/// Writes a checkpoint of `trainer` under `out_dir/checkpoints/` atomically
/// and returns its folder.
pub fn save(trainer: &Trainer, out_dir: &Path) -> Result<PathBuf, DpoError> {
    let root = out_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| DpoError::io(&root, e))?;
    let name = format!("step-{:08}", trainer.step_count());
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| DpoError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| DpoError::io(&tmp, e))?;

    let mut weights = HashMap::new();
    let mut moments = HashMap::new();
    let (m, v) = trainer.optimizer().moments();
    for (i, t) in trainer.trainables().iter().enumerate() {
        weights.insert(t.name.clone(), t.var.as_tensor().clone());
        moments.insert(format!("m.{}", t.name), m[i].clone());
        moments.insert(format!("v.{}", t.name), v[i].clone());
    }
    write_safetensors(
        &tmp.join("trainable.safetensors"),
        &weights,
        &BTreeMap::new(),
    )?;
    write_safetensors(
        &tmp.join("optimizer.safetensors"),
        &moments,
        &BTreeMap::new(),
    )?;
    let cfg = trainer.config();
    let state = CheckpointState {
        format: FORMAT_VERSION,
        step: trainer.step_count(),
        data_position: trainer.data_position(),
        optimizer_steps: trainer.optimizer().step_count(),
        lr_schedule_position: trainer.step_count(),
        next_lr: trainer.current_lr(),
        rng: RngState {
            seed: cfg.seed,
            next_micro_batch: (trainer.step_count() * cfg.grad_accum) as u64,
        },
        trainable: trainer
            .trainables()
            .iter()
            .map(|t| t.name.clone())
            .collect(),
        config: cfg.clone(),
        model: trainer.spec().identity(),
    };
    let json =
        serde_json::to_string_pretty(&state).map_err(|e| ck_err(&tmp, format!("state: {e}")))?;
    let state_path = tmp.join("state.json");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&state_path).map_err(|e| DpoError::io(&state_path, e))?;
        f.write_all(json.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| DpoError::io(&state_path, e))?;
    }
    sync_dir(&tmp)?;
    // Crash tests: every file of the new checkpoint written, nothing renamed.
    agfsync_fault::point("checkpoint.before_rename");

    let final_dir = root.join(&name);
    if final_dir.exists() {
        // The same step saved again (a resumed run): move the old copy
        // aside first, so a complete copy exists at every moment.
        let old = root.join(format!(".old-{name}"));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&final_dir, &old).map_err(|e| DpoError::io(&final_dir, e))?;
        // Crash tests: neither copy under the final name (`resolve` falls
        // back to the newest complete folder).
        agfsync_fault::point("checkpoint.between_renames");
        std::fs::rename(&tmp, &final_dir).map_err(|e| DpoError::io(&final_dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &final_dir).map_err(|e| DpoError::io(&final_dir, e))?;
    }
    sync_dir(&root)?;
    // Crash tests: the new checkpoint in place, `latest` still naming the old.
    agfsync_fault::point("checkpoint.before_latest");

    let latest_tmp = root.join(".latest.tmp");
    std::fs::write(&latest_tmp, format!("{name}\n")).map_err(|e| DpoError::io(&latest_tmp, e))?;
    if let Ok(f) = std::fs::File::open(&latest_tmp) {
        let _ = f.sync_all();
    }
    let latest = root.join("latest");
    std::fs::rename(&latest_tmp, &latest).map_err(|e| DpoError::io(&latest, e))?;
    sync_dir(&root)?;

    prune(&root, cfg.keep_checkpoints, &name)?;
    tracing::info!("checkpoint {}", final_dir.display());
    Ok(final_dir)
}

/// Complete checkpoint folders under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>, DpoError> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
                    && p.join("state.json").exists()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    Ok(out)
}

fn prune(root: &Path, keep: usize, newest: &str) -> Result<(), DpoError> {
    let all = list(root)?;
    let n = all.len();
    for p in all.into_iter().take(n.saturating_sub(keep.max(1))) {
        if p.file_name().and_then(|n| n.to_str()) == Some(newest) {
            continue;
        }
        std::fs::remove_dir_all(&p).map_err(|e| DpoError::io(&p, e))?;
    }
    Ok(())
}

/// The checkpoint folder `from` designates for the output folder `out_dir`.
pub fn resolve(out_dir: &Path, from: &ResumeFrom) -> Result<PathBuf, DpoError> {
    let base = match from {
        ResumeFrom::Latest => out_dir.to_path_buf(),
        ResumeFrom::Path(p) => {
            if p.join("state.json").exists() {
                return Ok(p.clone());
            }
            p.clone()
        }
    };
    let root = if base.join("latest").exists() {
        base.clone()
    } else {
        base.join("checkpoints")
    };
    let latest = root.join("latest");
    let name = std::fs::read_to_string(&latest)
        .map_err(|_| ck_err(&base, "no checkpoint found (no checkpoints/latest)"))?;
    let dir = root.join(name.trim());
    if !dir.join("state.json").exists() {
        // `latest` is only updated after a complete write; fall back to the
        // newest complete folder anyway.
        return list(&root)?
            .pop()
            .ok_or_else(|| ck_err(&root, "no complete checkpoint"));
    }
    Ok(dir)
}

/// Reads `dir/state.json`.
pub fn read_state(dir: &Path) -> Result<CheckpointState, DpoError> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| DpoError::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| ck_err(dir, format!("state.json: {e}")))
}

/// What differs between a checkpoint's config and `now`, ignoring the
/// fields that may change on resume.
pub fn config_differences(saved: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(saved), serde_json::to_value(now))
    else {
        return vec!["the configs cannot be compared".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !RESUMABLE_CHANGES.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k} is {} in the checkpoint but {} now",
                a.get(k).cloned().unwrap_or_default(),
                b.get(k).cloned().unwrap_or_default()
            )
        })
        .collect()
}

/// Restores `trainer` from the checkpoint folder `dir`, refusing one of a
/// different model or config.
pub fn load(trainer: &mut Trainer, dir: &Path) -> Result<(), DpoError> {
    let state = read_state(dir)?;
    if state.format != FORMAT_VERSION {
        return Err(ck_err(
            dir,
            format!(
                "layout version {} (this build reads {FORMAT_VERSION})",
                state.format
            ),
        ));
    }
    let mut diffs = state.model.differences(&trainer.spec().identity());
    diffs.extend(config_differences(&state.config, trainer.config()));
    let names: Vec<String> = trainer
        .trainables()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    if diffs.is_empty() && names != state.trainable {
        diffs.push(format!(
            "the trainable tensors differ ({} in the checkpoint, {} now)",
            state.trainable.len(),
            names.len()
        ));
    }
    if !diffs.is_empty() {
        return Err(DpoError::ResumeMismatch {
            path: dir.to_path_buf(),
            differences: diffs.join("; "),
        });
    }
    let weights = read_safetensors(&dir.join("trainable.safetensors"), &Device::Cpu)?;
    let mut moments = read_safetensors(&dir.join("optimizer.safetensors"), &Device::Cpu)?;
    let mut m = Vec::new();
    let mut v = Vec::new();
    for n in &names {
        m.push(
            moments
                .remove(&format!("m.{n}"))
                .ok_or_else(|| ck_err(dir, format!("optimizer.safetensors lacks m.{n}")))?,
        );
        v.push(
            moments
                .remove(&format!("v.{n}"))
                .ok_or_else(|| ck_err(dir, format!("optimizer.safetensors lacks v.{n}")))?,
        );
    }
    trainer
        .restore_state(
            &weights,
            m,
            v,
            state.optimizer_steps,
            state.step,
            state.data_position,
        )
        .map_err(|e| match e {
            DpoError::Checkpoint { reason, .. } => ck_err(dir, reason),
            e => e,
        })
}
