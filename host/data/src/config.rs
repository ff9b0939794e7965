//! `DataConfig`: the parameters the data pipeline honours. `lora-params` fills it; this crate does
//! not depend on `lora-params` (dependencies point one way). Errors use the names users see
//! (`training_max_seq_len`, …).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// `training_dataset_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetType {
    /// A list of `{role, content}` messages rendered with the model's chat template.
    ChatTemplate,
    /// `instruction` / `input` / `output` in the reference's (Unsloth's) fixed Alpaca layout.
    Alpaca,
    /// Already formatted text in the field `text`; every token is trained.
    Passthrough,
    /// Ours: `prompt` and `completion` fields; the completion is trained.
    PromptCompletion,
    /// Ours: `input_ids` and optional `labels` (-100 = not trained).
    Tokenized,
}

impl DatasetType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "chat_template" => DatasetType::ChatTemplate,
            "alpaca" => DatasetType::Alpaca,
            "passthrough" => DatasetType::Passthrough,
            "prompt_completion" => DatasetType::PromptCompletion,
            "tokenized" => DatasetType::Tokenized,
            other => {
                return Err(DataError::param(
                    "training_dataset_type",
                    format!(
                        "unknown dataset type `{other}`; expected one of chat_template, alpaca, passthrough, prompt_completion, tokenized"
                    ),
                ));
            }
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetType::ChatTemplate => "chat_template",
            DatasetType::Alpaca => "alpaca",
            DatasetType::Passthrough => "passthrough",
            DatasetType::PromptCompletion => "prompt_completion",
            DatasetType::Tokenized => "tokenized",
        }
    }
}

/// `training_bad_records`: what a bad record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRecords {
    /// Stop with an error naming file, record and field (default).
    Error,
    /// Skip it, count it and list it in the report.
    Skip,
}

impl BadRecords {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(BadRecords::Error),
            "skip" => Ok(BadRecords::Skip),
            other => Err(DataError::param(
                "training_bad_records",
                format!("`{other}`: expected `error` or `skip`"),
            )),
        }
    }
}

/// `training_long_sample_policy`: what a sample longer than `training_max_seq_len` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongSamplePolicy {
    /// Leave it out, count it and report it (default: a cut answer teaches the model not to stop).
    Drop,
    /// Keep its first `max_seq_len` tokens.
    Truncate,
    /// Stop with an error naming the record.
    Error,
}

impl LongSamplePolicy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "drop" => Ok(LongSamplePolicy::Drop),
            "truncate" => Ok(LongSamplePolicy::Truncate),
            "error" => Ok(LongSamplePolicy::Error),
            other => Err(DataError::param(
                "training_long_sample_policy",
                format!("`{other}`: expected `drop`, `truncate` or `error`"),
            )),
        }
    }
}

/// Everything the data pipeline needs from the run's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// `training_dataset_type`.
    pub dataset_type: DatasetType,
    /// `training_field_messages` (chat_template).
    pub field_messages: String,
    /// `training_field_instruction` (alpaca).
    pub field_instruction: String,
    /// `training_field_input` (alpaca; an absent or null input is an empty input).
    pub field_input: String,
    /// `training_field_output` (alpaca).
    pub field_output: String,
    /// Field of `passthrough` records (`text`).
    pub field_text: String,
    /// `training_max_seq_len`: longest packed row, in tokens.
    pub max_seq_len: usize,
    /// `training_max_tokens_per_gpu`: most tokens in one micro-batch on one GPU.
    pub max_tokens_per_gpu: usize,
    /// `training_effective_batch_size`: samples per optimizer step, over all GPUs.
    pub effective_batch_size: usize,
    /// `training_lora_sample_packing`.
    pub sample_packing: bool,
    /// `training_train_on_inputs`: train prompt tokens too (the reference's behaviour).
    pub train_on_inputs: bool,
    /// `training_bad_records`.
    pub bad_records: BadRecords,
    /// `training_validation_split`: fraction of the training records held out for evaluation
    /// when the dataset has no `validation`/`test` split (0 = none).
    pub validation_split: f64,
    /// `training_long_sample_policy`.
    pub long_sample_policy: LongSamplePolicy,
    /// `training_seed`: the shuffle of epoch `e` uses `seed + e`; the validation hold-out uses `seed`.
    pub seed: u64,
    /// Number of data-parallel ranks (GPUs over all nodes).
    pub world_size: usize,
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// `training_num_epochs`.
    pub num_epochs: usize,
    /// `training_data_output_dir`: where tokenized datasets are cached (none = no cache).
    pub cache_dir: Option<PathBuf>,
}

impl Default for DataConfig {
    /// The reference component's defaults, and ours for our additions.
    fn default() -> Self {
        DataConfig {
            dataset_type: DatasetType::ChatTemplate,
            field_messages: "messages".into(),
            field_instruction: "instruction".into(),
            field_input: "input".into(),
            field_output: "output".into(),
            field_text: "text".into(),
            max_seq_len: 8192,
            max_tokens_per_gpu: 32000,
            effective_batch_size: 128,
            sample_packing: true,
            train_on_inputs: false,
            bad_records: BadRecords::Error,
            validation_split: 0.0,
            long_sample_policy: LongSamplePolicy::Drop,
            seed: 42,
            world_size: 1,
            rank: 0,
            num_epochs: 3,
            cache_dir: None,
        }
    }
}

impl DataConfig {
    /// Checks the values against each other; every problem at once, one line each.
    pub fn validate(&self) -> Result<()> {
        let mut problems: Vec<(&'static str, String)> = Vec::new();
        if self.max_seq_len == 0 {
            problems.push(("training_max_seq_len", "must be at least 1".into()));
        }
        if self.max_tokens_per_gpu == 0 {
            problems.push(("training_max_tokens_per_gpu", "must be at least 1".into()));
        } else if self.max_tokens_per_gpu < self.max_seq_len {
            problems.push((
                "training_max_tokens_per_gpu",
                format!(
                    "{} is smaller than training_max_seq_len {}: one full-length row would not fit in a micro-batch; raise it or lower training_max_seq_len",
                    self.max_tokens_per_gpu, self.max_seq_len
                ),
            ));
        }
        if self.effective_batch_size == 0 {
            problems.push(("training_effective_batch_size", "must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.validation_split) || self.validation_split.is_nan() {
            problems.push((
                "training_validation_split",
                format!("{} is not in [0, 1)", self.validation_split),
            ));
        }
        if self.world_size == 0 {
            problems.push(("world_size", "must be at least 1".into()));
        } else if self.rank >= self.world_size {
            problems.push((
                "rank",
                format!(
                    "rank {} is not below world size {}",
                    self.rank, self.world_size
                ),
            ));
        }
        if self.num_epochs == 0 {
            problems.push(("training_num_epochs", "must be at least 1".into()));
        }
        for (param, v) in [
            ("training_field_messages", &self.field_messages),
            ("training_field_instruction", &self.field_instruction),
            ("training_field_input", &self.field_input),
            ("training_field_output", &self.field_output),
        ] {
            if v.is_empty() {
                problems.push((param, "must not be empty".into()));
            }
        }
        match problems.len() {
            0 => Ok(()),
            1 => {
                let (p, m) = problems.remove(0);
                Err(DataError::param(p, m))
            }
            _ => {
                let first = problems[0].0;
                let all: Vec<String> = problems
                    .iter()
                    .map(|(p, m)| format!("`{p}`: {m}"))
                    .collect();
                Err(DataError::param(
                    first,
                    format!("{} problems:\n  {}", all.len(), all.join("\n  ")),
                ))
            }
        }
    }
}
