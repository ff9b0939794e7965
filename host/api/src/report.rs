use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ExtError;

/// What reporters are told when a run starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// A stable id of the run (derived from the run manifest hash).
    pub run_id: String,
    /// The resolved parameters as JSON (snake_case parameter names).
    pub params: serde_json::Value,
    pub total_steps: u64,
    pub num_epochs: u64,
    pub steps_per_epoch: u64,
    /// The optimizer step this run starts at (non-zero when resuming).
    pub start_step: u64,
    pub world_size: u32,
}

/// One logged optimizer step. Field names follow the reference's `training_metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: u64,
    /// Fractional epoch, as transformers logs it.
    pub epoch: f64,
    pub max_steps: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Tokens in this step (all positions, padding excluded).
    pub tokens: u64,
    /// Tokens with the loss mask on in this step.
    pub trained_tokens: u64,
    pub tokens_per_second: f64,
    /// Seconds since the run (or resumed run) started.
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: u64,
    pub epoch: f64,
    pub eval_loss: f64,
    pub perplexity: f64,
    pub eval_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub step: u64,
    pub epoch: f64,
    pub path: PathBuf,
}

/// The run's totals, given to reporters at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub total_steps: u64,
    pub epochs: f64,
    /// Mean loss over all steps (transformers' `train_loss`).
    pub train_loss: f64,
    pub final_loss: f64,
    pub min_loss: f64,
    pub final_eval_loss: Option<f64>,
    pub final_perplexity: Option<f64>,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub tokens_per_second: f64,
    pub peak_memory_bytes: u64,
    /// transformers' `train_runtime`, seconds.
    pub train_runtime: f64,
}

/// Told about a run's progress. Reporters observe; they cannot change the run. A reporter's
/// error fails the run, but never corrupts outputs already written.
pub trait Reporter: Send {
    fn name(&self) -> &str;
    fn on_start(&mut self, info: &RunInfo) -> Result<(), ExtError>;
    fn on_step(&mut self, metrics: &StepMetrics) -> Result<(), ExtError>;
    fn on_eval(&mut self, metrics: &EvalMetrics) -> Result<(), ExtError> {
        let _ = metrics;
        Ok(())
    }
    fn on_checkpoint(&mut self, checkpoint: &CheckpointInfo) -> Result<(), ExtError> {
        let _ = checkpoint;
        Ok(())
    }
    fn on_finish(&mut self, summary: &RunSummary) -> Result<(), ExtError>;
}
