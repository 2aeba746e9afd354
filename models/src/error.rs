//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `models`.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// A file could not be opened, read or written.
    #[error("{path}: I/O error")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A trace file does not follow the trace CSV format.
    #[error("{path}:{line}: {reason}")]
    TraceFormat {
        /// The trace file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A model file is not one this build can load.
    #[error("{path}: not a usable Prescient model file: {reason}")]
    ModelFile {
        /// The model file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// burn failed to serialise or apply model weights.
    #[error("model weights: {0}")]
    Weights(String),
    /// JSON encoding or decoding failed.
    #[error("JSON")]
    Json(#[from] serde_json::Error),
    /// Training could not start (for example: no training examples).
    #[error("training: {0}")]
    Training(String),
    /// An argument was out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl ModelsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = ModelsError> = std::result::Result<T, E>;
