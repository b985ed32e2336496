//! The error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong while training, checkpointing or exporting.
#[derive(Debug, thiserror::Error)]
pub enum DpoError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Loading the model failed.
    #[error(transparent)]
    Model(#[from] agfsync_models::ModelError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A training setting is invalid.
    #[error("invalid training config: {0}")]
    Config(String),
    /// The pair data set is unusable.
    #[error("pair data {path}: {reason}")]
    Data {
        /// The data file (empty when built in memory).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint is damaged or unreadable.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Resuming was refused: the checkpoint belongs to another model or
    /// another training config.
    #[error("cannot resume from {path}: {differences}")]
    ResumeMismatch {
        /// The checkpoint folder.
        path: PathBuf,
        /// What differs, one item per difference.
        differences: String,
    },
    /// The loss (or the gradient norm) became NaN or infinite; the run was
    /// stopped before the update and the last good checkpoint kept.
    #[error("non-finite {what} ({value}) at step {step}; the run was stopped, last good checkpoint: {}", last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()))]
    NonFinite {
        /// `loss` or `grad norm`.
        what: &'static str,
        /// The offending value.
        value: f64,
        /// The optimizer step (1-based) that produced it.
        step: usize,
        /// The newest complete checkpoint, if any was written.
        last_checkpoint: Option<PathBuf>,
    },
    /// The caller asked the run to stop (Ctrl-C); a checkpoint of the last
    /// finished step was written, so `--resume latest` continues it.
    #[error("interrupted after step {step}; checkpoint {}: rerun to resume", checkpoint.display())]
    Interrupted {
        /// The last finished optimizer step.
        step: usize,
        /// The checkpoint written for it.
        checkpoint: PathBuf,
    },
    /// Writing the LoRA export failed or the trainer holds no adapter.
    #[error("export: {0}")]
    Export(String),
}

impl DpoError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
