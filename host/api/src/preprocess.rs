use serde::{Deserialize, Serialize};

use crate::ExtError;

/// One raw dataset record as read from its source: a JSON object (or any JSON value a source
/// produced), with where it came from so errors can name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawRecord {
    /// 1-based record number within `source` (a line number for JSONL).
    pub index: u64,
    /// The file or split the record came from, for messages (`train.jsonl`, `data-00000.arrow`).
    pub source: String,
    pub value: serde_json::Value,
    /// The record's JSON text exactly as the source held it (a JSONL line), when the reader kept
    /// it: only for preprocessors that ask ([`Preprocessor::wants_json_text`]) and only from
    /// sources that have text. A WASM plugin is handed this text instead of `value` written out
    /// again; `None` means "serialize `value`".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool` (templates may accept others).
    pub role: String,
    pub content: String,
}

/// A training sample in one of the forms the data pipeline knows how to tokenize and mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sample {
    /// A conversation, rendered with the model's chat template; by default only assistant
    /// turns are trained.
    Chat { messages: Vec<Message> },
    /// A prompt and its completion; by default only the completion is trained.
    PromptCompletion { prompt: String, completion: String },
    /// Already formatted text; every token is trained.
    Text { text: String },
    /// Already tokenized; `train_mask[i]` says whether token `i` is a training target
    /// (all trained when absent).
    Tokens {
        input_ids: Vec<u32>,
        train_mask: Option<Vec<bool>>,
    },
}

/// What a preprocessor made of one input record.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordOutcome {
    /// `RawRecord::index` of the input record this outcome belongs to.
    pub index: u64,
    /// Zero samples drops the record, several split it; `Err` is a per-record error, which the
    /// run's bad-record policy turns into a failure or a skip.
    pub result: Result<Vec<Sample>, String>,
}

/// Turns raw records into samples. Called with batches of records in dataset order; must return
/// exactly one [`RecordOutcome`] per input record, in the same order.
pub trait Preprocessor: Send {
    /// A short name for messages (`chat_template`, `alpaca`, `plugin:<name>`).
    fn name(&self) -> &str;

    /// Process one batch. `batch` is the 0-based batch number, for error messages.
    /// An `Err` here is fatal for the run (a trap, a limit, a contract violation).
    fn process_batch(
        &mut self,
        batch: u64,
        records: &[RawRecord],
    ) -> Result<Vec<RecordOutcome>, ExtError>;

    /// Whether readers should keep each record's source text in [`RawRecord::json`]. Built-ins
    /// work on the parsed `value` and say no; a WASM plugin takes JSON text and says yes, so the
    /// line read from a JSONL file crosses into the sandbox as it is.
    fn wants_json_text(&self) -> bool {
        false
    }
}

/// The run's tokenizer and chat template, offered to preprocessors (WASM plugins import them as
/// host functions).
pub trait TextTools: Send + Sync {
    /// Token ids of `text`; `add_special_tokens` as in `transformers` (BOS where the tokenizer adds one).
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String>;
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String>;
    /// Render `messages` with the model's chat template.
    fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String>;
}
