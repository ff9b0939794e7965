//! Samples → token ids + loss mask.
//!
//! Mask convention (UNSHIFTED): `train_mask[i] == true` means token `i` is a prediction target
//! (the logits at position `i - 1` are trained to produce it). Token 0 of a sample is never a
//! target: nothing precedes it.
//!
//! - Chat: the text is the template's rendering, tokenized without adding special tokens (as
//!   `transformers.apply_chat_template(tokenize=True)` does: the template writes BOS itself, so
//!   there is no double BOS). Each assistant turn is trained from the end of the generation
//!   prompt before it (`render(messages[..i], add_generation_prompt=True)`, which must be a prefix
//!   of the full rendering) to the end of the first end-of-turn token (EOS, `<|im_end|>`,
//!   `<|eot_id|>`, …) after its content: the model learns to stop.
//! - Prompt/completion (and Alpaca): `prompt + completion` tokenized with the tokenizer's special
//!   tokens (BOS where it adds one), EOS appended when the text does not already end with it;
//!   the completion and the EOS are trained.
//! - Text: the same with everything trained.
//! - Tokens: as given (ids checked against the vocabulary).
//!
//! `train_on_inputs` trains every token (except token 0), the reference's behaviour.

use lora_api::{Message, Sample};

use crate::tools::HfTextTools;

/// One tokenized sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSample {
    pub input_ids: Vec<u32>,
    /// Unshifted: `train_mask[i]` says whether token `i` is a target.
    pub train_mask: Vec<bool>,
}

impl TokenizedSample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    pub fn trained_tokens(&self) -> usize {
        self.train_mask.iter().filter(|&&m| m).count()
    }
}

/// A per-sample failure: the field it concerns (for the error message) and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> SampleError {
    SampleError {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Byte spans `[start, end)` of `text` that are trained → per-token mask via the tokens' offsets.
fn mask_from_spans(offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(s, e)| spans.iter().any(|&(a, b)| s < b && e > a))
        .collect()
}

/// Tokenizes one sample. `field` names the record field the sample came from, for messages.
pub fn tokenize_sample(
    tools: &HfTextTools,
    sample: &Sample,
    train_on_inputs: bool,
    field: &str,
) -> Result<TokenizedSample, SampleError> {
    let mut out = match sample {
        Sample::Chat { messages } => tokenize_chat(tools, messages, train_on_inputs, field)?,
        Sample::PromptCompletion { prompt, completion } => {
            tokenize_prompt_completion(tools, prompt, completion, train_on_inputs, field)?
        }
        Sample::Text { text } => tokenize_prompt_completion(tools, "", text, true, field)?,
        Sample::Tokens {
            input_ids,
            train_mask,
        } => {
            let vocab = tools.vocab_size();
            if let Some((i, id)) = input_ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= vocab)
            {
                return Err(err(
                    field,
                    format!("token {i} has id {id}, outside the tokenizer's vocabulary of {vocab}"),
                ));
            }
            let mask = match train_mask {
                Some(m) if m.len() != input_ids.len() => {
                    return Err(err(
                        field,
                        format!("{} mask entries for {} tokens", m.len(), input_ids.len()),
                    ));
                }
                Some(m) if !train_on_inputs => m.clone(),
                _ => vec![true; input_ids.len()],
            };
            TokenizedSample {
                input_ids: input_ids.clone(),
                train_mask: mask,
            }
        }
    };
    if out.input_ids.is_empty() {
        return Err(err(field, "the sample has no tokens"));
    }
    out.train_mask[0] = false;
    if !out.train_mask.iter().any(|&m| m) {
        return Err(err(
            field,
            "the sample has no trained tokens (no assistant turn / empty completion); set training_train_on_inputs=true to train on prompts",
        ));
    }
    Ok(out)
}

fn tokenize_chat(
    tools: &HfTextTools,
    messages: &[Message],
    train_on_inputs: bool,
    field: &str,
) -> Result<TokenizedSample, SampleError> {
    let full = tools.render(messages, false).map_err(|m| err(field, m))?;
    let (ids, offsets) = tools
        .encode_with_offsets(&full, false)
        .map_err(|m| err(field, m))?;
    if train_on_inputs {
        let n = ids.len();
        return Ok(TokenizedSample {
            input_ids: ids,
            train_mask: vec![true; n],
        });
    }
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prefix = tools.render(&messages[..i], true).map_err(|e| {
            err(
                field,
                format!("rendering the prompt before message {i}: {e}"),
            )
        })?;
        if !full.starts_with(&prefix) {
            return Err(err(
                field,
                format!(
                    "the chat template renders the conversation before assistant message {i} differently from the whole conversation, so its trained span cannot be found"
                ),
            ));
        }
        let start = prefix.len();
        let rest = &full[start..];
        let content_end = [m.content.as_str(), m.content.trim()]
            .into_iter()
            .filter(|c| !c.is_empty())
            .find_map(|c| rest.find(c).map(|p| start + p + c.len()))
            .unwrap_or(start);
        let tail = &full[content_end..];
        let end = tools
            .end_of_turn_tokens()
            .iter()
            .filter_map(|t| tail.find(t.as_str()).map(|p| content_end + p + t.len()))
            .min()
            .unwrap_or(content_end);
        // The span stops before the next message starts: the next generation prompt bounds it.
        spans.push((start, end));
    }
    let mask = mask_from_spans(&offsets, &spans);
    Ok(TokenizedSample {
        input_ids: ids,
        train_mask: mask,
    })
}

fn tokenize_prompt_completion(
    tools: &HfTextTools,
    prompt: &str,
    completion: &str,
    train_on_inputs: bool,
    field: &str,
) -> Result<TokenizedSample, SampleError> {
    let mut text = String::with_capacity(prompt.len() + completion.len());
    text.push_str(prompt);
    text.push_str(completion);
    let (mut ids, offsets) = tools
        .encode_with_offsets(&text, true)
        .map_err(|m| err(field, m))?;
    let mut mask = if train_on_inputs {
        vec![true; ids.len()]
    } else {
        // Special tokens the post-processor adds (BOS) carry empty offsets: not trained.
        offsets
            .iter()
            .map(|&(s, e)| e > s && e > prompt.len())
            .collect()
    };
    if let Some(eos) = tools.eos_id()
        && ids.last() != Some(&eos)
    {
        ids.push(eos);
        mask.push(true);
    }
    Ok(TokenizedSample {
        input_ids: ids,
        train_mask: mask,
    })
}
