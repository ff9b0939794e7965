//! `HfTextTools`: a model folder's tokenizer (`tokenizer.json`) and chat template
//! (`chat_template.jinja` or `tokenizer_config.json`'s `chat_template`), with the special tokens
//! transformers reads from `tokenizer_config.json`. Implements `lora_api::TextTools`.

use std::path::{Path, PathBuf};

use lora_api::{Message, TextTools};
use sha2::{Digest, Sha256};
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{DataError, Result};
use crate::template::ChatTemplate;

/// Strings that end a turn in the chat templates we know; the trained span of an assistant turn
/// ends with the first of these (or the tokenizer's EOS) after its content.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
];

/// Token ids and, per token, its byte range in the encoded text.
pub type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

pub struct HfTextTools {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    template_source: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_id: Option<u32>,
    end_of_turn: Vec<String>,
    path: PathBuf,
    fingerprint: [u8; 32],
    fast: Option<crate::fastbpe::FastBpe>,
}

fn special_token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => {
            o.get("content").and_then(|c| c.as_str()).map(str::to_owned)
        }
        _ => None,
    }
}

impl HfTextTools {
    /// Loads `dir/tokenizer.json`, `dir/tokenizer_config.json` (optional) and the chat template
    /// (`dir/chat_template.jinja` first, as transformers does, then `chat_template` in the config).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("tokenizer_config.json");
        let jinja = dir.join("chat_template.jinja");
        Self::from_files(
            &dir.join("tokenizer.json"),
            config.exists().then_some(config.as_path()),
            jinja.exists().then_some(jinja.as_path()),
        )
    }

    /// Loads from explicit files; `chat_template` overrides the config's template.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        chat_template: Option<&Path>,
    ) -> Result<Self> {
        let tok_err = |path: &Path, message: String| DataError::Tokenizer {
            path: path.to_owned(),
            message,
        };
        let tok_bytes = std::fs::read(tokenizer_json)
            .map_err(|e| DataError::io("read tokenizer", tokenizer_json, e))?;
        let mut tokenizer = Tokenizer::from_bytes(&tok_bytes)
            .map_err(|e| tok_err(tokenizer_json, format!("not a tokenizer.json: {e}")))?;
        let tok_value: serde_json::Value = serde_json::from_slice(&tok_bytes)
            .map_err(|e| tok_err(tokenizer_json, format!("not valid JSON: {e}")))?;
        let mut hasher = Sha256::new();
        hasher.update(&tok_bytes);

        let mut config = serde_json::Map::new();
        if let Some(p) = tokenizer_config {
            let bytes =
                std::fs::read(p).map_err(|e| DataError::io("read tokenizer config", p, e))?;
            hasher.update(&bytes);
            config = serde_json::from_slice(&bytes)
                .map_err(|e| tok_err(p, format!("not valid JSON: {e}")))?;
        }
        let config_path = tokenizer_config.unwrap_or(tokenizer_json);

        // Tokens that tokenizer_config.json declares and tokenizer.json lacks are added, as
        // transformers does when it loads `added_tokens_decoder`.
        if let Some(serde_json::Value::Object(added)) = config.get("added_tokens_decoder") {
            let mut entries: Vec<(u32, &serde_json::Value)> = added
                .iter()
                .filter_map(|(k, v)| k.parse::<u32>().ok().map(|id| (id, v)))
                .collect();
            entries.sort_by_key(|e| e.0);
            for (id, v) in entries {
                let Some(content) = v.get("content").and_then(|c| c.as_str()) else {
                    continue;
                };
                if tokenizer.token_to_id(content).is_some() {
                    continue;
                }
                let special = v.get("special").and_then(|s| s.as_bool()).unwrap_or(true);
                tokenizer.add_special_tokens(&[AddedToken::from(content.to_owned(), special)]);
                if tokenizer.token_to_id(content) != Some(id) {
                    return Err(tok_err(
                        config_path,
                        format!(
                            "added token `{content}` would get id {:?}, the config says {id}",
                            tokenizer.token_to_id(content)
                        ),
                    ));
                }
            }
        }

        let bos_token = special_token_string(config.get("bos_token"));
        let eos_token = special_token_string(config.get("eos_token"));
        let eos_id = match &eos_token {
            Some(t) => Some(tokenizer.token_to_id(t).ok_or_else(|| {
                tok_err(
                    config_path,
                    format!("eos_token `{t}` is not in the vocabulary"),
                )
            })?),
            None => None,
        };

        let template_source = match chat_template {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| DataError::io("read chat template", p, e))?,
            ),
            None => match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned),
                _ => None,
            },
        };
        let template = match &template_source {
            Some(src) => {
                hasher.update(src.as_bytes());
                let template_path = chat_template.unwrap_or(config_path);
                Some(
                    ChatTemplate::new(src, bos_token.as_deref(), eos_token.as_deref())
                        .map_err(|m| tok_err(template_path, m))?,
                )
            }
            None => None,
        };

        let mut end_of_turn: Vec<String> = END_OF_TURN
            .iter()
            .filter(|t| tokenizer.token_to_id(t).is_some())
            .map(|t| (*t).to_owned())
            .collect();
        if let Some(e) = &eos_token
            && !end_of_turn.contains(e)
        {
            end_of_turn.push(e.clone());
        }
        let fast = if std::env::var_os("LORA_DATA_NO_FAST_BPE").is_some() {
            None
        } else {
            crate::fastbpe::FastBpe::new(&tok_value, &tokenizer)
        };
        Ok(HfTextTools {
            fast,
            tokenizer,
            template,
            template_source,
            bos_token,
            eos_token,
            eos_id,
            end_of_turn,
            path: tokenizer_json.to_owned(),
            fingerprint: hasher.finalize().into(),
        })
    }

    /// Vocabulary size including added tokens (what token ids must stay below).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }
    pub fn chat_template_source(&self) -> Option<&str> {
        self.template_source.as_deref()
    }
    /// The `tokenizer.json` this was loaded from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// SHA-256 over tokenizer, config and template: part of the cache key.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
    pub(crate) fn end_of_turn_tokens(&self) -> &[String] {
        &self.end_of_turn
    }
    /// Whether the fast byte-level BPE path is in use for this tokenizer.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids with their byte offsets `(start, end)` into `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<IdsAndOffsets, String> {
        if !add_special_tokens
            && let Some(fast) = &self.fast
            && let Some(out) = fast.encode(&self.tokenizer, text)
        {
            return Ok(out);
        }
        self.encode_with_offsets_slow(text, add_special_tokens)
    }

    /// `encode_with_offsets` through the full `tokenizers` pipeline only.
    pub fn encode_with_offsets_slow(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<IdsAndOffsets, String> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| format!("tokenizer failed: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Renders with the chat template; an error when the model has none.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        match &self.template {
            Some(t) => t.render(messages, add_generation_prompt),
            None => Err(format!(
                "the model has no chat template (no chat_template.jinja, no `chat_template` in tokenizer_config.json next to {}); use training_dataset_type alpaca or passthrough, or add a template",
                self.path.display()
            )),
        }
    }
}

impl TextTools for HfTextTools {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.encode_with_offsets(text, add_special_tokens)
            .map(|(ids, _)| ids)
    }
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| format!("decode failed: {e}"))
    }
    fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        self.render(messages, add_generation_prompt)
    }
}
