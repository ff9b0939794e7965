use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ExtError;

/// What a scheduler is constructed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleContext {
    /// The peak learning rate (`training_learning_rate`).
    pub base_lr: f64,
    pub warmup_steps: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
    pub num_epochs: u64,
    pub steps_per_epoch: u64,
    /// Free-form settings for this scheduler (from the run's plugin settings or parameters).
    pub settings: BTreeMap<String, String>,
}

/// Gives the learning rate of each optimizer step.
///
/// Steps are 0-based: `learning_rate(s)` is the rate applied by the `s`-th optimizer step, which
/// matches `transformers.get_scheduler(...)`'s `lr_lambda(s) * base_lr` (its `get_last_lr()`
/// before the `s`-th `scheduler.step()`).
pub trait Scheduler: Send {
    fn name(&self) -> &str;

    fn learning_rate(&mut self, step: u64) -> Result<f64, ExtError>;

    /// Told the loss of each finished optimizer step, in order, so adaptive schedules are
    /// possible. On resume the run replays the recorded losses of the finished steps, so a
    /// scheduler needs no state of its own beyond what these calls build.
    fn observe_loss(&mut self, step: u64, loss: f64) -> Result<(), ExtError> {
        let _ = (step, loss);
        Ok(())
    }
}
