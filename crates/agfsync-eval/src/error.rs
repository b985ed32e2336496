//! Errors of the evaluation crate.

use std::path::PathBuf;

/// What can go wrong reading benchmarks or computing results.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A benchmark file does not have the expected format.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Which field or entry is wrong.
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
    /// Inconsistent input to a computation.
    #[error("{0}")]
    Invalid(String),
}

/// Result of evaluation operations.
pub type Result<T> = std::result::Result<T, EvalError>;
