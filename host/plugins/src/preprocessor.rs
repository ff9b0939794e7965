//! A WebAssembly preprocessor behind [`lora_api::Preprocessor`].

use std::path::Path;
use std::sync::Arc;

use lora_api::{ErrorKind, ExtError, Message, RawRecord, RecordOutcome, Sample, TextTools};
use wasmtime::component::HasSelf;

use crate::bindings::v0_1_0::preprocessor as wit;
use crate::sandbox::{self, Sandbox};
use crate::{PluginError, PluginKind, PluginOptions, escape_controls};

/// A running preprocessor plugin.
pub struct WasmPreprocessor {
    sandbox: Sandbox,
    bindings: wit::Preprocessor,
}

/// Loads, sandboxes, instantiates and configures the preprocessor at `path`. `text_tools` serves
/// its tokenizer and chat-template imports.
pub fn load_preprocessor(
    path: &Path,
    options: &PluginOptions,
    text_tools: Arc<dyn TextTools>,
) -> Result<Box<dyn lora_api::Preprocessor>, PluginError> {
    Ok(Box::new(WasmPreprocessor::load(
        path,
        options,
        Some(text_tools),
    )?))
}

impl WasmPreprocessor {
    pub fn load(
        path: &Path,
        options: &PluginOptions,
        text_tools: Option<Arc<dyn TextTools>>,
    ) -> Result<Self, PluginError> {
        const KIND: PluginKind = PluginKind::Preprocessor;
        let prepared = sandbox::prepare(path, KIND, options)?;
        let mut linker = sandbox::base_linker(KIND)?;
        wit::Preprocessor::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let pre = sandbox::link(&prepared, path, KIND, &linker, wit::PreprocessorPre::new)?;
        let mut sandbox = Sandbox::new(&prepared.name, KIND, options, text_tools)?;
        let bindings =
            sandbox.instantiate(path, KIND, async |store| pre.instantiate_async(store).await)?;
        let settings = options.settings_list();
        let configured = sandbox.call("configure", None, async |store| {
            bindings
                .lora_plugin_preprocess()
                .call_configure(store, &settings)
                .await
        })?;
        configured.map_err(|m| ExtError::failed(&prepared.name, "configure", escape_controls(&m)))?;
        Ok(WasmPreprocessor { sandbox, bindings })
    }
}

impl WasmPreprocessor {
    /// The models granted to this plugin, as loaded: name, file and sha256 (for the manifest).
    #[cfg(feature = "wasi-nn")]
    pub fn models(&self) -> &[crate::nn::ModelInfo] {
        self.sandbox.models()
    }
}

impl lora_api::Preprocessor for WasmPreprocessor {
    fn name(&self) -> &str {
        &self.sandbox.name
    }

    /// The guest takes JSON text: a JSONL line crosses as it was read, not parsed and rewritten.
    fn wants_json_text(&self) -> bool {
        true
    }

    fn process_batch(
        &mut self,
        batch: u64,
        records: &[RawRecord],
    ) -> Result<Vec<RecordOutcome>, ExtError> {
        const CALL: &str = "process_batch";
        let raw: Vec<wit::exports::lora::plugin::preprocess::RawRecord> = records
            .iter()
            .map(|r| wit::exports::lora::plugin::preprocess::RawRecord {
                index: r.index,
                source: r.source.clone(),
                json: r.json.clone().unwrap_or_else(|| r.value.to_string()),
            })
            .collect();
        let Self { sandbox, bindings } = self;
        let result = sandbox.call(CALL, Some(batch), async |store| {
            bindings
                .lora_plugin_preprocess()
                .call_process_batch(store, batch, &raw)
                .await
        })?;
        let name = sandbox.name.clone();
        let nn_error = sandbox.nn_last_error();
        let outcomes = result.map_err(|m| {
            // wasmtime-wasi-nn shows the guest only the top line of some backend errors: the
            // host's own message goes with what the guest said.
            let m = match nn_error {
                Some(nn) if !m.contains(&nn) => format!("{m} (host: {nn})"),
                _ => m,
            };
            ExtError::failed(&name, CALL, escape_controls(&m)).with_batch(batch)
        })?;
        let contract =
            |m: String| ExtError::new(&name, CALL, ErrorKind::Contract, m).with_batch(batch);

        let bytes: u64 = outcomes.iter().map(outcome_bytes).sum();
        sandbox.check_output(CALL, Some(batch), bytes)?;
        if outcomes.len() != records.len() {
            return Err(contract(format!(
                "returned {} outcomes for {} records (one per record, in order, is required)",
                outcomes.len(),
                records.len()
            )));
        }
        records
            .iter()
            .zip(outcomes)
            .map(|(record, outcome)| {
                if outcome.index != record.index {
                    return Err(contract(format!(
                        "outcome for record {} of {} carries index {} (outcomes must keep the records' order)",
                        record.index, record.source, outcome.index
                    )));
                }
                let result = match outcome.result {
                    // Shown as the record's error: one line, no terminal control.
                    Err(e) => Err(escape_controls(&e).into_owned()),
                    Ok(samples) => Ok(samples
                        .into_iter()
                        .enumerate()
                        .map(|(i, s)| {
                            convert(s).map_err(|m| {
                                contract(format!("record {} of {}: sample {i}: {m}", record.index, record.source))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?),
                };
                Ok(RecordOutcome { index: record.index, result })
            })
            .collect()
    }
}

/// What an outcome holds on the host: the bytes of its strings and ids plus the size of every
/// item around them (outcome, sample, message), so a flood of empty samples counts too.
fn outcome_bytes(o: &wit::exports::lora::plugin::preprocess::RecordOutcome) -> u64 {
    use std::mem::size_of;
    use wit::lora::plugin::types::{Message as M, Sample as S};
    let item = |n: usize, size: usize| (n * size) as u64;
    size_of::<wit::exports::lora::plugin::preprocess::RecordOutcome>() as u64
        + match &o.result {
            Err(e) => e.len() as u64,
            Ok(samples) => samples
                .iter()
                .map(|s| {
                    size_of::<S>() as u64
                        + match s {
                            S::Chat(m) => m
                                .iter()
                                .map(|m| item(1, size_of::<M>()) + (m.role.len() + m.content.len()) as u64)
                                .sum(),
                            S::PromptCompletion(p) => (p.prompt.len() + p.completion.len()) as u64,
                            S::Text(t) => t.len() as u64,
                            S::Tokens(t) => {
                                4 * t.input_ids.len() as u64
                                    + t.train_mask.as_ref().map_or(0, |m| m.len() as u64)
                            }
                        }
                })
                .sum(),
        }
}

/// The WIT sample as a `lora-api` sample, checking what the types cannot express.
fn convert(s: wit::lora::plugin::types::Sample) -> Result<Sample, String> {
    use wit::lora::plugin::types::Sample as S;
    Ok(match s {
        S::Chat(messages) => {
            if messages.is_empty() {
                return Err("chat sample has no messages".into());
            }
            if let Some(i) = messages.iter().position(|m| m.role.trim().is_empty()) {
                return Err(format!("chat message {i} has an empty role"));
            }
            Sample::Chat {
                messages: messages
                    .into_iter()
                    .map(|m| Message {
                        role: m.role,
                        content: m.content,
                    })
                    .collect(),
            }
        }
        S::PromptCompletion(p) => Sample::PromptCompletion {
            prompt: p.prompt,
            completion: p.completion,
        },
        S::Text(text) => Sample::Text { text },
        S::Tokens(t) => {
            if let Some(mask) = &t.train_mask
                && mask.len() != t.input_ids.len()
            {
                return Err(format!(
                    "train-mask has {} entries for {} tokens",
                    mask.len(),
                    t.input_ids.len()
                ));
            }
            Sample::Tokens {
                input_ids: t.input_ids,
                train_mask: t.train_mask,
            }
        }
    })
}
