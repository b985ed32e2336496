//! A run: its directory, config and store, and what every stage needs to
//! report progress and to stop cleanly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use serde::Serialize;

use agfsync_store::Store;

use crate::config::{template, Preset, RunConfig, CONFIG_FILE};
use crate::error::{PipelineError, Result};
use crate::shard::Shard;

/// Progress of a stage, drawn by the caller (a progress bar in the CLI).
pub trait Progress {
    /// A stage begins `total` units of work.
    fn begin(&self, stage: &str, total: u64);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// The stage ended.
    fn end(&self);
}

/// Progress that draws nothing (tests, `--quiet`).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

/// What a stage needs besides the run: where to report progress, and a
/// flag that asks it to stop after the unit in flight (set by Ctrl-C).
pub struct StageContext<'a> {
    /// Progress reporting.
    pub progress: &'a dyn Progress,
    /// Set to stop after the unit in flight.
    pub cancel: &'a AtomicBool,
}

impl StageContext<'_> {
    /// Errors with [`PipelineError::Interrupted`] once cancellation was asked for.
    pub fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(PipelineError::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// An open run (or one shard of it).
pub struct Run {
    /// The run directory (holds `agfsync.toml`; model paths are relative to it).
    pub root: PathBuf,
    /// The store's directory: the run directory, or `shards/I-of-N` in it.
    pub store_dir: PathBuf,
    /// The config.
    pub config: RunConfig,
    /// The store.
    pub store: Store,
    /// The prompts this process works on.
    pub shard: Shard,
}

/// What `agfsync init` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct InitReport {
    /// The config file.
    pub config: PathBuf,
    /// Models written (tiny preset).
    pub models: Vec<PathBuf>,
}

impl Run {
    /// Creates a run directory: a commented `agfsync.toml` for `preset`, an
    /// empty store, and for the tiny preset the tiny models under `models/`.
    /// Refuses a directory that already holds a config.
    pub fn init(dir: &Path, preset: Preset) -> Result<InitReport> {
        let config = dir.join(CONFIG_FILE);
        if config.exists() {
            return Err(PipelineError::Invalid(format!(
                "{} already exists: this directory is a run already (use `agfsync run {}`), \
                 or choose another directory",
                config.display(),
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
        let mut models = Vec::new();
        if preset == Preset::Tiny {
            models = crate::tiny::write_tiny_models(&dir.join("models"))?;
        }
        let text = template(preset);
        // The template must parse: a broken template is our bug, caught here.
        RunConfig::from_toml(&text, &config)?;
        agfsync_store::write_file_atomic(&config, text.as_bytes())?;
        Store::open_or_create(dir)?;
        Ok(InitReport { config, models })
    }

    /// Opens the run in `dir` for `shard` (a shard's store lives in
    /// `shards/I-of-N` and is created on first use). Refuses a store whose
    /// data was made with a different config.
    pub fn open(dir: &Path, shard: Shard) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(PipelineError::Invalid(format!(
                "{}: not an agfsync run (no {CONFIG_FILE}); create one with `agfsync init {}`",
                dir.display(),
                dir.display()
            )));
        }
        let config = RunConfig::load(&config_path)?;
        let store_dir = if shard == Shard::ALL {
            dir.to_path_buf()
        } else {
            dir.join("shards").join(shard.dir_name())
        };
        let store = if shard == Shard::ALL {
            Store::open(&store_dir)?
        } else {
            Store::open_or_create(&store_dir)?
        };
        let fp = config.data_fingerprint();
        match store.meta("data_fingerprint")? {
            Some(old) if old != fp && store.counts()?.prompts > 0 => {
                return Err(PipelineError::Config {
                    path: config_path,
                    reason: format!(
                        "the models, prompts, generation or metrics changed since this run's data \
                         was made (fingerprint {old}, now {fp}); the store would mix two \
                         configs. Restore the old settings, or start a new run with `agfsync init`"
                    ),
                });
            }
            _ => {}
        }
        store.set_meta("data_fingerprint", &fp)?;
        store.set_meta(
            "config",
            &serde_json::to_string(&config).unwrap_or_default(),
        )?;
        store.set_meta("shard", &shard.to_string())?;
        store.set_meta("agfsync_version", env!("CARGO_PKG_VERSION"))?;
        Ok(Self {
            root: dir.to_path_buf(),
            store_dir,
            config,
            store,
            shard,
        })
    }

    /// A model path of the config, resolved against the run directory.
    pub fn model_path(&self, spec: &str) -> String {
        crate::config::resolve_model_path(&self.root, spec)
    }

    /// The device of `[run] device`.
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.config.run.device)
    }

    /// The inference dtype of `[run] dtype`.
    pub fn dtype(&self) -> Result<DType> {
        let config = |e: PipelineError| PipelineError::Config {
            path: self.root.join(CONFIG_FILE),
            reason: format!("run.dtype: {e}"),
        };
        let dtype = parse_dtype(&self.config.run.dtype).map_err(config)?;
        check_dtype_device(dtype, &self.device()?).map_err(config)?;
        Ok(dtype)
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(PipelineError::Invalid(format!(
            "invalid dtype `{s}`: use f32, f16 or bf16"
        ))),
    }
}

/// Refuses dtype/device pairs the backend cannot run.
pub fn check_dtype_device(dtype: DType, device: &Device) -> Result<()> {
    if dtype == DType::BF16 && device.is_cpu() {
        return Err(PipelineError::Invalid(
            "dtype bf16 needs a CUDA device: the CPU backend has no bf16 matrix products; \
             use f32 (or f16) on CPU"
                .into(),
        ));
    }
    Ok(())
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                PipelineError::Invalid(format!("invalid device `{s}`: use cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(PipelineError::Invalid(format!(
                "invalid device `{s}`: use cpu, cuda or cuda:N"
            )))
        }
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(PipelineError::Invalid(format!(
            "device `{s}` needs CUDA, but this agfsync was built without it: rebuild with \
             `cargo build --release --features cuda`"
        )));
    }
    Device::new_cuda(ordinal).map_err(PipelineError::candle(format!(
        "opening CUDA device {ordinal}"
    )))
}
