//! Errors of the pipeline stages.

use std::path::{Path, PathBuf};

/// What can go wrong running a stage.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// `agfsync.toml` is wrong (unknown key, wrong type, bad value).
    #[error("{path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong and where.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An input file (prompts, questions) is malformed.
    #[error("{path}: {reason}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line where known.
        reason: String,
    },
    /// The run store failed.
    #[error(transparent)]
    Store(#[from] agfsync_store::StoreError),
    /// A model failed to load or run.
    #[error(transparent)]
    Model(#[from] agfsync_models::ModelError),
    /// A scorer failed.
    #[error(transparent)]
    Feedback(#[from] agfsync_feedback::FeedbackError),
    /// LLM authoring failed (server, template, configuration).
    #[error(transparent)]
    Author(#[from] agfsync_author::AuthorError),
    /// A benchmark file is malformed.
    #[error(transparent)]
    Eval(#[from] agfsync_eval::EvalError),
    /// A LoRA file could not be read or applied.
    #[error(transparent)]
    Lora(#[from] agfsync_models::lora::LoraError),
    /// Training failed.
    #[error(transparent)]
    Dpo(#[from] agfsync_dpo::DpoError),
    /// A tensor operation failed.
    #[error("{context}: {source}")]
    Candle {
        /// What was being done.
        context: String,
        /// The candle error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// The user pressed Ctrl-C: the stage stopped after the unit in flight.
    #[error(
        "interrupted: stopped after the last finished unit; rerun the same command to continue"
    )]
    Interrupted,
    /// Anything else that is the caller's to fix.
    #[error("{0}")]
    Invalid(String),
}

impl PipelineError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Wraps a candle error with what was being done.
    pub fn candle(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Self {
        let context = context.into();
        move |source| Self::Candle {
            context,
            source: Box::new(source),
        }
    }
}

/// Result of pipeline operations.
pub type Result<T> = std::result::Result<T, PipelineError>;
