//! `lora-data`: datasets in, packed token-budgeted micro-batches out.
//!
//! Owns: dataset sources (file, folder, artifact metadata, `<pvc_path>/dataset/train`) and
//! readers (JSONL, JSON, Parquet, Arrow / `datasets.save_to_disk`); the built-in dataset formats
//! as `lora_api::Preprocessor`s; the model's tokenizer and chat template as
//! `lora_api::TextTools` ([`HfTextTools`]); loss masks; the processed-data cache; the epoch plan
//! (seeded shuffle, best-fit-decreasing packing, token-budgeted micro-batches, gradient
//! accumulation, ranks) and the `--dry-run` data summary.
//!
//! Must not: depend on `lora-params`, the engine or wasmtime; download anything; print or exit
//! (errors are typed and name the parameter, file, record and field).
//!
//! Use: `resolve_dataset` (or `DatasetSource::from_path`) → `builtin_preprocessor(&cfg)` (or a
//! plugin) → `prepare(&cfg, &source, &mut *pre, &tools)` → `PreparedData::epoch_plan(epoch)`,
//! `eval_batches()`, `summary()`.

mod cache;
mod columnar;
mod config;
mod error;
mod fastbpe;
mod formats;
mod plan;
mod prepare;
mod source;
mod template;
mod tokenize;
mod tools;

pub use template::strftime;
pub use config::{BadRecords, DataConfig, DatasetType, LongSamplePolicy};
pub use error::{DataError, RecordLocation, Result};
pub use formats::{ALPACA_PROMPT, CHAT_ROLES, builtin_preprocessor};
pub use plan::{EpochCounts, EpochPlan, MicroBatch, OptimizerStep, PlanParams, Row};
pub use prepare::{
    DataPlanSummary, DataReport, PREPROCESS_BATCH, PreparedData, SkippedRecord, prepare,
};
pub use source::{
    DataFile, DatasetInput, DatasetSource, FileKind, ReadProblem, read_records,
    read_records_keeping_text, resolve_dataset, sniff,
};
pub use template::ChatTemplate;
pub use tokenize::{SampleError, TokenizedSample, tokenize_sample};
pub use tools::{HfTextTools, IdsAndOffsets};
