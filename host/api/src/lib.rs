//! `lora-api`: the three extension points of a run as plain Rust traits, and the types that
//! cross them.
//!
//! - [`Preprocessor`]: raw dataset records in, typed [`Sample`]s out (batched).
//! - [`Scheduler`]: the learning rate for each optimizer step; told each step's loss.
//! - [`Reporter`]: told about the run's start, steps, evaluations, checkpoints and end.
//!
//! Built-in implementations are native (dataset formats in `lora-data`, schedulers and reporters
//! in `lora`); `lora-plugins` wraps a WebAssembly component into the same traits, so the
//! training loop never knows which it has.
//!
//! This crate owns only types and traits. It must not depend on anything heavy (no engine, no
//! tokenizer, no wasmtime): every other crate depends on it.

mod error;
mod preprocess;
mod report;
mod schedule;

pub use error::{ErrorKind, ExtError};
pub use preprocess::{Message, Preprocessor, RawRecord, RecordOutcome, Sample, TextTools};
pub use report::{CheckpointInfo, EvalMetrics, Reporter, RunInfo, RunSummary, StepMetrics};
pub use schedule::{ScheduleContext, Scheduler};
