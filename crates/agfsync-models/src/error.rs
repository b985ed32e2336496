//! The error type of agfsync-models.

use std::path::PathBuf;

use crate::clip_tokenizer::TokenizerError;
use crate::hub::HubError;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A config file is not what its component expects.
    #[error("{path} is not a valid {what}: {source}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What the file should describe.
        what: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A weights file is unreadable (truncated, not safetensors, ...).
    #[error("cannot read weights {path}: {source}. The file may be truncated or damaged: download it again")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// The cause.
        source: Box<candle_core::Error>,
    },
    /// The weights do not fit the config (missing tensor, wrong shape).
    #[error("{component} in {dir}: {source}. Check that config.json belongs to these weights")]
    Build {
        /// Which component (unet, vae, text_encoder, ...).
        component: String,
        /// Its folder.
        dir: PathBuf,
        /// The cause, naming the tensor and both shapes for mismatches.
        source: Box<candle_core::Error>,
    },
    /// Resolving or fetching model files failed.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// Loading a tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The model layout is not one agfsync supports.
    #[error("{0}")]
    Unsupported(String),
    /// A tensor operation failed while running a model.
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(Box::new(e))
    }
}

/// Result alias of agfsync-models.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &'static str,
) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|source| ModelError::Config {
        path: path.to_path_buf(),
        what,
        source,
    })
}
