//! The error type of agfsync-feedback.

use std::path::PathBuf;

use agfsync_models::ModelError;

/// Everything that can go wrong while loading a scorer or scoring images.
///
/// Every variant that concerns a file names it, so a batch run can report
/// which input was at fault and go on with the others.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An image file could not be decoded (not an image, truncated, damaged,
    /// or a layout agfsync cannot convert to RGB).
    #[error("cannot use image {path}: {reason}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong, and what to do about it where that is known.
        reason: String,
    },
    /// A config file (config.json, preprocessor_config.json) is not valid.
    #[error("{path} is not a valid {what}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What the file should describe.
        what: &'static str,
        /// The problem.
        reason: String,
    },
    /// A weights file cannot be used: unreadable, unsafe (a pickle that
    /// holds more than tensors), or not the expected layout.
    #[error("cannot load weights {path}: {reason}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An aesthetic head whose input width is not the CLIP embedding width.
    #[error(
        "aesthetic head {path} takes {head_width}-wide inputs but the CLIP model {clip} \
         produces {clip_width}-wide image embeddings; the LAION head needs CLIP ViT-L/14 \
         (projection_dim 768): pass the CLIP model the head was trained on"
    )]
    WidthMismatch {
        /// The head's weights file.
        path: PathBuf,
        /// Input width of the head's first layer.
        head_width: usize,
        /// The CLIP model.
        clip: String,
        /// `projection_dim` of the CLIP model.
        clip_width: usize,
    },
    /// Loading a model failed (agfsync-models).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An option or input is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed while running a model.
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for FeedbackError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(Box::new(e))
    }
}

impl From<agfsync_models::hub::HubError> for FeedbackError {
    fn from(e: agfsync_models::hub::HubError) -> Self {
        Self::Model(ModelError::Hub(e))
    }
}

impl From<agfsync_models::clip_tokenizer::TokenizerError> for FeedbackError {
    fn from(e: agfsync_models::clip_tokenizer::TokenizerError) -> Self {
        Self::Model(ModelError::Tokenizer(e))
    }
}

/// Result alias of agfsync-feedback.
pub type Result<T, E = FeedbackError> = std::result::Result<T, E>;

pub(crate) fn read_bytes(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| FeedbackError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn read_json_value(
    path: &std::path::Path,
    what: &'static str,
) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| FeedbackError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| FeedbackError::Config {
        path: path.to_path_buf(),
        what,
        reason: e.to_string(),
    })
}
