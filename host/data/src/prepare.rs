//! `prepare`: records → preprocessor → samples → tokens + masks → length policy → validation
//! hold-out → cache; and `PreparedData`, which makes epoch plans, evaluation batches and the
//! `--dry-run` summary.

use std::collections::BTreeMap;

use lora_api::{ErrorKind, ExtError, Preprocessor, RawRecord};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{BadRecords, DataConfig, DatasetType, LongSamplePolicy};
use crate::error::{DataError, RecordLocation, Result};
use crate::formats::{sample_field, split_field_error};
use crate::plan::{EpochCounts, EpochPlan, MicroBatch, OptimizerStep, PlanParams};
use crate::source::{DataFile, DatasetSource, read_records_keeping_text};
use crate::tokenize::{TokenizedSample, tokenize_sample};
use crate::tools::HfTextTools;
use crate::{cache, plan};

/// The validation hold-out uses its own random stream (not an epoch's shuffle).
const VALIDATION_STREAM: u64 = 0x5641_4c49_4441_5445;
/// Records handed to the preprocessor per call.
pub const PREPROCESS_BATCH: usize = 1024;
/// Bad records listed by name in the report (all are counted).
const LISTED_BAD_RECORDS: usize = 100;

/// A record that was skipped (`training_bad_records=skip`) or dropped, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRecord {
    pub source: String,
    pub index: u64,
    pub field: String,
    pub message: String,
}

/// What preparation kept and dropped, and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataReport {
    /// Where the dataset came from.
    pub origin: String,
    /// Records read (train + validation files).
    pub records: u64,
    /// Samples the preprocessor made.
    pub samples: u64,
    pub train_samples: usize,
    pub validation_samples: usize,
    /// Where the validation samples came from: `split`, `held_out` or `none`.
    pub validation_from: String,
    /// Counts of records/samples left out, by reason (`bad_record`, `too_long`, `filtered`).
    pub dropped: BTreeMap<String, u64>,
    /// Samples cut to `max_seq_len` (`training_long_sample_policy=truncate`).
    pub truncated: u64,
    /// The first bad/dropped records by name.
    pub listed: Vec<SkippedRecord>,
    pub train_tokens: u64,
    pub train_trained_tokens: u64,
    /// True when this came from the processed-data cache.
    pub from_cache: bool,
    pub cache_key: String,
    /// What the processed-data cache did: `reused`, `written`, `off …`, `not used: …`.
    pub cache: String,
}

/// The tokenized dataset, ready to be planned.
#[derive(Debug, Clone)]
pub struct PreparedData {
    pub config: DataConfig,
    pub train: Vec<TokenizedSample>,
    pub validation: Vec<TokenizedSample>,
    pub report: DataReport,
}

/// The `--dry-run` data plan: serializable, printed before any GPU is taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataPlanSummary {
    pub report: DataReport,
    pub max_seq_len: usize,
    pub max_tokens_per_gpu: usize,
    pub effective_batch_size: usize,
    pub sample_packing: bool,
    pub world_size: usize,
    pub longest_sample: usize,
    pub mean_sample_tokens: f64,
    pub epochs: Vec<EpochCounts>,
    pub validation_rows: usize,
    pub validation_micro_batches: usize,
}

impl std::fmt::Display for DataPlanSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.report;
        writeln!(f, "dataset: {}", r.origin)?;
        if !r.cache.is_empty() {
            writeln!(f, "processed-data cache: {}", r.cache)?;
        }
        writeln!(
            f,
            "records: {}  samples: {}  train: {}  validation: {} ({})",
            r.records, r.samples, r.train_samples, r.validation_samples, r.validation_from
        )?;
        if r.dropped.is_empty() {
            writeln!(f, "dropped: none")?;
        } else {
            let d: Vec<String> = r.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(f, "dropped: {}", d.join(" "))?;
        }
        if r.truncated > 0 {
            writeln!(
                f,
                "truncated to {} tokens: {}",
                self.max_seq_len, r.truncated
            )?;
        }
        for s in r.listed.iter().take(10) {
            writeln!(
                f,
                "  {} record {}, field `{}`: {}",
                s.source, s.index, s.field, s.message
            )?;
        }
        writeln!(
            f,
            "tokens: {} (trained {}), longest sample {}, mean {:.1}",
            r.train_tokens, r.train_trained_tokens, self.longest_sample, self.mean_sample_tokens
        )?;
        writeln!(
            f,
            "packing: {}  max_seq_len: {}  max_tokens_per_gpu: {}  effective_batch_size: {}  world_size: {}",
            self.sample_packing,
            self.max_seq_len,
            self.max_tokens_per_gpu,
            self.effective_batch_size,
            self.world_size
        )?;
        for e in &self.epochs {
            writeln!(
                f,
                "epoch {}: {} optimizer steps, {} rows, {} micro-batches (at most {} per step per GPU), {} tokens, {} trained",
                e.epoch,
                e.optimizer_steps,
                e.rows,
                e.micro_batches,
                e.max_micro_batches_per_step,
                e.tokens,
                e.trained_tokens
            )?;
        }
        write!(
            f,
            "validation: {} rows in {} micro-batches",
            self.validation_rows, self.validation_micro_batches
        )
    }
}

fn cache_key(
    cfg: &DataConfig,
    source: &DatasetSource,
    preprocessor: &str,
    tools: &HfTextTools,
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"lora-data cache v1\0");
    // Only the parameters that change the tokenized samples.
    let params = serde_json::json!({
        "dataset_type": cfg.dataset_type, "field_messages": cfg.field_messages,
        "field_instruction": cfg.field_instruction, "field_input": cfg.field_input,
        "field_output": cfg.field_output, "field_text": cfg.field_text,
        "max_seq_len": cfg.max_seq_len, "train_on_inputs": cfg.train_on_inputs,
        "bad_records": cfg.bad_records, "validation_split": cfg.validation_split,
        "long_sample_policy": cfg.long_sample_policy, "seed": cfg.seed,
        "preprocessor": preprocessor,
    });
    h.update(params.to_string().as_bytes());
    h.update(tools.fingerprint());
    for (split, files) in [("train", &source.train), ("validation", &source.validation)] {
        for f in files.iter() {
            h.update(split.as_bytes());
            h.update(f.path.to_string_lossy().as_bytes());
            // Streamed: a large dataset is hashed without holding it in memory.
            let mut file =
                std::fs::File::open(&f.path).map_err(|e| DataError::io("open", &f.path, e))?;
            let len =
                std::io::copy(&mut file, &mut h).map_err(|e| DataError::io("read", &f.path, e))?;
            h.update(len.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

struct Collector<'a> {
    cfg: &'a DataConfig,
    tools: &'a HfTextTools,
    report: DataReport,
    out: Vec<TokenizedSample>,
}

impl Collector<'_> {
    fn bad(
        &mut self,
        location: RecordLocation,
        field: String,
        message: String,
        reason: &str,
    ) -> Result<()> {
        if self.cfg.bad_records == BadRecords::Error && reason == "bad_record" {
            return Err(DataError::Record {
                location,
                field,
                message,
            });
        }
        *self.report.dropped.entry(reason.to_owned()).or_default() += 1;
        if self.report.listed.len() < LISTED_BAD_RECORDS {
            self.report.listed.push(SkippedRecord {
                source: location.source,
                index: location.index,
                field,
                message,
            });
        }
        Ok(())
    }

    /// Runs one batch of records through the preprocessor and the tokenizer.
    fn flush(
        &mut self,
        pre: &mut dyn Preprocessor,
        batch_no: &mut u64,
        records: &mut Vec<RawRecord>,
    ) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let outcomes = pre
            .process_batch(*batch_no, records)
            .map_err(|e| e.with_batch(*batch_no))?;
        if outcomes.len() != records.len()
            || outcomes
                .iter()
                .zip(records.iter())
                .any(|(o, r)| o.index != r.index)
        {
            return Err(ExtError::new(
                pre.name(),
                "process_batch",
                ErrorKind::Contract,
                format!("returned {} outcomes for {} records (one per record, in order, is the contract)", outcomes.len(), records.len()),
            )
            .with_batch(*batch_no)
            .into());
        }
        *batch_no += 1;
        let field = sample_field(self.cfg).to_owned();
        // A plugin's samples are not the dataset's records: say who made what is reported.
        let plugin = DatasetType::parse(pre.name()).is_err().then(|| pre.name().to_owned());
        let by = |m: String| match &plugin {
            Some(p) => format!("{m} (in the samples preprocessor {p} made from this record)"),
            None => m,
        };
        let mut jobs = Vec::new();
        for (o, r) in outcomes.into_iter().zip(records.iter()) {
            let location = RecordLocation {
                source: r.source.clone(),
                index: r.index,
            };
            match o.result {
                Ok(samples) => {
                    if samples.is_empty() {
                        *self.report.dropped.entry("filtered".into()).or_default() += 1;
                    }
                    for s in samples {
                        jobs.push((location.clone(), s));
                    }
                }
                Err(message) => {
                    let (f, m) = split_field_error(&message);
                    let m = match &plugin {
                        Some(p) => format!("{m} (reported by preprocessor {p})"),
                        None => m,
                    };
                    self.bad(location, f, m, "bad_record")?;
                }
            }
        }
        records.clear();
        self.report.samples += jobs.len() as u64;
        let tools = self.tools;
        let train_on_inputs = self.cfg.train_on_inputs;
        let results: Vec<_> = jobs
            .par_iter()
            .map(|(_, s)| tokenize_sample(tools, s, train_on_inputs, &field))
            .collect();
        for ((location, _), res) in jobs.into_iter().zip(results) {
            match res {
                Ok(mut t) => {
                    if t.len() > self.cfg.max_seq_len {
                        let msg = by(format!(
                            "{} tokens, longer than training_max_seq_len {}",
                            t.len(),
                            self.cfg.max_seq_len
                        ));
                        match self.cfg.long_sample_policy {
                            LongSamplePolicy::Error => {
                                return Err(DataError::Record {
                                    location,
                                    field,
                                    message: format!(
                                        "{msg} (training_long_sample_policy=error; use drop or truncate)"
                                    ),
                                });
                            }
                            LongSamplePolicy::Drop => {
                                self.bad(location, field.clone(), msg, "too_long")?;
                                continue;
                            }
                            LongSamplePolicy::Truncate => {
                                t.input_ids.truncate(self.cfg.max_seq_len);
                                t.train_mask.truncate(self.cfg.max_seq_len);
                                self.report.truncated += 1;
                                if !t.train_mask.iter().any(|&m| m) {
                                    self.bad(
                                        location,
                                        field.clone(),
                                        format!("{msg}; no trained token is left after truncation"),
                                        "too_long",
                                    )?;
                                    continue;
                                }
                            }
                        }
                    }
                    self.out.push(t);
                }
                Err(e) => self.bad(location, e.field, by(e.message), "bad_record")?,
            }
        }
        Ok(())
    }

    fn read_split(
        &mut self,
        files: &[DataFile],
        pre: &mut dyn Preprocessor,
        batch_no: &mut u64,
    ) -> Result<Vec<TokenizedSample>> {
        let mut records = Vec::with_capacity(PREPROCESS_BATCH);
        let keep_text = pre.wants_json_text();
        for file in files {
            read_records_keeping_text(file, keep_text, &mut |rec| {
                self.report.records += 1;
                match rec {
                    Ok(r) => {
                        records.push(r);
                        if records.len() >= PREPROCESS_BATCH {
                            self.flush(pre, batch_no, &mut records)?;
                        }
                        Ok(())
                    }
                    Err(p) => self.bad(p.location, p.field, p.message, "bad_record"),
                }
            })?;
        }
        self.flush(pre, batch_no, &mut records)?;
        Ok(std::mem::take(&mut self.out))
    }
}

/// Reads, preprocesses, tokenizes and masks the whole dataset (or loads it from the cache).
pub fn prepare(
    cfg: &DataConfig,
    source: &DatasetSource,
    preprocessor: &mut dyn Preprocessor,
    tools: &HfTextTools,
) -> Result<PreparedData> {
    cfg.validate()?;
    let key = cache_key(cfg, source, preprocessor.name(), tools)?;
    // A plugin preprocessor is known here only by its name, not by its code: its output is not
    // cached, or a changed plugin with the same name would silently reuse stale samples.
    let builtin = DatasetType::parse(preprocessor.name()).is_ok();
    let cache_dir = if builtin {
        cfg.cache_dir.as_ref()
    } else {
        None
    };
    let cache_note = match (&cfg.cache_dir, builtin) {
        (None, _) => "off (no training_data_output_dir)".to_owned(),
        (Some(_), false) => format!(
            "not used: preprocessor `{}` is a plugin (its code is not part of the cache key)",
            preprocessor.name()
        ),
        (Some(_), true) => "written".to_owned(),
    };
    if let Some(dir) = cache_dir {
        let entry = cache::entry_dir(dir, &key);
        if let Some((train, validation, report)) = cache::load(&entry)? {
            let mut report: DataReport = serde_json::from_value(report).map_err(|e| {
                DataError::format(
                    entry.join("report.json"),
                    format!("corrupt cache report: {e}"),
                )
            })?;
            report.from_cache = true;
            report.cache = "reused".to_owned();
            return Ok(PreparedData {
                config: cfg.clone(),
                train,
                validation,
                report,
            });
        }
    }
    let mut c = Collector {
        cfg,
        tools,
        report: DataReport {
            origin: source.origin.clone(),
            cache_key: key.clone(),
            cache: cache_note,
            ..Default::default()
        },
        out: Vec::new(),
    };
    let mut batch_no = 0u64;
    let mut train = c.read_split(&source.train, preprocessor, &mut batch_no)?;
    let mut validation = c.read_split(&source.validation, preprocessor, &mut batch_no)?;
    let mut report = c.report;
    report.validation_from = if !validation.is_empty() {
        "split".into()
    } else {
        "none".into()
    };
    if validation.is_empty() && cfg.validation_split > 0.0 && train.len() > 1 {
        let n_val = ((train.len() as f64 * cfg.validation_split).round() as usize)
            .clamp(1, train.len() - 1);
        let mut held = vec![false; train.len()];
        for &i in plan::shuffled(train.len(), cfg.seed ^ VALIDATION_STREAM)
            .iter()
            .take(n_val)
        {
            held[i as usize] = true;
        }
        let (v, t): (Vec<_>, Vec<_>) = train.into_iter().zip(held).partition(|(_, h)| *h);
        validation = v.into_iter().map(|(s, _)| s).collect();
        train = t.into_iter().map(|(s, _)| s).collect();
        report.validation_from = "held_out".into();
    }
    if train.is_empty() {
        let why = if report.records == 0 {
            "no records in the training files".to_owned()
        } else {
            let d: Vec<String> = report
                .dropped
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(
                "all {} records were left out ({})",
                report.records,
                d.join(", ")
            )
        };
        return Err(DataError::Empty {
            message: format!("nothing to train on in {}: {why}", source.origin),
        });
    }
    report.train_samples = train.len();
    report.validation_samples = validation.len();
    report.train_tokens = train.iter().map(|s| s.len() as u64).sum();
    report.train_trained_tokens = train.iter().map(|s| s.trained_tokens() as u64).sum();
    if let Some(dir) = cache_dir {
        let value = serde_json::to_value(&report).unwrap_or_default();
        cache::store(&cache::entry_dir(dir, &key), &train, &validation, &value)?;
    }
    Ok(PreparedData {
        config: cfg.clone(),
        train,
        validation,
        report,
    })
}

impl PreparedData {
    pub fn plan_params(&self) -> PlanParams {
        let c = &self.config;
        PlanParams {
            max_seq_len: c.max_seq_len,
            max_tokens_per_gpu: c.max_tokens_per_gpu,
            effective_batch_size: c.effective_batch_size,
            sample_packing: c.sample_packing,
            seed: c.seed,
            world_size: c.world_size,
            rank: c.rank,
        }
    }

    /// Optimizer steps per epoch (the same for every epoch and rank).
    pub fn steps_per_epoch(&self) -> usize {
        self.train
            .len()
            .div_ceil(self.config.effective_batch_size.max(1))
    }

    /// This rank's plan for `epoch` (0-based).
    pub fn epoch_plan(&self, epoch: usize) -> EpochPlan {
        let p = self.plan_params();
        let steps = plan::epoch_layout(&self.train, epoch, &p)
            .into_iter()
            .map(|step| OptimizerStep {
                micro_batches: step.ranks[p.rank]
                    .iter()
                    .map(|mb| plan::materialize(&self.train, mb))
                    .collect(),
                samples: step.samples,
                trained_tokens: step.trained_tokens,
            })
            .collect();
        EpochPlan { epoch, steps }
    }

    /// The most tokens any of this rank's training micro-batches holds in epochs `0..epochs`:
    /// what one forward + backward's activations are sized by. Computed from the layouts (sample
    /// indices), without building the batches.
    pub fn largest_micro_batch_tokens(&self, epochs: usize) -> usize {
        let p = self.plan_params();
        let mut largest = 0;
        for epoch in 0..epochs.max(1) {
            for step in plan::epoch_layout(&self.train, epoch, &p) {
                for mb in &step.ranks[p.rank] {
                    let tokens = mb.iter().flatten().map(|&i| self.train[i as usize].len()).sum();
                    largest = largest.max(tokens);
                }
            }
        }
        largest
    }

    /// This rank's evaluation micro-batches (the whole validation set, packed the same way);
    /// `trained_tokens` over all ranks is `validation_trained_tokens()`.
    pub fn eval_batches(&self) -> Vec<MicroBatch> {
        let p = self.plan_params();
        let ids: Vec<u32> = (0..self.validation.len() as u32).collect();
        plan::layout_rows(&self.validation, &ids, &p)[p.rank]
            .iter()
            .map(|mb| plan::materialize(&self.validation, mb))
            .collect()
    }

    pub fn validation_trained_tokens(&self) -> u64 {
        self.validation
            .iter()
            .map(|s| s.trained_tokens() as u64)
            .sum()
    }

    /// The `--dry-run` data plan.
    pub fn summary(&self) -> DataPlanSummary {
        let p = self.plan_params();
        let epochs = (0..self.config.num_epochs)
            .map(|e| plan::count_epoch(&plan::epoch_layout(&self.train, e, &p), &self.train, e))
            .collect();
        let ids: Vec<u32> = (0..self.validation.len() as u32).collect();
        let val = plan::layout_rows(&self.validation, &ids, &p);
        let longest = self
            .train
            .iter()
            .map(TokenizedSample::len)
            .max()
            .unwrap_or(0);
        let mean = if self.train.is_empty() {
            0.0
        } else {
            self.report.train_tokens as f64 / self.train.len() as f64
        };
        DataPlanSummary {
            report: self.report.clone(),
            max_seq_len: p.max_seq_len,
            max_tokens_per_gpu: p.max_tokens_per_gpu,
            effective_batch_size: p.effective_batch_size,
            sample_packing: p.sample_packing,
            world_size: p.world_size,
            longest_sample: longest,
            mean_sample_tokens: mean,
            epochs,
            validation_rows: val.iter().flatten().map(Vec::len).sum(),
            validation_micro_batches: val.iter().map(Vec::len).sum(),
        }
    }
}
