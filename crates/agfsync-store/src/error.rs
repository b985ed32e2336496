//! Errors of the run store.

use std::path::{Path, PathBuf};

/// What can go wrong reading or writing a run store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused an operation.
    #[error("{path}: database error: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
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
    /// The store was written by a newer agfsync.
    #[error(
        "{path}: this run store has schema version {found}, newer than the {supported} this \
         agfsync understands; use the agfsync that wrote it, or a newer one"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// No run store at the path.
    #[error("{0}: not an agfsync run (no agfsync.db); create one with `agfsync init DIR`")]
    NotARun(PathBuf),
    /// A Parquet file could not be written or read.
    #[error("{path}: Parquet: {reason}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Bad input (a record that does not fit, an unsafe path, ...).
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A SQLite error on the database at `path`.
    pub fn sqlite(path: &Path, source: rusqlite::Error) -> Self {
        Self::Sqlite {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, StoreError>;
