//! The built-in dataset formats (`training_dataset_type`) as `lora_api::Preprocessor`s, so a
//! WebAssembly preprocessor can stand in for any of them.
//!
//! A per-record error string starts with ``field `<name>`: `` so the pipeline can name the field.

use lora_api::{ExtError, Message, Preprocessor, RawRecord, RecordOutcome, Sample};
use serde_json::Value;

use crate::config::{DataConfig, DatasetType};

/// The reference's Alpaca layout (training_hub trains LoRA through Unsloth, whose Alpaca prompt
/// this is); the output is followed by the tokenizer's EOS.
pub const ALPACA_PROMPT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

/// Roles a chat record may use.
pub const CHAT_ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// The built-in preprocessor for `cfg.dataset_type`.
pub fn builtin_preprocessor(cfg: &DataConfig) -> Box<dyn Preprocessor> {
    Box::new(BuiltinFormat { cfg: cfg.clone() })
}

struct BuiltinFormat {
    cfg: DataConfig,
}

fn field_err(field: &str, message: impl std::fmt::Display) -> String {
    format!("field `{field}`: {message}")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn object(record: &Value) -> Result<&serde_json::Map<String, Value>, String> {
    record.as_object().ok_or_else(|| {
        field_err(
            "(record)",
            format!("expected a JSON object, found {}", type_name(record)),
        )
    })
}

fn string_field(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    optional: bool,
) -> Result<String, String> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if optional => Ok(String::new()),
        None => Err(field_err(field, "missing")),
        Some(other) => Err(field_err(
            field,
            format!("expected a string, found {}", type_name(other)),
        )),
    }
}

fn chat(obj: &serde_json::Map<String, Value>, field: &str) -> Result<Sample, String> {
    let list = match obj.get(field) {
        Some(Value::Array(l)) => l,
        None => {
            // A record shaped like another built-in format says which.
            let has = |k: &str| obj.contains_key(k);
            let shape = if has("instruction") && has("output") {
                Some(("instruction/output", "alpaca"))
            } else if has("prompt") && has("completion") {
                Some(("prompt/completion", "prompt_completion"))
            } else if has("input_ids") {
                Some(("input_ids", "tokenized"))
            } else if has("text") && obj.len() == 1 {
                Some(("text", "passthrough"))
            } else {
                None
            };
            let message = match shape {
                Some((fields, kind)) => format!(
                    "missing; the record has {fields} fields: for that format set training_dataset_type={kind} (`--training-dataset-type {kind}`), or set training_field_messages if the conversation is under another name"
                ),
                None => "missing (set training_field_messages if the conversation is under another name)".to_string(),
            };
            return Err(field_err(field, message));
        }
        Some(other) => {
            return Err(field_err(
                field,
                format!("expected a list of messages, found {}", type_name(other)),
            ));
        }
    };
    if list.is_empty() {
        return Err(field_err(field, "the conversation has no messages"));
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(field_err(
                &format!("{field}[{i}]"),
                format!(
                    "expected a {{role, content}} object, found {}",
                    type_name(m)
                ),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.clone(),
            None => return Err(field_err(&format!("{field}[{i}].role"), "missing")),
            Some(other) => {
                return Err(field_err(
                    &format!("{field}[{i}].role"),
                    format!("expected a string, found {}", type_name(other)),
                ));
            }
        };
        if !CHAT_ROLES.contains(&role.as_str()) {
            return Err(field_err(
                &format!("{field}[{i}].role"),
                format!(
                    "unknown role `{role}`; expected one of {}",
                    CHAT_ROLES.join(", ")
                ),
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(c)) => c.clone(),
            None => return Err(field_err(&format!("{field}[{i}].content"), "missing")),
            Some(other) => {
                return Err(field_err(
                    &format!("{field}[{i}].content"),
                    format!("expected a string, found {}", type_name(other)),
                ));
            }
        };
        messages.push(Message { role, content });
    }
    Ok(Sample::Chat { messages })
}

fn tokens(obj: &serde_json::Map<String, Value>) -> Result<Sample, String> {
    let ids = match obj.get("input_ids") {
        Some(Value::Array(a)) => a,
        None => return Err(field_err("input_ids", "missing")),
        Some(other) => {
            return Err(field_err(
                "input_ids",
                format!("expected a list of token ids, found {}", type_name(other)),
            ));
        }
    };
    let mut input_ids = Vec::with_capacity(ids.len());
    for (i, v) in ids.iter().enumerate() {
        match v.as_u64() {
            Some(id) if id <= u32::MAX as u64 => input_ids.push(id as u32),
            _ => {
                return Err(field_err(
                    &format!("input_ids[{i}]"),
                    format!("expected a non-negative integer token id, found {v}"),
                ));
            }
        }
    }
    let train_mask = match obj.get("labels") {
        None | Some(Value::Null) => None,
        Some(Value::Array(labels)) => {
            if labels.len() != input_ids.len() {
                return Err(field_err(
                    "labels",
                    format!("{} labels for {} input_ids", labels.len(), input_ids.len()),
                ));
            }
            let mut mask = Vec::with_capacity(labels.len());
            for (i, (l, id)) in labels.iter().zip(&input_ids).enumerate() {
                match l.as_i64() {
                    Some(-100) => mask.push(false),
                    Some(v) if v == *id as i64 => mask.push(true),
                    _ => {
                        return Err(field_err(
                            &format!("labels[{i}]"),
                            format!(
                                "expected -100 or the token id {id} (labels are unshifted, as in transformers), found {l}"
                            ),
                        ));
                    }
                }
            }
            Some(mask)
        }
        Some(other) => {
            return Err(field_err(
                "labels",
                format!("expected a list, found {}", type_name(other)),
            ));
        }
    };
    Ok(Sample::Tokens {
        input_ids,
        train_mask,
    })
}

impl BuiltinFormat {
    fn one(&self, record: &Value) -> Result<Vec<Sample>, String> {
        let obj = object(record)?;
        let c = &self.cfg;
        let sample = match c.dataset_type {
            DatasetType::ChatTemplate => chat(obj, &c.field_messages)?,
            DatasetType::Alpaca => {
                let instruction = string_field(obj, &c.field_instruction, false)?;
                let input = string_field(obj, &c.field_input, true)?;
                let output = string_field(obj, &c.field_output, false)?;
                if output.is_empty() {
                    return Err(field_err(&c.field_output, "empty: nothing to train on"));
                }
                let prompt = ALPACA_PROMPT
                    .replace("{instruction}", &instruction)
                    .replace("{input}", &input);
                Sample::PromptCompletion {
                    prompt,
                    completion: output,
                }
            }
            DatasetType::Passthrough => {
                let text = string_field(obj, &c.field_text, false)?;
                if text.is_empty() {
                    return Err(field_err(&c.field_text, "empty text"));
                }
                Sample::Text { text }
            }
            DatasetType::PromptCompletion => {
                let prompt = string_field(obj, "prompt", false)?;
                let completion = string_field(obj, "completion", false)?;
                if completion.is_empty() {
                    return Err(field_err("completion", "empty: nothing to train on"));
                }
                Sample::PromptCompletion { prompt, completion }
            }
            DatasetType::Tokenized => tokens(obj)?,
        };
        Ok(vec![sample])
    }

    /// The record field a sample of this format comes from, for messages.
    pub(crate) fn sample_field(cfg: &DataConfig) -> &str {
        match cfg.dataset_type {
            DatasetType::ChatTemplate => &cfg.field_messages,
            DatasetType::Alpaca => &cfg.field_output,
            DatasetType::Passthrough => &cfg.field_text,
            DatasetType::PromptCompletion => "completion",
            DatasetType::Tokenized => "input_ids",
        }
    }
}

pub(crate) fn sample_field(cfg: &DataConfig) -> &str {
    BuiltinFormat::sample_field(cfg)
}

impl Preprocessor for BuiltinFormat {
    fn name(&self) -> &str {
        self.cfg.dataset_type.as_str()
    }

    fn process_batch(
        &mut self,
        _batch: u64,
        records: &[RawRecord],
    ) -> Result<Vec<RecordOutcome>, ExtError> {
        Ok(records
            .iter()
            .map(|r| RecordOutcome {
                index: r.index,
                result: self.one(&r.value),
            })
            .collect())
    }
}

/// Splits a preprocessor's per-record error into (field, message) when it follows the
/// ``field `<name>`: …`` convention.
pub(crate) fn split_field_error(message: &str) -> (String, String) {
    if let Some(rest) = message.strip_prefix("field `")
        && let Some(end) = rest.find("`: ")
    {
        return (rest[..end].to_owned(), rest[end + 3..].to_owned());
    }
    ("(preprocessor)".to_owned(), message.to_owned())
}
