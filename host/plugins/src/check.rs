//! `lora plugin check FILE.wasm [--input sample.jsonl]`: runs a plugin on sample input under the
//! same sandbox as a run and reports what it did.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use lora_api::{
    CheckpointInfo, EvalMetrics, Message, Preprocessor, RawRecord, Reporter, RunInfo, RunSummary,
    ScheduleContext, Scheduler, StepMetrics, TextTools,
};

use crate::{
    PluginError, PluginKind, PluginSet, WasmPreprocessor, WasmReporter, WasmScheduler, inspect,
};

/// What `check` saw, one line per record, step or event.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub kind: PluginKind,
    pub lines: Vec<String>,
    /// Records the plugin reported an error for (preprocessors).
    pub record_errors: usize,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

/// Stands in for the run's tokenizer when `check` has none: every call is an error the plugin
/// sees (and may report).
pub struct NoTextTools;

impl TextTools for NoTextTools {
    fn encode(&self, _: &str, _: bool) -> Result<Vec<u32>, String> {
        Err("no tokenizer in `lora plugin check` (pass a model to check with one)".into())
    }
    fn decode(&self, _: &[u32], _: bool) -> Result<String, String> {
        Err("no tokenizer in `lora plugin check` (pass a model to check with one)".into())
    }
    fn apply_chat_template(&self, _: &[Message], _: bool) -> Result<String, String> {
        Err("no chat template in `lora plugin check` (pass a model to check with one)".into())
    }
}

/// Runs the plugin at `path` on sample input.
/// - preprocessor: `input` (required) is JSONL; prints each record's samples, drop or error.
/// - scheduler: prints the learning rate of 100 steps (base lr 2e-4, 10 warmup steps), or, with
///   `input` (one `{"loss": x}` or number per line), one step per line with that loss observed.
/// - reporter: a synthetic 5-step run; without a `grants.dir` in `config_json` it is granted a
///   fresh temporary directory, and the files it wrote are listed.
pub fn check(
    path: &Path,
    input: Option<&Path>,
    config_json: &str,
    text_tools: Option<Arc<dyn TextTools>>,
) -> Result<CheckReport, PluginError> {
    let kind = inspect(path, config_json)?.kind;
    let set = PluginSet::from_params(&format!("{kind}={}", path.display()), config_json, 0)?;
    let mut options = set
        .specs()
        .next()
        .map(|s| s.options.clone())
        .unwrap_or_default();
    let mut lines = Vec::new();
    let mut record_errors = 0;
    let fail = |e: lora_api::ExtError| PluginError::Setup(e);
    match kind {
        PluginKind::Preprocessor => {
            let input = input.ok_or_else(|| {
                PluginError::Input("a preprocessor needs sample input: --input sample.jsonl".into())
            })?;
            let records = read_jsonl(input)?;
            let tools = text_tools.unwrap_or_else(|| Arc::new(NoTextTools));
            let mut p = WasmPreprocessor::load(path, &options, Some(tools))?;
            for (batch, chunk) in records.chunks(256).enumerate() {
                for o in p.process_batch(batch as u64, chunk).map_err(fail)? {
                    match o.result {
                        Ok(s) if s.is_empty() => lines.push(format!("record {}: dropped", o.index)),
                        Ok(s) => {
                            for sample in s {
                                let json = serde_json::to_string(&sample).unwrap_or_default();
                                lines.push(format!("record {}: {json}", o.index));
                            }
                        }
                        Err(e) => {
                            record_errors += 1;
                            lines.push(format!("record {}: error: {e}", o.index));
                        }
                    }
                }
            }
            lines.push(format!(
                "{} records, {record_errors} record errors",
                records.len()
            ));
        }
        PluginKind::Scheduler => {
            let losses = match input {
                Some(p) => Some(read_losses(p)?),
                None => None,
            };
            let total = losses.as_ref().map_or(100, |l| l.len() as u64);
            let ctx = ScheduleContext {
                base_lr: 2e-4,
                warmup_steps: 10.min(total),
                total_steps: total,
                num_epochs: 1,
                steps_per_epoch: total,
                settings: Default::default(),
            };
            let mut s = WasmScheduler::load(path, &options, ctx)?;
            for step in 0..total {
                let lr = s.learning_rate(step).map_err(fail)?;
                match losses.as_ref().map(|l| l[step as usize]) {
                    Some(loss) => {
                        s.observe_loss(step, loss).map_err(fail)?;
                        lines.push(format!("step {step}: learning rate {lr:e}, loss {loss}"));
                    }
                    None => lines.push(format!("step {step}: learning rate {lr:e}")),
                }
            }
        }
        PluginKind::Reporter => {
            if options.grants.dir.is_none() {
                let dir =
                    std::env::temp_dir().join(format!("lora-plugin-check-{}", std::process::id()));
                std::fs::create_dir_all(&dir).map_err(|e| {
                    PluginError::Input(format!("cannot create {}: {e}", dir.display()))
                })?;
                options.grants.dir = Some(dir);
            }
            let dir = options.grants.dir.clone().unwrap_or_default();
            let mut r = WasmReporter::load(path, &options)?;
            synthetic_run(&mut r, &mut lines).map_err(fail)?;
            let mut entries: Vec<_> = std::fs::read_dir(&dir)
                .map(|d| d.flatten().collect())
                .unwrap_or_default();
            entries.sort_by_key(|e| e.file_name());
            lines.push(format!("files in {}:", dir.display()));
            for e in entries {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                lines.push(format!(
                    "  {} ({len} bytes)",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    Ok(CheckReport {
        kind,
        lines,
        record_errors,
    })
}

fn synthetic_run(r: &mut WasmReporter, lines: &mut Vec<String>) -> Result<(), lora_api::ExtError> {
    let steps = 5u64;
    r.on_start(&RunInfo {
        run_id: "check".into(),
        params: serde_json::json!({}),
        total_steps: steps,
        num_epochs: 1,
        steps_per_epoch: steps,
        start_step: 0,
        world_size: 1,
    })?;
    lines.push("on-start: ok".into());
    for step in 1..=steps {
        r.on_step(&StepMetrics {
            step,
            epoch: step as f64 / steps as f64,
            max_steps: steps,
            loss: 2.0 / step as f64,
            grad_norm: 1.0,
            learning_rate: 2e-4,
            tokens: 1000,
            trained_tokens: 800,
            tokens_per_second: 5000.0,
            elapsed_s: step as f64 * 0.2,
        })?;
    }
    lines.push(format!("on-step x{steps}: ok"));
    r.on_eval(&EvalMetrics {
        step: steps,
        epoch: 1.0,
        eval_loss: 0.5,
        perplexity: 0.5f64.exp(),
        eval_tokens: 400,
    })?;
    lines.push("on-eval: ok".into());
    r.on_checkpoint(&CheckpointInfo {
        step: steps,
        epoch: 1.0,
        path: "checkpoints/checkpoint-5".into(),
    })?;
    lines.push("on-checkpoint: ok".into());
    r.on_finish(&RunSummary {
        total_steps: steps,
        epochs: 1.0,
        train_loss: 0.9,
        final_loss: 0.4,
        min_loss: 0.4,
        final_eval_loss: Some(0.5),
        final_perplexity: Some(0.5f64.exp()),
        tokens: 5000,
        trained_tokens: 4000,
        tokens_per_second: 5000.0,
        peak_memory_bytes: 0,
        train_runtime: 1.0,
    })?;
    lines.push("on-finish: ok".into());
    Ok(())
}

/// JSONL records, numbered by line (blank lines skipped).
pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<RawRecord>, PluginError> {
    let text = std::fs::read_to_string(path).map_err(|source| PluginError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let source = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let value = serde_json::from_str(l).map_err(|e| {
                PluginError::Input(format!("{}:{}: not valid JSON: {e}", path.display(), i + 1))
            })?;
            Ok(RawRecord {
                index: i as u64 + 1,
                source: source.clone(),
                value,
                json: Some(l.trim_end().to_owned()),
            })
        })
        .collect()
}

fn read_losses(path: &Path) -> Result<Vec<f64>, PluginError> {
    read_jsonl(path)?
        .into_iter()
        .map(|r| {
            r.value
                .as_f64()
                .or_else(|| r.value.get("loss").and_then(|l| l.as_f64()))
                .ok_or_else(|| {
                    PluginError::Input(format!(
                        "{}:{}: expected a number or {{\"loss\": number}}",
                        path.display(),
                        r.index
                    ))
                })
        })
        .collect()
}
