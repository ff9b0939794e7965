use std::fmt;

/// Why an extension call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The extension itself returned an error (its own `result<_, string>` channel).
    Failed,
    /// The extension trapped (a WebAssembly trap, a panic in a guest).
    Trap,
    /// The extension hit a sandbox limit: memory, deadline, fuel or output size.
    Limit,
    /// The extension's answer broke the contract (malformed samples, wrong counts, bad version).
    Contract,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Failed => "failed",
            ErrorKind::Trap => "trapped",
            ErrorKind::Limit => "hit a limit",
            ErrorKind::Contract => "broke the plugin contract",
        })
    }
}

/// An error from an extension call, naming the extension, the call and (where there is one) the
/// batch it was given, so a run can fail with a message a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtError {
    /// The extension's name (`alpaca`, `cosine`, `plugin:ticket-redactor`, …).
    pub extension: String,
    /// The call that failed (`process_batch`, `learning_rate`, `on_step`, …).
    pub call: String,
    /// Index of the batch (preprocessor) or step (scheduler, reporter), when the call had one.
    pub batch: Option<u64>,
    pub kind: ErrorKind,
    pub message: String,
}

impl ExtError {
    pub fn new(
        extension: impl Into<String>,
        call: impl Into<String>,
        kind: ErrorKind,
        message: impl Into<String>,
    ) -> Self {
        ExtError {
            extension: extension.into(),
            call: call.into(),
            batch: None,
            kind,
            message: message.into(),
        }
    }

    /// The extension's own error (`ErrorKind::Failed`).
    pub fn failed(extension: impl Into<String>, call: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(extension, call, ErrorKind::Failed, message)
    }

    pub fn with_batch(mut self, batch: u64) -> Self {
        self.batch = Some(batch);
        self
    }
}

impl fmt::Display for ExtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} in `{}`", self.extension, self.kind, self.call)?;
        if let Some(b) = self.batch {
            write!(f, " (batch/step {b})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ExtError {}
