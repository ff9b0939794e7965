//! The engine's typed errors. Every variant names what failed and where (file, tensor, op, shape).

use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("weights file {file}: tensor `{tensor}`: {msg}")]
    Weights {
        file: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("weights file {file}: {msg}")]
    WeightsFile { file: PathBuf, msg: String },
    #[error("op `{op}`: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("backend `{backend}` op `{op}`: {msg}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        msg: String,
    },
    #[error("batch: {0}")]
    Batch(String),
    #[error("adapter config: {0}")]
    Adapter(String),
    #[error("optimizer: {0}")]
    Optim(String),
    #[error("trainer state `{name}`: {msg}")]
    State { name: String, msg: String },
    #[error("cannot write {path}: {msg}")]
    Write { path: PathBuf, msg: String },
    #[error("data parallel: {0}")]
    Collective(String),
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}
