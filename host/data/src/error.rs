//! Typed errors of the data pipeline. Every variant names what failed and where: the parameter,
//! the file, the record number, the field.

use std::path::PathBuf;

/// Where a record came from, for messages: `train.jsonl record 17`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLocation {
    pub source: String,
    /// 1-based record number within `source` (the line number for JSONL).
    pub index: u64,
}

impl std::fmt::Display for RecordLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} record {}", self.source, self.index)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A parameter has a value the data pipeline cannot use.
    #[error("parameter `{param}`: {message}")]
    Param {
        param: &'static str,
        message: String,
    },

    /// The dataset could not be found or its layout is not one we read.
    #[error("dataset: {message}")]
    Source { message: String },

    /// A file could not be read or written.
    #[error("{op} `{path}`: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file is not in the format its name or folder says.
    #[error("`{path}`: {message}")]
    Format { path: PathBuf, message: String },

    /// One record is bad (and the bad-record policy is `error`).
    #[error("{location}, field `{field}`: {message}")]
    Record {
        location: RecordLocation,
        field: String,
        message: String,
    },

    /// The model's tokenizer or chat template could not be loaded or used.
    #[error("tokenizer/template `{path}`: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// Nothing trainable remains.
    #[error("dataset: {message}")]
    Empty { message: String },

    /// The preprocessor (built-in or plugin) failed as a whole.
    #[error(transparent)]
    Extension(#[from] lora_api::ExtError),
}

impl DataError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            op,
            path: path.into(),
            source,
        }
    }
    pub(crate) fn param(param: &'static str, message: impl Into<String>) -> Self {
        DataError::Param {
            param,
            message: message.into(),
        }
    }
    pub(crate) fn source(message: impl Into<String>) -> Self {
        DataError::Source {
            message: message.into(),
        }
    }
    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
