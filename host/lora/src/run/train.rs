//! The training loop: epochs over the data plan, gradient accumulation over a step's
//! micro-batches, optimizer steps with the scheduler's learning rate, logging every
//! `training_logging_steps`, evaluation every `training_eval_steps` (and at the end), checkpoints
//! every `training_save_steps` and at epoch ends with `training_checkpoint_at_epoch`, resume.
//!
//! Randomness: adapter init from `training_seed` (engine), dropout masks from a stream seeded by
//! `training_seed` and advanced per micro-batch (engine state, checkpointed), shuffling from
//! `training_seed + epoch` (data plan, recomputed). Nothing else is random, so a resumed run
//! continues bit for bit.
//!
//! Data parallel (several ranks, see `crate::parallel`): every rank walks the same plan and
//! trains its share of each step's rows; `Trainer::all_reduce_step` sums gradients and stats once
//! per step, so the scheduler, the optimizer and the logged numbers are the same on every rank.
//! Rank 0 alone reports and writes checkpoints (the others wait for each at a barrier) and
//! decides what to resume from. Dropout masks differ per rank, so with `training_lora_dropout`
//! above 0 N ranks are not the 1-rank run (they are with 0: only the summation order differs).
//!
//! Timings (step seconds, tokens/s, elapsed and run time) and the peak memory are the only values
//! an interrupted run cannot reproduce. `LORA_TEST_FROZEN_CLOCK=1` (for the kill tests) makes
//! every optimizer step last exactly one second by the run's clock and the peak memory 0, so that
//! every output file of an interrupted run compares byte for byte with an uninterrupted one.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use lora_api::{CheckpointInfo, EvalMetrics, Reporter, RunInfo, RunSummary, Scheduler, StepMetrics};
use lora_data::{MicroBatch, PreparedData};
use lora_engine::trainer::StepStats;
use lora_engine::{Batch, Collective, Trainer, TrainerState};
use lora_params::ResolvedParams;
use serde_json::{Value, json};

use crate::checkpoint::{self, CheckpointState, Position, Snapshot};
use crate::manifest::Manifest;
use crate::report::{History, ProgressReporter};

pub(super) struct Run<'a> {
    pub trainer: Trainer,
    pub scheduler: Box<dyn Scheduler>,
    /// The built-in `training_metrics.jsonl` reporter and plugin reporters.
    pub reporters: Vec<Box<dyn Reporter>>,
    /// The progress bar / log lines (also a reporter; kept typed to redraw after every step).
    pub progress: ProgressReporter,
    pub prepared: &'a PreparedData,
    pub params: &'a ResolvedParams,
    pub manifest: &'a Manifest,
    pub checkpoints: PathBuf,
    pub adapter_config: Vec<u8>,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    /// How messages name parameters (flags in a `lora train` run).
    pub names: crate::request::ParamNames,
    /// The data-parallel world; only rank 0 reports and writes checkpoints.
    pub coll: &'a dyn Collective,
}

pub(super) struct Finished {
    pub history: History,
    pub summary: RunSummary,
}

/// One micro-batch's rows as one engine batch (rows are independent document streams).
pub fn to_batch(mb: &MicroBatch) -> Batch {
    let mut b = Batch::default();
    for row in &mb.rows {
        b.input_ids.extend_from_slice(&row.input_ids);
        b.train_mask.extend_from_slice(&row.train_mask);
        b.seq_lens.extend_from_slice(&row.seq_lens);
    }
    b
}

/// Peak resident memory of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// The run's clock (see the module docs for the frozen one).
#[derive(Debug, Clone, Copy)]
struct Clock {
    frozen: bool,
}

impl Clock {
    fn from_env() -> Self {
        Clock { frozen: std::env::var_os("LORA_TEST_FROZEN_CLOCK").is_some_and(|v| v == "1") }
    }

    /// Seconds since `t0` (one optimizer step).
    fn secs_since(&self, t0: Instant) -> f64 {
        if self.frozen { 1.0 } else { t0.elapsed().as_secs_f64() }
    }

    /// Seconds this attempt has run: since `started`, or (frozen) its steps' seconds.
    fn elapsed(&self, started: Instant, step_secs: f64) -> f64 {
        if self.frozen { step_secs } else { started.elapsed().as_secs_f64() }
    }

    fn peak_memory_bytes(&self) -> u64 {
        if self.frozen { 0 } else { peak_memory_bytes() }
    }
}

fn report_all(
    progress: &mut ProgressReporter,
    reporters: &mut [Box<dyn Reporter>],
    f: impl Fn(&mut dyn Reporter) -> Result<(), lora_api::ExtError>,
) -> Result<()> {
    f(progress)?;
    for r in reporters.iter_mut() {
        f(r.as_mut()).with_context(|| format!("reporter `{}`", r.name()))?;
    }
    Ok(())
}

impl Run<'_> {
    fn epoch_of(&self, step: u64) -> f64 {
        step as f64 / self.steps_per_epoch.max(1) as f64
    }

    /// Eval loss (mean over trained tokens) and perplexity on the validation split.
    fn evaluate(&self, step: u64) -> Result<Option<EvalMetrics>> {
        let batches = self.prepared.eval_batches();
        // Every rank takes part in the reduction, with or without rows of its own.
        let parallel = self.coll.world() > 1;
        if batches.is_empty() && !parallel {
            return Ok(None);
        }
        let (mut loss, mut tokens) = (0.0f64, 0usize);
        for mb in &batches {
            let (l, n) = self.trainer.eval_loss(&to_batch(mb)).context("evaluating on the validation split")?;
            loss += l;
            tokens += n;
        }
        if parallel {
            let mut sums = [loss, tokens as f64];
            self.coll.all_reduce_sum_f64(&mut sums)?;
            (loss, tokens) = (sums[0], sums[1] as usize);
        }
        if tokens == 0 {
            return Ok(None);
        }
        let eval_loss = loss / tokens as f64;
        Ok(Some(EvalMetrics { step, epoch: self.epoch_of(step), eval_loss, perplexity: eval_loss.exp(), eval_tokens: tokens as u64 }))
    }

    /// Where a learning rate came from, for errors: the scheduler's name, and the plugin file when
    /// a scheduler plugin gave it.
    fn lr_origin(&self, step: u64, lr: f64) -> String {
        let plugin = self.params.plugins.iter().find(|s| s.kind == "scheduler");
        let from = match plugin {
            Some(spec) => format!("the scheduler plugin `{}` ({})", self.scheduler.name(), spec.path.display()),
            None => format!("the built-in `{}` schedule", self.scheduler.name()),
        };
        format!("the learning rate of step {step} was {lr:e}, from {from}")
    }

    /// Rank 0 writes the checkpoint; every rank returns once it is complete.
    fn save(&mut self, pos: Position, history: &History, last_lr: Option<f64>) -> Result<f64> {
        let t0 = Instant::now();
        if self.coll.rank() != 0 {
            self.coll.barrier()?;
            return Ok(t0.elapsed().as_secs_f64());
        }
        let secs = self.write_checkpoint(pos, history, last_lr)?;
        self.coll.barrier()?;
        Ok(secs)
    }

    fn write_checkpoint(&mut self, pos: Position, history: &History, last_lr: Option<f64>) -> Result<f64> {
        let t0 = Instant::now();
        let state: TrainerState = self.trainer.save_state()?;
        let (optimizer, adapter): (Vec<_>, Vec<_>) =
            state.tensors.into_iter().partition(|t| t.name.ends_with(".exp_avg") || t.name.ends_with(".exp_avg_sq"));
        let ck = CheckpointState {
            format: CheckpointState::FORMAT.into(),
            position: pos,
            trainer: state.meta,
            rng: json!({
                "adapter_init": "training_seed (engine AdapterConfig::init_seed)",
                "dropout": "stream seeded from training_seed, advanced per micro-batch (trainer.micro)",
                "shuffle": "training_seed + epoch (lora-data epoch plan)",
                "seed": self.params.seed,
            }),
            resume_key: self.manifest.resume_key(),
            history: history.clone(),
        };
        let snap = Snapshot { state: &ck, adapter: &adapter, optimizer: &optimizer, adapter_config: &self.adapter_config, manifest: self.manifest };
        let dir = checkpoint::save(&self.checkpoints, &snap, self.params.save_total_limit).map_err(|e| {
            let non_finite = matches!(e, checkpoint::CheckpointError::NonFinite { .. });
            let e = anyhow::Error::new(e);
            match last_lr {
                Some(lr) if non_finite => e.context(format!("training diverged at step {}: {}", pos.step, self.lr_origin(pos.step, lr))),
                _ => e,
            }
        })?;
        let secs = t0.elapsed().as_secs_f64();
        let info = CheckpointInfo { step: pos.step, epoch: self.epoch_of(pos.step), path: dir };
        report_all(&mut self.progress, &mut self.reporters, |r| r.on_checkpoint(&info))?;
        Ok(secs)
    }

    /// Rank 0 decides what to resume from (and tidies the checkpoint folder), then every other
    /// rank loads the same checkpoint, read only.
    fn resume(&mut self) -> Result<(Position, History)> {
        if self.coll.world() == 1 {
            return self.resume_rank0().map(|(pos, history, _)| (pos, history));
        }
        let (mut chosen, found) = match self.coll.rank() {
            0 => {
                let r = self.resume_rank0()?;
                (r.2.map(|p| p.to_string_lossy().into_owned().into_bytes()).unwrap_or_default(), Some((r.0, r.1)))
            }
            _ => (Vec::new(), None),
        };
        self.coll.broadcast_bytes(&mut chosen, 0)?;
        if let Some(found) = found {
            return Ok(found);
        }
        if chosen.is_empty() {
            return Ok((Position { step: 0, epoch: 0, step_in_epoch: 0 }, History::default()));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&chosen).into_owned());
        let loaded = checkpoint::load(&dir).with_context(|| format!("rank {}: reading the checkpoint rank 0 resumes from", self.coll.rank()))?;
        self.restore(loaded)
    }

    fn restore(&mut self, loaded: checkpoint::Loaded) -> Result<(Position, History)> {
        let dir = loaded.path.clone();
        self.trainer
            .load_state(&TrainerState { tensors: loaded.tensors, meta: loaded.state.trainer.clone() })
            .with_context(|| format!("restoring the trainer from {}", dir.display()))?;
        let history = loaded.state.history;
        for (i, loss) in history.losses.iter().enumerate() {
            self.scheduler.observe_loss(i as u64, *loss)?;
        }
        Ok((loaded.state.position, history))
    }

    /// Restores the newest intact matching checkpoint (the resume rule in `checkpoint`), or starts
    /// fresh; prunes checkpoints beyond `training_save_total_limit` an earlier run left. Also
    /// returns the checkpoint it resumed from.
    fn resume_rank0(&mut self) -> Result<(Position, History, Option<PathBuf>)> {
        checkpoint::remove_stale_temps(&self.checkpoints);
        let fresh = (Position { step: 0, epoch: 0, step_in_epoch: 0 }, History::default(), None);
        if self.params.resume == "never" {
            let n = checkpoint::remove_all(&self.checkpoints)?;
            if n > 0 {
                eprintln!("lora: {}: removed {n} old checkpoint(s) in {}", self.names.setting("training_resume", "never"), self.checkpoints.display());
            }
            return Ok(fresh);
        }
        let found = checkpoint::find_resumable(&self.checkpoints, self.manifest, self.names)?;
        for (dir, why) in &found.damaged {
            eprintln!(
                "lora: warning: {why}; it is not resumed (set aside as {}.damaged), trying the previous complete checkpoint",
                dir.display()
            );
        }
        let removed = checkpoint::prune(&self.checkpoints, self.params.save_total_limit)?;
        if !removed.is_empty() {
            eprintln!(
                "lora: removed {} checkpoint(s) beyond training_save_total_limit={} that an earlier run left",
                removed.len(),
                self.params.save_total_limit
            );
        }
        let Some(loaded) = found.resume else {
            if !found.damaged.is_empty() {
                eprintln!("lora: no intact checkpoint is left: starting from the beginning (the result is the same as an uninterrupted run's)");
            }
            return Ok(fresh);
        };
        let dir = loaded.path.clone();
        let (pos, history) = self.restore(loaded)?;
        eprintln!("lora: resuming from {} (step {})", dir.display(), pos.step);
        Ok((pos, history, Some(dir)))
    }

    pub fn train(&mut self) -> Result<Finished> {
        let p = self.params;
        let (mut pos, mut history) = self.resume()?;
        super::TRAINING_STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
        let start_step = pos.step;
        let start_tokens = history.tokens;
        // Plugins see the run's parameters with secrets hidden, as everything that prints them.
        let mut params = p.params_as_used();
        crate::redact::params(&mut params);
        let info = RunInfo {
            run_id: self.manifest.run_id(),
            params: Value::Object(params),
            total_steps: self.total_steps,
            num_epochs: p.num_epochs,
            steps_per_epoch: self.steps_per_epoch,
            start_step,
            world_size: p.world_size as u32,
        };
        report_all(&mut self.progress, &mut self.reporters, |r| r.on_start(&info))?;
        let clock = Clock::from_env();
        let started = Instant::now();
        let mut last_lr = None;
        let mut train_secs = 0.0f64;
        let (mut log_loss, mut log_steps, mut log_tokens, mut log_trained, mut log_secs) = history.pending_log;
        let mut last_eval_step = history.evals.last().map(|e| e.step);
        let mut checkpoint_secs = 0.0f64;
        let logging = p.logging_steps.max(1);
        // The eval loss before the first step: what the adapter's eval loss is compared with
        // (a fresh adapter is the base model: LoRA's B starts at zero).
        if pos.step == 0 && history.evals.is_empty() && self.total_steps > 0 && p.eval_steps > 0
            && let Some(e) = self.evaluate(0)?
        {
            history.evals.push(e.clone());
            report_all(&mut self.progress, &mut self.reporters, |r| r.on_eval(&e))?;
        }

        'epochs: while pos.step < self.total_steps && pos.epoch < p.num_epochs {
            let plan = self.prepared.epoch_plan(pos.epoch as usize);
            let steps_in_epoch = plan.steps.len() as u64;
            for (i, ostep) in plan.steps.iter().enumerate().skip(pos.step_in_epoch as usize) {
                if pos.step >= self.total_steps {
                    break 'epochs;
                }
                let step_index = pos.step; // 0-based index of this optimizer step
                let lr = self.scheduler.learning_rate(step_index).with_context(|| format!("scheduler at step {step_index}"))?;
                let t0 = Instant::now();
                let denom = (ostep.trained_tokens as f32).max(1.0);
                let mut local = StepStats::default();
                for mb in &ostep.micro_batches {
                    let s = self.trainer.forward_backward(&to_batch(mb), denom).with_context(|| {
                        format!("training step {} (epoch {}, step {} of the epoch)", step_index + 1, pos.epoch + 1, i + 1)
                    })?;
                    local.loss_sum += s.loss_sum;
                    local.tokens += s.tokens;
                    local.trained_tokens += s.trained_tokens;
                }
                // The kill tests' crashing rank (`LORA_FAULT_INJECT=rank<r>-step:<step>`).
                checkpoint::fault_point(&format!("rank{}-step", self.coll.rank()), step_index + 1);
                let s = self.trainer.all_reduce_step(self.coll, local, ostep.trained_tokens).with_context(|| format!("training step {}", step_index + 1))?;
                let (loss_sum, tokens, trained) = (s.loss_sum, s.tokens as u64, s.trained_tokens as u64);
                let o = self.trainer.optimizer_step(lr).with_context(|| format!("optimizer step {}: {}", step_index + 1, self.lr_origin(step_index + 1, lr)))?;
                last_lr = Some(lr);
                let secs = clock.secs_since(t0);
                train_secs += secs;
                let loss = loss_sum / trained.max(1) as f64;
                self.scheduler.observe_loss(step_index, loss)?;
                history.losses.push(loss);
                history.tokens += tokens;
                history.trained_tokens += trained;
                pos = Position { step: step_index + 1, epoch: pos.epoch, step_in_epoch: i as u64 + 1 };
                if pos.step_in_epoch == steps_in_epoch {
                    pos = Position { step: pos.step, epoch: pos.epoch + 1, step_in_epoch: 0 };
                }
                let step = pos.step;
                (log_loss, log_steps, log_tokens, log_trained, log_secs) =
                    (log_loss + loss, log_steps + 1, log_tokens + tokens, log_trained + trained, log_secs + secs);
                self.progress.tick(step, loss, tokens as f64 / secs.max(1e-9));
                if step % logging == 0 || step == self.total_steps {
                    let m = StepMetrics {
                        step,
                        epoch: self.epoch_of(step),
                        max_steps: self.total_steps,
                        loss: log_loss / log_steps as f64,
                        grad_norm: o.grad_norm,
                        learning_rate: lr,
                        tokens: log_tokens,
                        trained_tokens: log_trained,
                        tokens_per_second: log_tokens as f64 / log_secs.max(1e-9),
                        elapsed_s: history.prior_runtime_s + clock.elapsed(started, train_secs),
                    };
                    history.steps.push(m.clone());
                    report_all(&mut self.progress, &mut self.reporters, |r| r.on_step(&m))?;
                    (log_loss, log_steps, log_tokens, log_trained, log_secs) = (0.0, 0, 0, 0, 0.0);
                }
                if p.eval_steps > 0 && step % p.eval_steps == 0 {
                    if let Some(e) = self.evaluate(step)? {
                        history.evals.push(e.clone());
                        report_all(&mut self.progress, &mut self.reporters, |r| r.on_eval(&e))?;
                    }
                    last_eval_step = Some(step);
                }
                let epoch_end = pos.step_in_epoch == 0;
                let want_save = (p.save_steps > 0 && step % p.save_steps == 0) || (p.checkpoint_at_epoch && epoch_end);
                if want_save && step < self.total_steps {
                    let mut h = history.clone();
                    h.pending_log = (log_loss, log_steps, log_tokens, log_trained, log_secs);
                    h.prior_runtime_s += clock.elapsed(started, train_secs);
                    checkpoint_secs += self.save(pos, &h, last_lr)?;
                }
            }
        }
        // The final state is a checkpoint too: a rerun with the same inputs finds the run done.
        // (What is pending is this attempt's, not what a resumed checkpoint had pending.)
        history.pending_log = (log_loss, log_steps, log_tokens, log_trained, log_secs);
        history.prior_runtime_s += clock.elapsed(started, train_secs);
        if last_eval_step != Some(pos.step)
            && let Some(e) = self.evaluate(pos.step)?
        {
            history.evals.push(e.clone());
            report_all(&mut self.progress, &mut self.reporters, |r| r.on_eval(&e))?;
        }
        if pos.step > start_step {
            checkpoint_secs += self.save(pos, &history, last_lr)?;
        }
        let mut summary = history.summary(self.epoch_of(pos.step), 0.0, clock.peak_memory_bytes());
        summary.train_runtime = history.prior_runtime_s;
        report_all(&mut self.progress, &mut self.reporters, |r| r.on_finish(&summary))?;
        if self.coll.rank() != 0 {
            return Ok(Finished { history, summary });
        }
        eprintln!(
            "lora: {} steps in {:.1}s of optimizer steps ({:.0} tokens/s in steps), {:.2}s writing checkpoints",
            pos.step - start_step,
            train_secs,
            (history.tokens - start_tokens) as f64 / train_secs.max(1e-9),
            checkpoint_secs
        );
        Ok(Finished { history, summary })
    }
}
