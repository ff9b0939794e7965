//! `lang-filter`: keeps the records whose language is one of a configured set, with enough
//! probability, and drops the others (the run counts them as `filtered`; each batch's drops are
//! logged by language). The language comes from fastText's `lid.176` model, converted to ONNX by
//! `tests/nn/make_langid.py` and granted to the plugin as a `wasi:nn` graph; the plugin featurizes
//! text exactly as fastText 0.9.2 does, so its top-1 language is fastText's.
//!
//! Settings (`training_plugin_config`, all optional but `languages`):
//! - `languages`: comma-separated labels to keep (`en`, `en,de`; fastText's labels without
//!   `__label__`);
//! - `threshold` (0.5): the least probability of the top-1 language for a record to be kept;
//! - `graph` (`langid`): the granted model's name; its directory holds `model.onnx` and
//!   `vocab.json` (the plugin reads it at `/models/<graph>/vocab.json`);
//! - `emit` (`samples`): `decision` turns every record into one text sample `<lang> <p>` instead,
//!   to look at or calibrate what the filter decides.
//!
//! A record's text is the content of its messages other than `system` (`messages`), or its
//! `prompt` and `completion`, or its `text`, joined with spaces; line breaks count as spaces (fastText
//! classifies one line).

use std::collections::BTreeMap;

mod featurize;
use featurize::{Featurizer, Vocab};

use lora_plugin::Settings;
use lora_plugin::nn::{Graph, Input, model_dir};
use lora_plugin::preprocessor::{Message, Preprocessor, PromptCompletion, RawRecord, RecordOutcome, Sample};
use serde::Deserialize;

#[derive(Clone, Copy, PartialEq)]
enum Emit {
    Samples,
    Decision,
}

struct LangFilter {
    keep: Vec<String>,
    threshold: f32,
    emit: Emit,
    labels: Vec<String>,
    featurizer: Featurizer,
    graph: Graph,
}

/// A record as this filter reads it: the sample to keep and the text to classify.
fn read_record(json: &str) -> Result<(Sample, String), String> {
    #[derive(Deserialize)]
    struct Turn {
        role: String,
        content: String,
    }
    #[derive(Deserialize)]
    struct Rec {
        messages: Option<Vec<Turn>>,
        prompt: Option<String>,
        completion: Option<String>,
        text: Option<String>,
    }
    let r: Rec = serde_json::from_str(json).map_err(|e| format!("not a JSON record: {e}"))?;
    if let Some(ms) = r.messages {
        let text = ms.iter().filter(|m| m.role != "system").map(|m| m.content.as_str()).collect::<Vec<_>>().join(" ");
        let chat = ms.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
        return Ok((Sample::Chat(chat), text));
    }
    if let (Some(prompt), Some(completion)) = (r.prompt, r.completion) {
        let text = format!("{prompt} {completion}");
        return Ok((Sample::PromptCompletion(PromptCompletion { prompt, completion }), text));
    }
    if let Some(text) = r.text {
        return Ok((Sample::Text(text.clone()), text));
    }
    Err("messages: the record has no `messages`, `prompt`+`completion` or `text`".into())
}

impl LangFilter {
    /// The top-1 language and its probability.
    fn classify(&self, text: &str) -> Result<(usize, f32), String> {
        let ids = self.featurizer.line(&text.replace(['\n', '\r'], " "));
        let out = self.graph.run(&[("ids", Input::i64(&[ids.len() as u32], &ids))])?;
        let logp = out.get("logp")?.f32()?;
        if logp.len() != self.labels.len() {
            return Err(format!("the graph gave {} log-probabilities for {} labels in vocab.json", logp.len(), self.labels.len()));
        }
        // The first of equal maxima, as fastText's heap keeps it.
        let (best, lp) = logp.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        Ok((best, lp.exp()))
    }
}

impl Preprocessor for LangFilter {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["languages", "threshold", "graph", "emit"])?;
        let keep: Vec<String> = settings
            .get("languages")
            .ok_or("languages: required (comma-separated fastText labels to keep, e.g. `en,de`)")?
            .split(',')
            .map(|s| s.trim().trim_start_matches("__label__").to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if keep.is_empty() {
            return Err("languages: no language given".into());
        }
        let threshold: f32 = settings.parse_or("threshold", 0.5)?;
        if !(0.0..=1.0).contains(&threshold) {
            return Err(format!("threshold: {threshold} is not a probability in [0, 1]"));
        }
        let emit = match settings.get("emit").unwrap_or("samples") {
            "samples" => Emit::Samples,
            "decision" => Emit::Decision,
            other => return Err(format!("emit: `{other}` is neither `samples` nor `decision`")),
        };
        let name = settings.get("graph").unwrap_or("langid").to_string();
        let path = format!("{}/vocab.json", model_dir(&name));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("graph: cannot read {path} (is model `{name}` granted, with its vocab.json?): {e}"))?;
        let vocab: Vocab = serde_json::from_str(&text).map_err(|e| format!("graph: {path} is not a lang-filter vocabulary: {e}"))?;
        if vocab.bucket == 0 || vocab.minn == 0 || vocab.maxn < vocab.minn {
            return Err(format!("graph: {path}: bucket {}, minn {}, maxn {} are not a fastText n-gram setting", vocab.bucket, vocab.minn, vocab.maxn));
        }
        if let Some(l) = keep.iter().find(|l| !vocab.labels.contains(l)) {
            return Err(format!("languages: `{l}` is not a label of model `{name}` ({} labels, e.g. en, de, fr)", vocab.labels.len()));
        }
        let graph = Graph::by_name(&name)?;
        Ok(LangFilter { keep, threshold, emit, featurizer: Featurizer::new(&vocab), labels: vocab.labels, graph })
    }

    fn process_batch(&mut self, batch: u64, records: Vec<RawRecord>) -> Result<Vec<RecordOutcome>, String> {
        let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
        let mut outcomes = Vec::with_capacity(records.len());
        for rec in &records {
            let result = read_record(&rec.json).and_then(|(sample, text)| {
                let (best, p) = self.classify(&text)?;
                let lang = &self.labels[best];
                if self.emit == Emit::Decision {
                    return Ok(vec![Sample::Text(format!("{lang} {p:.6}"))]);
                }
                if self.keep.contains(lang) && p >= self.threshold {
                    Ok(vec![sample])
                } else {
                    let why = if self.keep.contains(lang) { format!("{lang} below {}", self.threshold) } else { lang.clone() };
                    *dropped.entry(why).or_default() += 1;
                    Ok(Vec::new())
                }
            });
            outcomes.push(RecordOutcome { index: rec.index, result });
        }
        if !dropped.is_empty() {
            let d: Vec<String> = dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
            lora_plugin::log::info(&format!("batch {batch}: dropped {} of {} records by language: {}", dropped.values().sum::<u64>(), records.len(), d.join(", ")));
        }
        Ok(outcomes)
    }
}

lora_plugin::export_preprocessor!(LangFilter);
