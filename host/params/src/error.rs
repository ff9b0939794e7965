use std::fmt;
use std::path::PathBuf;

/// Where a parameter's value came from (recorded for every value; shown by `--dry-run`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Source {
    /// The definition's default.
    Default,
    /// A params file (`--params FILE`).
    File { path: PathBuf },
    /// An environment variable (`LORA_TRAINING_...`).
    Env { var: String },
    /// A command-line flag.
    Cli { flag: String },
    /// The KFP executor input's `inputs.parameterValues`.
    Kfp,
    /// Unset, so the training_hub default was applied by resolution.
    Resolved,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path } => write!(f, "params file {}", path.display()),
            Source::Env { var } => write!(f, "environment variable {var}"),
            Source::Cli { flag } => write!(f, "command line {flag}"),
            Source::Kfp => f.write_str("KFP executor input"),
            Source::Resolved => f.write_str("training_hub default"),
        }
    }
}

/// One problem with one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    /// The parameter's name (or the unknown key, or the params file for file-level problems).
    pub param: String,
    /// The offending value as given (empty when there is none).
    pub value: String,
    /// Where the value came from.
    pub source: Source,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.param)?;
        if !self.value.is_empty() {
            write!(f, " = {}", self.value)?;
        }
        if self.source != Source::Default {
            write!(f, " (from {})", self.source)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a parameter set, reported at once.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ParamErrors(pub Vec<ParamError>);

impl fmt::Display for ParamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} parameter problem{}:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl ParamErrors {
    /// True when some error names `param`.
    pub fn mentions(&self, param: &str) -> bool {
        self.0
            .iter()
            .any(|e| e.param == param || e.message.contains(param))
    }
}
