//! The run: `lora train` and `lora kfp` both end here, in [`execute`].
//!
//! resolve the model (folder or hub id) → tokenizer → dataset (lora-data, or a preprocessor
//! plugin) → run manifest → engine trainer → resume from a checkpoint (or start fresh) → the
//! training loop ([`train`]) → outputs: PEFT adapter, merged model, `final_model` copy,
//! metrics, loss chart, manifest.
//!
//! This module must not parse parameters (that is `lora-params` and the CLI) nor implement ops
//! (that is the engine); it orchestrates and owns the files a run writes.

pub mod outputs;
mod train;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lora_api::{Preprocessor, Reporter, ScheduleContext, Scheduler};
use lora_data::{BadRecords, DataConfig, DatasetType, HfTextTools, LongSamplePolicy, PreparedData};
use lora_engine::quant::bnb::parse_torch_dtype;
use lora_engine::{AdapterConfig, Collective, Device, LoadOptions, Model, OptimConfig, QuantConfig, QuantInfo, QuantSource, QuantType, Trainer, backend_for};
use lora_params::ResolvedParams;
use serde_json::{Map, Value, json};

use crate::chart::{self, ChartMeta};
use crate::checkpoint;
use crate::hub::{self, HubOptions, ResolvedModel};
use crate::manifest::{self, Inputs, Manifest};
use crate::report::{self, JsonlReporter, ProgressReporter};
use crate::request::{RunOutcome, RunRequest};
use crate::schedule::BuiltinScheduler;
use crate::trackers;

/// Set once this process's run got past the resume check (its checkpoints are this run's, or it
/// started fresh): only then can a failure promise that running the same command again resumes.
/// A failure before (an unreachable hub, a checkpoint of another run) must not.
pub(crate) static TRAINING_STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process's run started training (see [`TRAINING_STARTED`]).
pub fn training_started() -> bool {
    TRAINING_STARTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// What the reference component returns as `Output`.
pub const OUTPUT: &str = "training completed";

/// Runs one training run described by `req` and writes all its outputs. Started as one of
/// several data-parallel processes (see [`crate::parallel`]), it trains its share of every step;
/// only rank 0 writes, and a rank that fails stops them all.
pub fn execute(req: &RunRequest) -> Result<RunOutcome> {
    let device = pick_device(&req.params.device)?;
    let coll = crate::parallel::join(&req.params, device)?;
    let result = execute_in(req, device, coll.as_ref());
    let (rank, world) = (coll.rank(), coll.world());
    if let Err(e) = &result
        && world > 1
    {
        // The other ranks wait in their next collective call: end them all, naming this rank.
        eprintln!("lora: rank {rank} of {world} failed: {e:#}");
        coll.abort(1);
    }
    result
}

fn execute_in(req: &RunRequest, device: Device, coll: &dyn Collective) -> Result<RunOutcome> {
    let p = &req.params;
    let ws = req.workspace();
    let run_started = Instant::now();
    let rank0 = coll.rank() == 0;
    outputs::check_paths(req)?;
    let _lock = if rank0 { Some(outputs::WorkspaceLock::acquire(&req.pvc_path)?) } else { None };
    // Trackers first: bad settings or an unreachable tracking server stop the run before any work.
    let tracker_settings = trackers::TrackerSettings::resolve(p, &req.pvc_path, &trackers::process_env)?;
    let no_trackers = trackers::TrackerSettings { tensorboard: None, mlflow: None, wandb: None };
    let trackers = trackers::Trackers::connect(if rank0 { &tracker_settings } else { &no_trackers }, &ws.checkpoints)?;
    if coll.world() > 1 && rank0 {
        eprintln!("lora: {} data-parallel processes ({}); rank 0 writes the checkpoints and outputs", coll.world(), coll.name());
    }

    // Model and tokenizer.
    let model = hub::resolve_model(&p.base_model, &HubOptions::from_env())?;
    eprintln!("lora: base model {} ({})", model.name, model.dir.display());
    let model_notes = crate::request::check_model_dir(&model.dir, p)?;
    for note in &model_notes {
        eprintln!("lora: warning: {note}");
    }
    let plugins = plugin_set(req)?;
    // Rank 0 fills the processed-data cache; the others then read it instead of racing to write it.
    if !rank0 {
        coll.barrier()?;
    }
    let RunData { source, prepared } = read_data_for(req, &model.dir, plugins.as_ref(), true, coll.rank())?;
    if rank0 {
        coll.barrier()?;
        log_data(&prepared);
    }

    // Engine.
    let loaded = Model::load(&model.dir, &LoadOptions { backend: backend_for(device)?, quant: quant_config(p) })
        .with_context(|| format!("loading the base model from {}", model.dir.display()))?;
    if let Some(q) = &loaded.quant {
        eprintln!("lora: base model projections held {}", q.describe());
    }
    let adapter_cfg = adapter_config(p);
    let targets: Vec<String> = {
        let (mut t, params) = adapter_cfg.target_names(&loaded.cfg)?;
        t.extend(params);
        t
    };
    let optim = OptimConfig { weight_decay: p.weight_decay, max_grad_norm: p.max_grad_norm, ..OptimConfig::default() };
    let mut trainer = Trainer::new(loaded, adapter_cfg.clone(), optim, p.seed)?;
    trainer.set_data_parallel(coll.rank(), coll.world())?;

    // Plan and schedule.
    let RunShape { steps_per_epoch, total_steps, epochs_run } = RunShape::of(p, &prepared);
    let largest = prepared.largest_micro_batch_tokens(epochs_run);
    let plan = MemoryPlan {
        tokens: largest,
        kept: trainer.activation_bytes(largest, false),
        recomputed: trainer.activation_bytes(largest, true),
        available: trainer.model.backend().available_memory_bytes(),
    };
    let (recompute, lines) = plan.decide(&p.gradient_checkpointing);
    trainer.recompute = recompute;
    for line in lines {
        eprintln!("{line}");
    }
    let ctx = schedule_context(p, total_steps, steps_per_epoch);
    let scheduler: Box<dyn Scheduler> = match plugins.as_ref().map(|s| s.load_scheduler(ctx.clone())).transpose()?.flatten() {
        Some(s) => s,
        None => Box::new(BuiltinScheduler::new(&p.lr_scheduler, &ctx)?),
    };

    // Manifest and reporters.
    let mut run_manifest = build_manifest(p, &model, &source, device, model_notes, trainer.model.quant.as_ref())?;
    if coll.world() > 1 {
        // Part of the resume key: a checkpoint resumes only with as many ranks as wrote it.
        run_manifest.device = format!("{device}, {} data-parallel ranks ({})", coll.world(), coll.name());
    }
    run_manifest.trackers = tracker_settings.describe();
    let mut reporters: Vec<Box<dyn Reporter>> = Vec::new();
    if rank0 {
        reporters.push(Box::new(JsonlReporter::new(ws.checkpoints.join("training_metrics.jsonl"))));
        if let Some(set) = &plugins {
            reporters.extend(set.load_reporters()?);
        }
        reporters.extend(trackers.reporter(&run_manifest));
    }

    let adapter_config_json = outputs::peft_config(&adapter_cfg, &targets, &model.name);
    let mut run = train::Run {
        trainer,
        scheduler,
        reporters,
        progress: if rank0 { ProgressReporter::stderr() } else { ProgressReporter::new(false, Box::new(std::io::sink())) },
        coll,
        prepared: &prepared,
        params: p,
        manifest: &run_manifest,
        checkpoints: ws.checkpoints.clone(),
        adapter_config: serde_json::to_vec_pretty(&adapter_config_json)?,
        total_steps,
        steps_per_epoch,
        names: crate::request::ParamNames::of(req),
    };
    let finished = run.train()?;
    if !rank0 {
        // Rank 0 writes the outputs; this rank waits so that the run ends when they are written.
        drop(run);
        coll.barrier()?;
        return Ok(RunOutcome::default());
    }

    // Outputs: all staged next to their destinations, then published together.
    let adapter = run.trainer.adapter_tensors()?;
    if let Some(q) = &run.trainer.model.quant {
        eprintln!("lora: merged model: {}", merge_base(q));
    }
    // The trainer's model is not needed past here: free it before the merged model is loaded.
    drop(run);
    let mut staging = outputs::Staging::new(&req.outputs.model, finished.summary.total_steps);
    let merged_dir = stage_model_outputs(&mut staging, req, &model, &adapter, &adapter_cfg, &adapter_config_json, &run_manifest)?;
    let summary = &finished.summary;
    let merged = merged_eval(&merged_dir, &prepared, device, &adapter_cfg, &finished.history)?;
    let params_json = Value::Object(p.params_as_used());
    let mut metrics = report::kfp_metrics(summary, &params_json);
    if let Some(m) = &merged {
        metrics.insert("training_merged_eval_loss".into(), json!(m.eval_loss));
        if let Some(kept) = m.kept_gain {
            metrics.insert("training_merged_kept_gain".into(), json!(kept));
        }
    }
    staging.file("output_metrics", &req.outputs.metrics, serde_json::to_string_pretty(&Value::Object(metrics.clone()))?.as_bytes())?;
    let chart_meta = ChartMeta {
        model: model.name.clone(),
        settings: chart_settings(p, &targets, device),
        merged_eval_loss: merged.as_ref().map(|m| m.eval_loss),
    };
    let html = chart::render(&finished.history, summary, &chart_meta);
    staging.file("output_loss_chart", &req.outputs.loss_chart, html.as_bytes())?;
    staging.publish()?;
    trackers.outputs_written(req);
    eprintln!("lora: outputs written in {:.1}s total:", run_started.elapsed().as_secs_f64());
    for line in crate::dry_run::output_lines(req) {
        eprintln!("lora: {line}");
    }
    coll.barrier()?;

    let mut model_metadata = Map::new();
    model_metadata.insert("base_model".into(), json!(model.name));
    if let Some(c) = &model.commit {
        model_metadata.insert("base_model_commit".into(), json!(c));
    }
    model_metadata.insert("adapter".into(), json!("adapter/"));
    model_metadata.insert("run_id".into(), json!(run_manifest.run_id()));
    model_metadata.insert("lora_r".into(), json!(p.lora_r));
    model_metadata.insert("lora_alpha".into(), json!(p.lora_alpha));
    Ok(RunOutcome { output: OUTPUT.into(), metrics, model_metadata })
}

/// What a run reads before it trains: the dataset source and the prepared samples.
pub(crate) struct RunData {
    pub source: lora_data::DatasetSource,
    pub prepared: PreparedData,
}

/// Reads the model's tokenizer, resolves the dataset source (in the reference's order) and
/// prepares the samples (a preprocessor plugin's, or the built-in format's). The run and
/// `--dry-run` both come here, so a dry run fails on what the run would fail on, with the same
/// error. `cache`: use the processed-data cache (the dry run neither reads nor writes it).
pub(crate) fn read_data(req: &RunRequest, model_dir: &Path, plugins: Option<&plugins::PluginSet>, cache: bool) -> Result<RunData> {
    read_data_for(req, model_dir, plugins, cache, 0)
}

/// [`read_data`] for data-parallel rank `rank` (its share of the plan).
fn read_data_for(req: &RunRequest, model_dir: &Path, plugins: Option<&plugins::PluginSet>, cache: bool, rank: usize) -> Result<RunData> {
    let p = &req.params;
    let tools = Arc::new(
        HfTextTools::from_dir(model_dir)
            .with_context(|| format!("loading the tokenizer of training_base_model from {}", model_dir.display()))?,
    );
    let mut data_cfg = data_config(p, &req.workspace().data_output_dir)?;
    data_cfg.rank = rank;
    if !cache {
        data_cfg.cache_dir = None;
    }
    let source = lora_data::resolve_dataset(&lora_data::DatasetInput {
        artifact_path: req.dataset.path.clone(),
        metadata: req.dataset.metadata.clone(),
        pvc_path: Some(req.pvc_path.clone()),
    })?;
    let mut preprocessor: Box<dyn Preprocessor> = match plugins {
        Some(set) => match set.load_preprocessor(tools.clone())? {
            Some(pre) => pre,
            None => lora_data::builtin_preprocessor(&data_cfg),
        },
        None => lora_data::builtin_preprocessor(&data_cfg),
    };
    let mut prepared = lora_data::prepare(&data_cfg, &source, preprocessor.as_mut(), &tools)?;
    if !cache {
        prepared.report.cache = "not used by a dry run (the run reads it, or writes it)".into();
    }
    Ok(RunData { source, prepared })
}

/// The adapter `training_lora_*` describe.
pub(crate) fn adapter_config(p: &ResolvedParams) -> AdapterConfig {
    AdapterConfig {
        r: p.lora_r as usize,
        lora_alpha: p.lora_alpha as f64,
        lora_dropout: p.lora_dropout,
        target_modules: p.lora_target_modules.clone(),
        use_rslora: p.use_rslora,
        use_dora: p.use_dora,
        init_seed: p.seed,
    }
}

/// How long a run is: optimizer steps per epoch, steps in all (`training_max_steps` may stop
/// it early) and the epochs those steps touch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunShape {
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub epochs_run: usize,
}

impl RunShape {
    pub(crate) fn of(p: &ResolvedParams, prepared: &PreparedData) -> Self {
        let steps_per_epoch = prepared.steps_per_epoch() as u64;
        let planned = steps_per_epoch * p.num_epochs;
        let total_steps = p.max_steps.map_or(planned, |m| m.min(planned));
        let epochs_run = total_steps.div_ceil(steps_per_epoch.max(1)) as usize;
        RunShape { steps_per_epoch, total_steps, epochs_run }
    }
}

/// The settings line of the chart: everything that shaped the run.
fn chart_settings(p: &ResolvedParams, targets: &[String], device: Device) -> Vec<(String, String)> {
    let variant = match (p.use_dora, p.use_rslora) {
        (true, true) => "DoRA + rsLoRA",
        (true, false) => "DoRA",
        (false, true) => "rsLoRA",
        (false, false) => "LoRA",
    };
    let quant = if p.load_in_4bit {
        format!(", 4-bit {}", p.bnb_4bit_quant_type.as_deref().unwrap_or("nf4"))
    } else if p.load_in_8bit {
        ", 8-bit".to_string()
    } else {
        String::new()
    };
    vec![
        ("lr".into(), format!("{} {}, warmup {}", crate::report::number(p.learning_rate), p.lr_scheduler, p.lr_warmup_steps)),
        (variant.into(), format!("r {}, alpha {}, dropout {}{quant}", p.lora_r, p.lora_alpha, crate::report::number(p.lora_dropout))),
        ("targets".into(), targets.join(", ")),
        ("data".into(), format!("{}{}", p.dataset_type, if p.train_on_inputs { ", trained on inputs" } else { "" })),
        ("batch".into(), p.effective_batch_size.to_string()),
        ("epochs".into(), p.num_epochs.to_string()),
        ("max_seq_len".into(), p.max_seq_len.to_string()),
        ("seed".into(), p.seed.to_string()),
        ("device".into(), device.to_string()),
    ]
}

/// What the scheduler is given: the run's shape and `training_lr_scheduler_kwargs` as settings
/// (strings as they are, other JSON values in their JSON spelling).
fn schedule_context(p: &ResolvedParams, total_steps: u64, steps_per_epoch: u64) -> ScheduleContext {
    ScheduleContext {
        base_lr: p.learning_rate,
        warmup_steps: p.lr_warmup_steps,
        total_steps,
        num_epochs: p.num_epochs,
        steps_per_epoch,
        settings: p
            .lr_scheduler_kwargs
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(String::from).unwrap_or_else(|| v.to_string())))
            .collect(),
    }
}

/// Builds the built-in schedule a run will use (unless a scheduler plugin is named, which judges
/// its own settings) before anything is loaded, so an unknown or bad
/// `training_lr_scheduler_kwargs` entry is a parameter problem (exit 2), not a failed run. The
/// settings do not depend on the run's length (only defaults do), so a placeholder length is used.
pub fn check_schedule(p: &ResolvedParams) -> Result<(), lora_params::ParamErrors> {
    if p.plugins.iter().any(|s| s.kind == "scheduler") {
        return Ok(());
    }
    let ctx = schedule_context(p, p.lr_warmup_steps + 1, 1);
    BuiltinScheduler::new(&p.lr_scheduler, &ctx).map(|_| ()).map_err(|e| {
        let param = match e {
            crate::schedule::ScheduleError::UnknownSchedule(_) => "training_lr_scheduler",
            _ => "training_lr_scheduler_kwargs",
        };
        let text = e.to_string();
        lora_params::ParamErrors(vec![lora_params::ParamError {
            param: param.into(),
            value: match p.params.get(param) {
                Some(Value::String(s)) => format!("{s:?}"),
                Some(v) => v.to_string(),
                None => String::new(),
            },
            source: p.sources.get(param).cloned().unwrap_or(lora_params::Source::Default),
            message: text.strip_prefix(&format!("{param}: ")).unwrap_or(&text).to_string(),
        }])
    })
}

fn data_config(p: &ResolvedParams, cache_dir: &Path) -> Result<DataConfig> {
    Ok(DataConfig {
        dataset_type: DatasetType::parse(&p.dataset_type)?,
        field_messages: p.field_messages.clone(),
        field_instruction: p.field_instruction.clone(),
        field_input: p.field_input.clone(),
        field_output: p.field_output.clone(),
        field_text: "text".into(),
        max_seq_len: p.max_seq_len as usize,
        max_tokens_per_gpu: p.max_tokens_per_gpu as usize,
        effective_batch_size: p.effective_batch_size as usize,
        sample_packing: p.sample_packing,
        train_on_inputs: p.train_on_inputs,
        bad_records: BadRecords::parse(&p.bad_records)?,
        validation_split: p.validation_split,
        long_sample_policy: LongSamplePolicy::parse(&p.long_sample_policy)?,
        seed: p.seed,
        world_size: p.world_size as usize,
        rank: 0,
        num_epochs: p.num_epochs as usize,
        cache_dir: Some(cache_dir.to_path_buf()),
    })
}

/// The folders this run writes into, with what it writes there: no plugin may be granted one of
/// them (or a folder containing one), or it could plant links there that lora's own writers
/// follow out of the workspace.
pub fn written_dirs(req: &RunRequest) -> Vec<(PathBuf, String)> {
    let ws = req.workspace();
    let parent = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let mut dirs = vec![
        (ws.checkpoints.clone(), "its checkpoints and training_metrics.jsonl".to_string()),
        (ws.data_output_dir.clone(), "the processed-data cache (training_data_output_dir)".to_string()),
        (ws.final_model.clone(), "the final_model copy".to_string()),
        (req.pvc_path.clone(), "the final_model copy's temp folder (pvc_path)".to_string()),
        (ws.dataset_train.clone(), "the workspace dataset".to_string()),
        (req.outputs.model.clone(), "output_model".to_string()),
        (parent(&req.outputs.model), "output_model's temp folder".to_string()),
        (parent(&req.outputs.metrics), "output_metrics".to_string()),
        (parent(&req.outputs.loss_chart), "output_loss_chart".to_string()),
    ];
    if req.kfp.is_some() {
        dirs.push((ws.hf_home, "the Hugging Face cache (HF_HOME)".to_string()));
    }
    for f in [&req.outputs.executor_output, &req.outputs.output_parameter].into_iter().flatten() {
        dirs.push((parent(f), "the KFP executor output".to_string()));
    }
    dirs
}

/// The plugins named by `training_plugins`, or `None` when there are none; a `grants.dir` where
/// this run writes is refused.
#[cfg(feature = "plugins")]
pub(crate) fn plugin_set(req: &RunRequest) -> Result<Option<plugins::PluginSet>> {
    let p = &req.params;
    if p.params.training_plugins.trim().is_empty() {
        return Ok(None);
    }
    let set = plugins::PluginSet::from_params(&p.params.training_plugins, &p.params.training_plugin_config, p.seed)
        .context("loading training_plugins")?;
    set.check_dir_grants(&written_dirs(req)).context("checking training_plugin_config")?;
    Ok((!set.is_empty()).then_some(set))
}

/// Loads and checks every plugin the run names, as the run will (see `PluginSet::check`), before
/// anything is trained: one line per plugin, for `--dry-run`'s plan. `env`: what the run will
/// set in its environment before loading them.
#[cfg(feature = "plugins")]
pub fn check_plugins(req: &RunRequest, env: &[(String, String)]) -> Result<Vec<String>> {
    match plugin_set(req)? {
        Some(set) => Ok(set.check(env).context("checking training_plugins")?),
        None => Ok(Vec::new()),
    }
}

#[cfg(not(feature = "plugins"))]
pub fn check_plugins(req: &RunRequest, _env: &[(String, String)]) -> Result<Vec<String>> {
    plugin_set(req).map(|_| Vec::new())
}

#[cfg(feature = "plugins")]
pub(crate) use lora_plugins as plugins;

/// Without the `plugins` feature: no plugin runtime, and a clear refusal when plugins are named.
#[cfg(not(feature = "plugins"))]
pub(crate) mod plugins {
    use std::sync::Arc;

    use lora_api::{Preprocessor, Reporter, ScheduleContext, Scheduler, TextTools};

    pub enum PluginSet {}

    impl PluginSet {
        pub fn load_preprocessor(&self, _: Arc<dyn TextTools>) -> anyhow::Result<Option<Box<dyn Preprocessor>>> {
            match *self {}
        }
        pub fn load_scheduler(&self, _: ScheduleContext) -> anyhow::Result<Option<Box<dyn Scheduler>>> {
            match *self {}
        }
        pub fn load_reporters(&self) -> anyhow::Result<Vec<Box<dyn Reporter>>> {
            match *self {}
        }
    }
}

#[cfg(not(feature = "plugins"))]
pub(crate) fn plugin_set(req: &RunRequest) -> Result<Option<plugins::PluginSet>> {
    if req.params.params.training_plugins.trim().is_empty() {
        return Ok(None);
    }
    bail!("training_plugins: this lora binary was built without plugin support (cargo feature `plugins`); rebuild with default features")
}

/// What one forward + backward of the largest micro-batch needs, and what the device has left:
/// the input of `training_gradient_checkpointing`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryPlan {
    pub tokens: usize,
    /// Estimated activation bytes keeping every layer's activations, and recomputing them.
    pub kept: u64,
    pub recomputed: u64,
    /// Free memory after loading the model (None: the backend cannot tell).
    pub available: Option<u64>,
}

/// Part of the free memory activations may take: the rest is for allocator slack, the data
/// pipeline's buffers and estimate error.
const ACTIVATION_SHARE: f64 = 0.85;

impl MemoryPlan {
    /// Whether to recompute, and the log lines (a warning when even the chosen plan does not fit).
    pub(crate) fn decide(&self, setting: &str) -> (bool, Vec<String>) {
        let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
        let budget = self.available.map(|a| (a as f64 * ACTIVATION_SHARE) as u64);
        let recompute = match (setting, budget) {
            ("true", _) => true,
            ("false", _) | (_, None) => false,
            (_, Some(b)) => self.kept > b,
        };
        let need = if recompute { self.recomputed } else { self.kept };
        let free = self.available.map_or("unknown free memory".to_string(), |a| format!("{} free", gib(a)));
        let mut lines = vec![format!(
            "lora: largest micro-batch {} tokens: activations ~{} kept, ~{} recomputed, {free}; gradient checkpointing {} (training_gradient_checkpointing={setting})",
            self.tokens,
            gib(self.kept),
            gib(self.recomputed),
            if recompute { "on" } else { "off" },
        )];
        if let Some(b) = budget
            && need > b
        {
            let per_token = (self.recomputed / self.tokens.max(1) as u64).max(1);
            let fits = b / per_token;
            let advice = if recompute {
                format!("lower training_max_tokens_per_gpu to about {fits}")
            } else {
                "set training_gradient_checkpointing=auto or true, or lower training_max_tokens_per_gpu".to_string()
            };
            lines.push(format!(
                "lora: warning: the activations (~{}) may not fit in {} of free memory: the run may run out of memory; {advice}",
                gib(need),
                gib(self.available.unwrap_or(0)),
            ));
        }
        (recompute, lines)
    }
}

fn log_data(prepared: &PreparedData) {
    let r = &prepared.report;
    let dropped: Vec<String> = r.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!(
        "lora: dataset {}: {} records → {} training samples ({} tokens, {} trained), {} validation samples{}{}",
        r.origin,
        r.records,
        r.train_samples,
        r.train_tokens,
        r.train_trained_tokens,
        r.validation_samples,
        if dropped.is_empty() { String::new() } else { format!("; left out: {}", dropped.join(", ")) },
        if r.from_cache { " (from the processed-data cache)" } else { "" }
    );
}

/// `training_device`: `cpu`, `cuda` (fails clearly without a usable GPU), `auto` (CUDA when a
/// usable device is present, else CPU).
pub(crate) fn pick_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            let gpu = Device::Cuda(crate::parallel::local_gpu()?);
            backend_for(gpu).context("training_device=cuda")?;
            Ok(gpu)
        }
        "auto" => match backend_for(Device::Cuda(crate::parallel::local_gpu()?)) {
            Ok(b) => Ok(b.device()),
            Err(e) => {
                eprintln!("lora: training_device=auto: using the CPU ({e})");
                Ok(Device::Cpu)
            }
        },
        other => bail!("training_device: unknown device `{other}` (expected auto, cpu or cuda)"),
    }
}

/// The engine's quantization request from `training_lora_load_in_4bit/8bit` and the
/// `bnb_4bit_*` settings; settings left unset stay `None`, so a bitsandbytes checkpoint's own
/// settings apply (and otherwise the engine's defaults, which are the parameters' defaults).
pub(crate) fn quant_config(p: &ResolvedParams) -> Option<QuantConfig> {
    if p.load_in_8bit {
        return Some(QuantConfig::EightBit);
    }
    if !p.load_in_4bit {
        return None;
    }
    let (quant_type, double_quant, compute_dtype) = p.bnb_4bit_explicit();
    Some(QuantConfig::FourBit {
        quant_type: p.bnb_4bit_quant_type.as_deref().and_then(QuantType::parse).filter(|_| quant_type),
        double_quant: p.bnb_4bit_use_double_quant.filter(|_| double_quant),
        compute_dtype: p.bnb_4bit_compute_dtype.as_deref().and_then(parse_torch_dtype).filter(|_| compute_dtype),
    })
}

/// What the merged model is folded into, for the log and the manifest.
fn merge_base(q: &QuantInfo) -> &'static str {
    match q.source {
        QuantSource::QuantizedAtLoad => "the adapter is folded into the original 16-bit weights (training used the quantized copy)",
        QuantSource::Checkpoint => "the base model is a bitsandbytes checkpoint without 16-bit weights: the adapter is folded into its dequantized weights",
    }
}

fn build_manifest(p: &ResolvedParams, model: &ResolvedModel, source: &lora_data::DatasetSource, device: Device, notes: Vec<String>, quant: Option<&QuantInfo>) -> Result<Manifest> {
    let model_files = manifest::hash_dir(&model.dir, manifest::is_model_file)?;
    let mut dataset_files = std::collections::BTreeMap::new();
    // Keyed by split, position and file name (not the full path: a KFP artifact's path changes
    // between attempts; the content decides).
    let splits = [("train", &source.train), ("validation", &source.validation)];
    for (split, files) in splits {
        for (i, f) in files.iter().enumerate() {
            let name = f.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            dataset_files.insert(format!("{split}[{i}] {name}"), manifest::sha256_file(&f.path)?);
        }
    }
    let mut plugins = std::collections::BTreeMap::new();
    for spec in &p.plugins {
        plugins.insert(format!("{}={}", spec.kind, spec.path.display()), manifest::sha256_file(&spec.path)?);
    }
    let mut params = p.params_as_used();
    // The hub id or folder is named in `model`; the content hashes decide.
    params.remove("training_base_model");
    // Written into the outputs and every checkpoint: secrets hidden (before the resume key is
    // taken, so a rotated token does not block a resume).
    crate::redact::params(&mut params);
    Ok(Manifest {
        format: Manifest::FORMAT.into(),
        binary: format!("lora {}", env!("CARGO_PKG_VERSION")),
        build: Some(env!("LORA_BUILD_COMMIT").to_string()),
        device: device.to_string(),
        model: Inputs { name: model.name.clone(), commit: model.commit.clone(), files: model_files },
        dataset: Inputs { name: source.origin.clone(), commit: None, files: dataset_files },
        plugins,
        params,
        notes,
        quantization: quant.map(|q| {
            let mut v = q.to_json();
            v["merge_base"] = json!(match q.source {
                QuantSource::QuantizedAtLoad => "original 16-bit weights",
                QuantSource::Checkpoint => "dequantized weights (the base is a bitsandbytes checkpoint)",
            });
            v
        }),
        trackers: Value::Null,
    })
}

/// Stages `output_model/` (merged model + `adapter/` + manifest) and its copy to
/// `<pvc_path>/final_model`.
fn stage_model_outputs(
    staging: &mut outputs::Staging,
    req: &RunRequest,
    model: &ResolvedModel,
    adapter: &[lora_engine::NamedTensor],
    adapter_cfg: &AdapterConfig,
    adapter_config_json: &Value,
    run_manifest: &Manifest,
) -> Result<PathBuf> {
    let t0 = Instant::now();
    let dest = &req.outputs.model;
    let built = staging.folder("output_model", dest)?;
    outputs::write_adapter(&built.join("adapter"), adapter, adapter_config_json)?;
    let float32 = req.params.merged_dtype == "float32";
    outputs::write_merged_weights(&model.dir, &built, adapter, adapter_cfg, float32)
        .with_context(|| format!("merging the adapter into {}", model.dir.display()))?;
    outputs::copy_model_files(&model.dir, &built, float32)?;
    std::fs::write(built.join("run_manifest.json"), serde_json::to_vec_pretty(run_manifest)?)
        .with_context(|| format!("writing {}", built.join("run_manifest.json").display()))?;
    let final_model = req.workspace().final_model;
    if final_model != *dest {
        let copy = staging.folder("<pvc_path>/final_model", &final_model)?;
        outputs::copy_tree(&built, &copy)?;
    }
    eprintln!(
        "lora: wrote the adapter ({}/adapter), the merged model ({}) and {} in {:.1}s",
        dest.display(),
        dest.display(),
        final_model.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(built)
}

/// Least share of the adapter's eval-loss gain the merged model must keep before the run warns.
const MERGED_GAIN_WARN: f64 = 0.95;

/// The merged model's eval loss, and what share of the adapter's gain it kept.
#[derive(Debug, Clone, Copy)]
struct MergedEval {
    eval_loss: f64,
    /// (before − merged) / (before − adapter), when training lowered the eval loss.
    kept_gain: Option<f64>,
}

/// Evaluates the merged weights as written (`dir`, in their stored dtype) on the eval split, as
/// the adapter was evaluated: merging into 16-bit weights rounds away part of a small adapter's
/// update, and a person deploying the merged model should know how much. `None` without an eval
/// split. Warns when the merged model keeps less than [`MERGED_GAIN_WARN`] of the gain.
fn merged_eval(dir: &Path, prepared: &PreparedData, device: Device, adapter_cfg: &AdapterConfig, history: &report::History) -> Result<Option<MergedEval>> {
    let batches = prepared.eval_batches();
    if batches.is_empty() {
        return Ok(None);
    }
    let t0 = Instant::now();
    let model = Model::load(dir, &LoadOptions { backend: backend_for(device)?, quant: None })
        .with_context(|| format!("loading the merged model from {} to evaluate it", dir.display()))?;
    // A fresh adapter adds nothing (LoRA's B starts at zero): this is the merged model's loss.
    let trainer = Trainer::new(model, AdapterConfig { lora_dropout: 0.0, ..adapter_cfg.clone() }, OptimConfig::default(), 0)?;
    let (mut loss, mut tokens) = (0.0f64, 0usize);
    for mb in &batches {
        let (l, n) = trainer.eval_loss(&train::to_batch(mb)).context("evaluating the merged model on the validation split")?;
        loss += l;
        tokens += n;
    }
    if tokens == 0 {
        return Ok(None);
    }
    let eval_loss = loss / tokens as f64;
    let before = history.evals.first().filter(|e| e.step == 0).map(|e| e.eval_loss);
    let after = history.evals.last().filter(|e| e.step > 0).map(|e| e.eval_loss);
    let kept_gain = match (before, after) {
        (Some(b), Some(a)) if b - a > 1e-9 => Some((b - eval_loss) / (b - a)),
        _ => None,
    };
    eprintln!(
        "lora: merged model eval_loss {eval_loss:.4} (adapter {}, before training {}){} in {:.1}s",
        after.map_or("–".into(), |a| format!("{a:.4}")),
        before.map_or("–".into(), |b| format!("{b:.4}")),
        kept_gain.map_or(String::new(), |k| format!(": keeps {:.0}% of the adapter's gain", k * 100.0)),
        t0.elapsed().as_secs_f64()
    );
    if let Some(k) = kept_gain.filter(|k| *k < MERGED_GAIN_WARN) {
        eprintln!(
            "lora: warning: the merged model keeps only {:.0}% of the adapter's eval-loss gain (rounding the merged weights to their stored dtype loses the rest); output_model/adapter has all of it: serve the base model with the adapter, or set training_merged_dtype=float32 (`--training-merged-dtype float32`)",
            k * 100.0
        );
    }
    Ok(Some(MergedEval { eval_loss, kept_gain }))
}

/// Checkpoint folder of the pvc (exposed for tests and `--dry-run`).
pub fn checkpoints_dir(req: &RunRequest) -> PathBuf {
    req.workspace().checkpoints
}

pub use checkpoint::list as list_checkpoints;

#[cfg(test)]
mod tests {
    use super::MemoryPlan;

    const GIB: u64 = 1 << 30;

    fn plan(kept: u64, recomputed: u64, available: Option<u64>) -> MemoryPlan {
        MemoryPlan { tokens: 32_000, kept, recomputed, available }
    }

    #[test]
    fn auto_recomputes_only_when_the_activations_would_not_fit() {
        let (on, lines) = plan(10 * GIB, 2 * GIB, Some(40 * GIB)).decide("auto");
        assert!(!on && lines.len() == 1 && lines[0].contains("gradient checkpointing off"), "{lines:?}");
        let (on, lines) = plan(60 * GIB, 8 * GIB, Some(40 * GIB)).decide("auto");
        assert!(on && lines.len() == 1 && lines[0].contains("~60.00 GiB kept, ~8.00 GiB recomputed, 40.00 GiB free"), "{lines:?}");
        // Unknown free memory: keep activations (as before planning existed).
        assert!(!plan(60 * GIB, 8 * GIB, None).decide("auto").0);
    }

    #[test]
    fn a_plan_that_cannot_fit_warns_with_a_token_budget_that_would() {
        // 8 GiB recomputed for 32000 tokens = 268435 bytes/token; 0.85 * 4 GiB fits 13600 tokens.
        let (on, lines) = plan(60 * GIB, 8 * GIB, Some(4 * GIB)).decide("auto");
        assert!(on);
        assert!(lines[1].contains("warning") && lines[1].contains("training_max_tokens_per_gpu to about 13600"), "{lines:?}");
        let (on, lines) = plan(60 * GIB, 8 * GIB, Some(40 * GIB)).decide("false");
        assert!(!on && lines[1].contains("set training_gradient_checkpointing=auto or true"), "{lines:?}");
        let (on, lines) = plan(1, 1, Some(40 * GIB)).decide("true");
        assert!(on && lines.len() == 1);
    }
}
