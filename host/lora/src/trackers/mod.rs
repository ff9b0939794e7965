//! Experiment trackers: built-in reporters that put a run where teams already read their runs.
//!
//! - **TensorBoard** (`training_tensorboard_log_dir`): event files with scalars and the HParams
//!   plugin's session, in `<log_dir>/<start>_<run id>/` ([`tensorboard`]).
//! - **MLflow** (`MLFLOW_TRACKING_URI`, from the pod or `training_envs`): a run on the tracking
//!   server through its REST API: params, per-step metrics, tags, and the outputs as artifacts
//!   ([`mlflow`]).
//! - **Weights & Biases** (`training_wandb_project` / `_entity` / `_run_name`): an offline run
//!   folder under `$WANDB_DIR/wandb/` in the transaction-log format of the `wandb` SDK, uploaded
//!   with `wandb sync` ([`wandb`]).
//!
//! Settings come from the parameters and the environment the run sees, and are checked before
//! the run starts ([`TrackerSettings::resolve`]: what `--dry-run` prints and the run manifest
//! records). One reporter fans the run's events out to the enabled trackers ([`Trackers`]).
//!
//! Resume: `<checkpoints>/trackers.json` names the tracker runs of the current run, so a resumed
//! run continues them (the same TensorBoard folder, MLflow run and W&B run) instead of starting
//! new ones; what an interrupted attempt logged after the checkpoint it resumes from is removed
//! from the event files and the W&B log (and not logged twice to MLflow), so every step is
//! there once.
//!
//! Failures name the tracker. Bad settings and an unreachable or refusing tracking server stop
//! the run before training; a local write failing (TensorBoard, W&B) fails the run as a failing
//! `training_metrics.jsonl` does (checkpoints stay, the run resumes); a tracking server failing
//! mid-run is a warning and the run goes on (see [`mlflow`]). Trackers write only inside their
//! own folders, never to the run's outputs or checkpoints (except `trackers.json`).

pub(crate) mod proto;
pub mod mlflow;
pub mod tensorboard;
pub mod wandb;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use lora_api::{CheckpointInfo, EvalMetrics, ExtError, Reporter, RunInfo, RunSummary, StepMetrics};
use lora_params::ResolvedParams;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::manifest::Manifest;
use crate::request::RunRequest;

/// Looks an environment variable up (as the run will see it); empty values count as unset.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// This process's environment, for a run (the commands have applied `training_envs` to it).
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Why a tracker could not be set up or failed; always names the tracker.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// A parameter or environment variable the tracker reads is unusable.
    #[error("{tracker}: {setting}: {why}")]
    Setting { tracker: &'static str, setting: String, why: String },
    /// The tracker's server could not be reached, refused or answered nonsense.
    #[error("{tracker}: {why}")]
    Server { tracker: &'static str, why: String },
    /// A local file or folder of the tracker could not be written.
    #[error("{tracker}: {what} {path}: {source}")]
    Io { tracker: &'static str, what: &'static str, path: PathBuf, source: std::io::Error },
}

impl TrackerError {
    pub fn tracker(&self) -> &'static str {
        match self {
            TrackerError::Setting { tracker, .. } | TrackerError::Server { tracker, .. } | TrackerError::Io { tracker, .. } => {
                tracker
            }
        }
    }

    pub(crate) fn setting(tracker: &'static str, setting: impl Into<String>, why: impl Into<String>) -> Self {
        TrackerError::Setting { tracker, setting: setting.into(), why: why.into() }
    }

    pub(crate) fn io(tracker: &'static str, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| TrackerError::Io { tracker, what, path, source }
    }

    fn into_ext(self, call: &str) -> ExtError {
        ExtError::failed(self.tracker(), call, self.to_string())
    }
}

/// Every tracker's settings; `None` where a tracker is not enabled.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrackerSettings {
    pub tensorboard: Option<tensorboard::Settings>,
    pub mlflow: Option<mlflow::Settings>,
    pub wandb: Option<wandb::Settings>,
}

impl TrackerSettings {
    /// Reads the trackers' parameters and environment variables and checks them; no I/O.
    /// Relative paths are taken from the current directory, as the run's other paths are.
    pub fn resolve(p: &ResolvedParams, pvc_path: &Path, env: Env) -> Result<Self, TrackerError> {
        Ok(TrackerSettings {
            tensorboard: tensorboard::Settings::resolve(p)?,
            mlflow: mlflow::Settings::resolve(env)?,
            wandb: wandb::Settings::resolve(p, pvc_path, env)?,
        })
    }

    /// Settings for a run request, with the environment the run will have: `env` (the pod's)
    /// under the run's own overrides (`training_envs`, the KFP `HF_HOME`).
    pub fn for_request(req: &RunRequest, env: &[(String, String)]) -> Result<Self, TrackerError> {
        let overrides = crate::dry_run::process_env(req, env);
        let lookup = |k: &str| {
            overrides
                .iter()
                .rev()
                .chain(env.iter().rev())
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        Self::resolve(&req.params, &req.pvc_path, &lookup)
    }

    pub fn is_empty(&self) -> bool {
        self.tensorboard.is_none() && self.mlflow.is_none() && self.wandb.is_none()
    }

    /// Which trackers are enabled and where they write, without secrets: printed by
    /// `--dry-run` and recorded in the run manifest.
    pub fn describe(&self) -> Value {
        let mut m = Map::new();
        if let Some(t) = &self.tensorboard {
            m.insert("tensorboard".into(), t.describe());
        }
        if let Some(t) = &self.mlflow {
            m.insert("mlflow".into(), t.describe());
        }
        if let Some(t) = &self.wandb {
            m.insert("wandb".into(), t.describe());
        }
        Value::Object(m)
    }
}

/// What `<checkpoints>/trackers.json` keeps: the tracker runs of the current run, so a resumed
/// run continues them. Written when a run starts fresh, updated as trackers start.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RunState {
    /// The lora run id (from the run manifest) these tracker runs belong to.
    pub run_id: String,
    /// When the run started fresh: Unix seconds, and as `YYYYmmdd_HHMMSS` (UTC) for names.
    pub started_unix: f64,
    pub started: String,
    #[serde(default)]
    pub tensorboard_dir: Option<PathBuf>,
    #[serde(default)]
    pub mlflow_run_id: Option<String>,
    #[serde(default)]
    pub wandb_run_dir: Option<PathBuf>,
}

impl RunState {
    const FILE: &'static str = "trackers.json";

    /// The state of a run resuming at `start_step` (when `trackers.json` belongs to it), else a
    /// fresh one. The bool says whether it resumes.
    fn load_or_new(checkpoints: &Path, info: &RunInfo) -> (RunState, bool) {
        if info.start_step > 0
            && let Ok(text) = std::fs::read_to_string(checkpoints.join(Self::FILE))
            && let Ok(state) = serde_json::from_str::<RunState>(&text)
            && state.run_id == info.run_id
        {
            return (state, true);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let state = RunState {
            run_id: info.run_id.clone(),
            started_unix: now.as_secs_f64(),
            started: utc_stamp(now.as_secs()),
            ..RunState::default()
        };
        (state, false)
    }

    fn save(&self, checkpoints: &Path) -> Result<(), TrackerError> {
        let path = checkpoints.join(Self::FILE);
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        crate::fs::write_atomic(&path, &bytes).map_err(TrackerError::io("trackers", "writing", &path))
    }
}

/// `YYYYmmdd_HHMMSS` of Unix time `secs`, UTC (the wandb SDK's run folder stamp).
pub fn utc_stamp(secs: u64) -> String {
    lora_data::strftime(i64::try_from(secs).unwrap_or(i64::MAX), "%Y%m%d_%H%M%S")
}

/// What every tracker is told when the run starts.
pub struct Start<'a> {
    pub info: &'a RunInfo,
    /// The resolved parameters, secrets hidden ([`loggable_params`]).
    pub params: &'a Map<String, Value>,
    pub model: &'a str,
    pub device: &'a str,
    /// The tracker runs of this run so far; a tracker records its own run here.
    pub state: &'a mut RunState,
    /// True when continuing the tracker runs of an interrupted attempt.
    pub resumed: bool,
}

/// A row an earlier attempt of a resumed run logged (from `training_metrics.jsonl`).
#[derive(Debug, Clone, PartialEq)]
pub enum Logged {
    Step(StepMetrics),
    Eval(EvalMetrics),
}

impl Logged {
    fn step(&self) -> u64 {
        match self {
            Logged::Step(m) => m.step,
            Logged::Eval(m) => m.step,
        }
    }
}

/// The step and eval rows of `training_metrics.jsonl` up to `start_step`, in order: what a
/// resumed run logged before. A tracker that lacks some of them (an attempt was killed before
/// the tracker wrote them, or the tracker was enabled on resume) is given them again.
pub fn logged_before(jsonl: &Path, start_step: u64) -> Vec<Logged> {
    let text = std::fs::read_to_string(jsonl).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|row| row.get("train_runtime").is_none() && row.get("step").and_then(Value::as_u64).is_some_and(|s| s <= start_step))
        .filter_map(|row| {
            if row.get("loss").is_some() {
                serde_json::from_value(row).ok().map(Logged::Step)
            } else if row.get("eval_loss").is_some() {
                serde_json::from_value(row).ok().map(Logged::Eval)
            } else {
                None
            }
        })
        .collect()
}

/// The last step and the last evaluation a tracker run already holds (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Have {
    pub step: u64,
    pub eval: u64,
}

/// A run's files the trackers attach once the outputs are written (artifacts, W&B run files).
pub struct OutputFile {
    pub name: &'static str,
    pub path: PathBuf,
}

/// One tracker as the fan-out reporter drives it (public for benchmarks and embedders).
pub trait Tracker: Send {
    fn name(&self) -> &'static str;
    /// Opens (or continues) the tracker run; says what it already holds, so the rows of
    /// [`logged_before`] after that are given to it again.
    fn start(&mut self, s: Start) -> Result<Have, TrackerError>;
    fn step(&mut self, m: &StepMetrics) -> Result<(), TrackerError>;
    fn eval(&mut self, m: &EvalMetrics) -> Result<(), TrackerError>;
    /// A checkpoint was written: what is buffered should reach the tracker's files.
    fn checkpoint(&mut self) -> Result<(), TrackerError> {
        Ok(())
    }
    fn finish(&mut self, s: &RunSummary) -> Result<(), TrackerError>;
    /// The outputs are written: attach them and close the tracker run as finished. Failures
    /// here are warnings (the run's outputs are complete), so this returns them.
    fn outputs(&mut self, files: &[OutputFile]) -> Vec<String>;
    /// The run failed or stopped early: close the tracker run as failed, where it has a state.
    fn abort(&mut self);
}

/// The resolved parameters as trackers log them, secrets hidden by the same rule as plugins,
/// logs and the manifest ([`crate::redact::params`]).
pub fn loggable_params(params: &Map<String, Value>) -> Map<String, Value> {
    let mut out = params.clone();
    crate::redact::params(&mut out);
    out
}

/// A parameter value as text (strings as they are, everything else as JSON, unset as `None`).
pub fn param_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

struct Set {
    trackers: Vec<Box<dyn Tracker>>,
    checkpoints: PathBuf,
    model: String,
    device: String,
    state: Option<RunState>,
    /// `outputs` ran: the run finished and its tracker runs are closed.
    closed: bool,
}

fn lock(set: &Mutex<Set>) -> MutexGuard<'_, Set> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The enabled trackers of one run. Made before the model and data load, so bad settings and an
/// unreachable server stop the run at once; [`Trackers::reporter`] gives the reporter the
/// training loop calls; [`Trackers::outputs_written`] closes the tracker runs once the outputs
/// are complete. Dropped without that (the run failed), it closes them as failed.
pub struct Trackers {
    set: Arc<Mutex<Set>>,
}

impl Trackers {
    /// Checks settings against the world: the MLflow server answers and has the experiment (it
    /// is created if missing), the TensorBoard and W&B folders can be created.
    pub fn connect(settings: &TrackerSettings, checkpoints: &Path) -> Result<Trackers, TrackerError> {
        let mut trackers: Vec<Box<dyn Tracker>> = Vec::new();
        if let Some(s) = &settings.tensorboard {
            trackers.push(Box::new(tensorboard::TensorBoard::connect(s)?));
        }
        if let Some(s) = &settings.mlflow {
            trackers.push(Box::new(mlflow::Mlflow::connect(s)?));
        }
        match &settings.wandb {
            Some(s) if s.mode == wandb::Mode::Disabled => eprintln!("lora: wandb: WANDB_MODE=disabled: no W&B run is written"),
            Some(s) => trackers.push(Box::new(wandb::Wandb::connect(s)?)),
            None => {}
        }
        for t in &trackers {
            eprintln!("lora: tracker {} enabled", t.name());
        }
        let set = Set {
            trackers,
            checkpoints: checkpoints.to_path_buf(),
            model: String::new(),
            device: String::new(),
            state: None,
            closed: false,
        };
        Ok(Trackers { set: Arc::new(Mutex::new(set)) })
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.set).trackers.is_empty()
    }

    /// The reporter for the training loop (none when no tracker is enabled).
    pub fn reporter(&self, manifest: &Manifest) -> Option<Box<dyn Reporter>> {
        let mut set = lock(&self.set);
        if set.trackers.is_empty() {
            return None;
        }
        set.model = manifest.model.name.clone();
        set.device = manifest.device.clone();
        Some(Box::new(FanOut { set: self.set.clone() }))
    }

    /// The run's outputs are written: attach them (`training_metrics.jsonl`, the metrics file,
    /// the loss chart, the run manifest) and close the tracker runs as finished. A failure here
    /// is printed as a warning naming the tracker: the run's own outputs are complete.
    pub fn outputs_written(&self, req: &RunRequest) {
        let ws = req.workspace();
        let files = [
            OutputFile { name: "training_metrics.jsonl", path: ws.checkpoints.join("training_metrics.jsonl") },
            OutputFile { name: "metrics.json", path: req.outputs.metrics.clone() },
            OutputFile { name: "loss_chart.html", path: req.outputs.loss_chart.clone() },
            OutputFile { name: "run_manifest.json", path: req.outputs.model.join("run_manifest.json") },
        ];
        let mut set = lock(&self.set);
        if set.state.is_none() {
            return;
        }
        for t in set.trackers.iter_mut() {
            for w in t.outputs(&files) {
                eprintln!("lora: warning: {}: {w}", t.name());
            }
        }
        set.closed = true;
    }
}

impl Drop for Trackers {
    fn drop(&mut self) {
        let mut set = lock(&self.set);
        if set.state.is_some() && !set.closed {
            for t in set.trackers.iter_mut() {
                t.abort();
            }
            set.closed = true;
        }
    }
}

/// The one reporter that drives every enabled tracker.
struct FanOut {
    set: Arc<Mutex<Set>>,
}

impl FanOut {
    fn each(&self, call: &str, f: impl Fn(&mut dyn Tracker) -> Result<(), TrackerError>) -> Result<(), ExtError> {
        let mut set = lock(&self.set);
        for t in set.trackers.iter_mut() {
            f(t.as_mut()).map_err(|e| e.into_ext(call))?;
        }
        Ok(())
    }
}

impl Reporter for FanOut {
    fn name(&self) -> &str {
        "trackers"
    }

    fn on_start(&mut self, info: &RunInfo) -> Result<(), ExtError> {
        let mut guard = lock(&self.set);
        let set = &mut *guard;
        let (mut state, resumed) = RunState::load_or_new(&set.checkpoints, info);
        let params = loggable_params(info.params.as_object().unwrap_or(&Map::new()));
        let earlier = if info.start_step > 0 { logged_before(&set.checkpoints.join("training_metrics.jsonl"), info.start_step) } else { Vec::new() };
        let mut result = Ok(());
        for t in set.trackers.iter_mut() {
            let start = Start { info, params: &params, model: &set.model, device: &set.device, state: &mut state, resumed };
            let replayed = t.start(start).and_then(|have| {
                let missing: Vec<&Logged> = earlier
                    .iter()
                    .filter(|l| match l {
                        Logged::Step(m) => m.step > have.step,
                        Logged::Eval(m) => m.step > have.eval,
                    })
                    .collect();
                if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
                    eprintln!(
                        "lora: {}: logging {} row(s) of steps {}..={} from training_metrics.jsonl that it does not have yet",
                        t.name(),
                        missing.len(),
                        first.step(),
                        last.step()
                    );
                }
                for l in missing {
                    match l {
                        Logged::Step(m) => t.step(m)?,
                        Logged::Eval(m) => t.eval(m)?,
                    }
                }
                t.checkpoint()
            });
            if let Err(e) = replayed {
                result = Err(e.into_ext("on_start"));
                break;
            }
        }
        // Saved even when a tracker failed, so the ones that started are continued on resume.
        let saved = state.save(&set.checkpoints).map_err(|e| e.into_ext("on_start"));
        set.state = Some(state);
        result.and(saved)
    }

    fn on_step(&mut self, m: &StepMetrics) -> Result<(), ExtError> {
        self.each("on_step", |t| t.step(m)).map_err(|e| e.with_batch(m.step))
    }

    fn on_eval(&mut self, m: &EvalMetrics) -> Result<(), ExtError> {
        self.each("on_eval", |t| t.eval(m)).map_err(|e| e.with_batch(m.step))
    }

    fn on_checkpoint(&mut self, c: &CheckpointInfo) -> Result<(), ExtError> {
        self.each("on_checkpoint", |t| t.checkpoint()).map_err(|e| e.with_batch(c.step))
    }

    fn on_finish(&mut self, s: &RunSummary) -> Result<(), ExtError> {
        self.each("on_finish", |t| t.finish(s))
    }
}

/// The metric rows of `training_metrics.jsonl`, named as trackers log them. TensorBoard and W&B
/// use transformers' names (`train/<key>`, `eval/<key>`), MLflow the file's own keys.
pub(crate) fn step_values(m: &StepMetrics) -> [(&'static str, f64); 7] {
    [
        ("loss", m.loss),
        ("learning_rate", m.learning_rate),
        ("grad_norm", m.grad_norm),
        ("tokens_per_second", m.tokens_per_second),
        ("epoch", m.epoch),
        ("tokens", m.tokens as f64),
        ("trained_tokens", m.trained_tokens as f64),
    ]
}

pub(crate) fn eval_values(m: &EvalMetrics) -> [(&'static str, f64); 3] {
    [("eval_loss", m.eval_loss), ("perplexity", m.perplexity), ("eval_tokens", m.eval_tokens as f64)]
}

/// The run totals, as the last row of `training_metrics.jsonl` names them (non-finite ones left
/// out: trackers store numbers).
pub(crate) fn summary_values(s: &RunSummary) -> Vec<(&'static str, f64)> {
    let steps_per_s = if s.train_runtime > 0.0 { s.total_steps as f64 / s.train_runtime } else { 0.0 };
    let mut v = vec![
        ("train_runtime", s.train_runtime),
        ("train_loss", s.train_loss),
        ("train_steps_per_second", steps_per_s),
        ("train_tokens_per_second", s.tokens_per_second),
        ("total_tokens", s.tokens as f64),
        ("final_loss", s.final_loss),
        ("min_loss", s.min_loss),
    ];
    v.extend(s.final_eval_loss.map(|x| ("final_eval_loss", x)));
    v.extend(s.final_perplexity.map(|x| ("final_perplexity", x)));
    v.retain(|(_, x)| x.is_finite());
    v
}

/// transformers' tracker names: `eval_loss` → `eval/loss`, `perplexity` / `eval_tokens` →
/// `eval/...`, everything else `train/<key>`.
pub(crate) fn hf_name(key: &str) -> String {
    match key {
        "perplexity" => "eval/perplexity".into(),
        k => match k.strip_prefix("eval_") {
            Some(rest) => format!("eval/{rest}"),
            None => format!("train/{k}"),
        },
    }
}

/// The host name, for tracker metadata and file names.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

pub(crate) fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn utc_stamps_are_the_civil_date() {
        assert_eq!(utc_stamp(0), "19700101_000000");
        assert_eq!(utc_stamp(951_782_400), "20000229_000000", "leap day of a century leap year");
        assert_eq!(utc_stamp(1_796_163_731), "20261201_222211");
    }

    #[test]
    fn logged_params_hide_secrets_and_keep_the_rest() {
        let mut p = Map::new();
        p.insert("training_envs".into(), json!("HF_TOKEN=hf_abc,MLFLOW_EXPERIMENT_NAME=exp, WANDB_API_KEY=k"));
        p.insert("training_plugin_config".into(), json!(r#"{"reporter":{"settings":{"url":"u","api_key":"s3"}}}"#));
        p.insert("kubernetes_config".into(), json!({"env": [{"name": "x", "token": "t"}]}));
        p.insert("training_lora_r".into(), json!(16));
        let out = loggable_params(&p);
        // Entries keep their spacing; only secret values change.
        assert_eq!(out["training_envs"], "HF_TOKEN=<hidden>,MLFLOW_EXPERIMENT_NAME=exp, WANDB_API_KEY=<hidden>");
        let plugin: Value = serde_json::from_str(out["training_plugin_config"].as_str().unwrap()).unwrap();
        assert_eq!(plugin["reporter"]["settings"], json!({"url": "u", "api_key": "<hidden>"}));
        assert_eq!(out["kubernetes_config"]["env"][0]["token"], "<hidden>");
        assert_eq!(out["training_lora_r"], 16);
        let text = serde_json::to_string(&out).unwrap();
        for secret in ["hf_abc", "s3\"", "\"t\"", "=k"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    #[test]
    fn tracker_names_follow_transformers() {
        assert_eq!(hf_name("loss"), "train/loss");
        assert_eq!(hf_name("eval_loss"), "eval/loss");
        assert_eq!(hf_name("perplexity"), "eval/perplexity");
        assert_eq!(hf_name("train_runtime"), "train/train_runtime");
    }
}
