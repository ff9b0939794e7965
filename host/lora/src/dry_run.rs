//! What a run would do, without doing it: `--dry-run` prints this plan; the real run applies
//! the same environment and workspace layout.

use std::path::PathBuf;

use lora_engine::ModelConfig;
use lora_engine::quant::{QuantPlan, QuantSource, bnb};
use serde_json::{Map, Value, json};

use crate::report::{number, plural};
use crate::request::RunRequest;

/// Environment variables the run sets before anything reads them: under KFP `HF_HOME` defaults
/// to `<pvc_path>/.cache/huggingface` (as in the reference) unless the pod already sets it;
/// `training_envs` override both.
pub fn process_env(req: &RunRequest, env: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if req.kfp.is_some() && !env.iter().any(|(k, _)| k == "HF_HOME") {
        out.push((
            "HF_HOME".into(),
            req.workspace().hf_home.display().to_string(),
        ));
    }
    for (k, v) in &req.params.envs {
        out.retain(|(ok, _)| ok != k);
        out.push((k.clone(), v.clone()));
    }
    out
}

/// The workspace folders a run creates before it starts (`final_model` only appears, whole, when
/// the outputs are published).
pub fn workspace_dirs(req: &RunRequest) -> Vec<PathBuf> {
    // `<pvc_path>/dataset/train` is read when a step before put data there; never made empty.
    vec![req.workspace().checkpoints]
}

/// The base model as a run will look for it: an existing folder, an `oci://` image, or a hub id.
/// Something that can only be a path (absolute, `./`, `../`, `~`) must exist.
fn base_model(req: &RunRequest) -> anyhow::Result<Value> {
    let m = &req.params.base_model;
    let p = PathBuf::from(m);
    Ok(if p.is_dir() {
        let warnings = if p.join("config.json").is_file() { crate::request::check_model_dir(&p, &req.params)? } else { Vec::new() };
        json!({ "kind": "local", "path": p, "has_config_json": p.join("config.json").is_file(), "warnings": warnings })
    } else if m.starts_with("oci://") {
        json!({ "kind": "oci", "image": m })
    } else if m.starts_with(['/', '.', '~']) || m.matches('/').count() > 1 {
        anyhow::bail!(
            "training_base_model = {m:?}: no such model folder (a Hugging Face id looks like org/name)"
        )
    } else {
        json!({ "kind": "hub", "id": m })
    })
}

/// What quantization the run would do (`null` without 4-bit or 8-bit): the resolved settings,
/// whether the base's projections are quantized at load or read from a bitsandbytes checkpoint
/// (a local folder is checked as loading will check it), and what the merged model is folded
/// into.
fn quantization(req: &RunRequest) -> anyhow::Result<Value> {
    let p = &req.params;
    if !p.load_in_4bit && !p.load_in_8bit {
        return Ok(Value::Null);
    }
    let mut v = json!({
        "bits": if p.load_in_4bit { 4 } else { 8 },
        "quant_type": p.bnb_4bit_quant_type,
        "double_quant": p.bnb_4bit_use_double_quant,
        "compute_dtype": p.bnb_4bit_compute_dtype,
    });
    let dir = PathBuf::from(&p.base_model);
    let source = if dir.join("config.json").is_file() {
        let ckpt = bnb::read_config(&dir)?;
        let plan = QuantPlan::resolve(crate::run::quant_config(p), ckpt.as_ref(), &dir, lora_engine::DType::F32)
            .map_err(|e| anyhow::anyhow!(e).context("training_base_model and the quantization settings"))?;
        if let (Some(plan), true) = (plan, ckpt.is_some()) {
            // A checkpoint's stored settings replace unset ones.
            if let Some((t, dq, _)) = plan.four {
                v["quant_type"] = json!(t.name());
                v["double_quant"] = json!(dq);
                v["compute_dtype"] = json!(plan.compute.torch_name());
            }
        }
        plan.map(|p| p.source)
    } else {
        None
    };
    let (base, merged) = match source {
        Some(QuantSource::Checkpoint) => (
            "a bitsandbytes checkpoint: its quantized projections are read as stored",
            "folded into the checkpoint's dequantized weights (it has no 16-bit weights)",
        ),
        Some(QuantSource::QuantizedAtLoad) => ("16-bit weights: every decoder projection is quantized at load", "folded into the original 16-bit weights"),
        None => (
            "known once the model is downloaded: 16-bit weights are quantized at load, a bitsandbytes checkpoint is read as stored",
            "folded into the original 16-bit weights (or a bitsandbytes checkpoint's dequantized weights)",
        ),
    };
    v["base_model"] = json!(base);
    v["merged_model"] = json!(merged);
    if p.load_in_8bit {
        v["activations"] = json!("not quantized: weight-only int8 (bitsandbytes' LLM.int8 also quantizes activations)");
    }
    Ok(v)
}

/// Environment values whose names look secret are not printed ([`crate::redact`]).
fn shown(k: &str, v: String) -> Value {
    Value::String(crate::redact::shown(k, &v))
}

/// The plan printed by `--dry-run`: every parameter (value and source; secrets hidden), the
/// notes resolution made, the inputs and outputs, the workspace and the environment. Fails when
/// an input cannot be resolved (a missing dataset file) or a plugin named cannot be loaded and
/// configured as the run would (a garbage `.wasm`, a grant where lora writes, settings its
/// `configure` refuses). A real run makes this plan first, so it fails as early.
pub fn plan(req: &RunRequest, command: &str, env: &[(String, String)]) -> anyhow::Result<Value> {
    let dataset = req.dataset_source()?;
    let trackers = crate::trackers::TrackerSettings::for_request(req, env)?;
    let base_model = base_model(req)?;
    crate::run::outputs::check_paths(req)?;
    let quantization = quantization(req)?;
    let envs: Map<String, Value> = process_env(req, env)
        .into_iter()
        .map(|(k, v)| {
            let v = shown(&k, v);
            (k, v)
        })
        .collect();
    let mut parameters = req.params.to_json();
    for (name, entry) in parameters.iter_mut() {
        if let Some(value) = entry.get_mut("value") {
            crate::redact::param(name, value);
        }
    }
    // Loaded and checked as the run will load them: a plugin that cannot run fails the dry run.
    let plugins = crate::run::check_plugins(req, &process_env(req, env))?;
    let labels: Map<String, Value> = req
        .params
        .metadata_labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let annotations: Map<String, Value> = req
        .params
        .metadata_annotations
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Ok(json!({
        "command": command,
        "dry_run": true,
        "version": env!("CARGO_PKG_VERSION"),
        "parameters": parameters,
        "notes": req.params.notes,
        "quantization": quantization,
        "inputs": {
            "dataset": dataset,
            "dataset_artifact_path": req.dataset.path,
            "dataset_metadata": req.dataset.metadata,
            "base_model": base_model,
            "pvc_path": req.pvc_path,
            "plugins": req.params.plugins,
            "plugins_checked": plugins,
        },
        "outputs": {
            "checkpoints": req.workspace().checkpoints,
            "training_metrics": req.workspace().checkpoints.join("training_metrics.jsonl"),
            "final_model": req.workspace().final_model,
            "run_manifest": req.outputs.model.join("run_manifest.json"),
            "model": req.outputs.model,
            "adapter": req.outputs.model.join("adapter"),
            "metrics": req.outputs.metrics,
            "loss_chart": req.outputs.loss_chart,
            "executor_output": req.outputs.executor_output,
            "output_parameter": req.outputs.output_parameter,
        },
        "workspace": req.workspace(),
        "trackers": trackers.describe(),
        "environment": envs,
        "pod": {
            "cpu_per_worker": req.params.resource_cpu_per_worker,
            "gpu_per_worker": req.params.resource_gpu_per_worker,
            "memory_per_worker_bytes": req.params.resource_memory_per_worker_bytes,
            "num_workers": req.params.resource_num_workers,
            "labels": labels,
            "annotations": annotations,
            "kubernetes_config": req.kubernetes_config.clone().map(|mut v| {
                crate::redact::kubernetes(&mut v);
                v
            }),
        },
    }))
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// What `--dry-run` reads beyond the parameters and paths ([`plan`]): the base model as the run
/// resolves it (a folder, the hub cache or the hub, an OCI cache; weights are not downloaded),
/// then the whole dataset through the run's own code ([`crate::run::read_data`]: the same
/// tokenizer, preprocessor or plugin, length policy, validation split and packing), and the
/// training the run would do: optimizer steps, warmup, the memory plan. Fails with the run's own
/// error on a model or a record the run would fail on. Returns the JSON sections and the lines
/// the text form prints.
pub fn data_plan(req: &RunRequest) -> anyhow::Result<(Map<String, Value>, Vec<String>)> {
    let p = &req.params;
    let mut out = Map::new();
    let mut lines = Vec::new();
    let opts = crate::hub::HubOptions { progress: false, ..crate::hub::HubOptions::from_env() };
    let Some((model, weights)) = crate::hub::resolve_model_for_plan(&p.base_model, &opts)? else {
        let why = format!("{} is not in the OCI cache: the run pulls it; the dataset needs its tokenizer, so it is not read here", p.base_model);
        lines.push(format!("model: {why}"));
        out.insert("model".into(), json!({ "name": p.base_model, "resolved": false, "why": why }));
        return Ok((out, lines));
    };
    let notes = crate::request::check_model_files(&model.dir, p, weights)?;
    lines.push(format!(
        "model: {} ({}{})",
        model.name,
        model.dir.display(),
        if weights { "" } else { "; config and tokenizer fetched, the run downloads the weights" }
    ));
    for n in &notes {
        lines.push(format!("warning: {n}"));
    }
    out.insert(
        "model".into(),
        json!({ "name": model.name, "dir": model.dir, "commit": model.commit, "weights_present": weights, "warnings": notes }),
    );

    let plugins = crate::run::plugin_set(req)?;
    let data = crate::run::read_data(req, &model.dir, plugins.as_ref(), false)?;
    let prepared = &data.prepared;
    let summary = prepared.summary();
    lines.extend(summary.to_string().lines().map(String::from));
    let shape = crate::run::RunShape::of(p, prepared);
    let warmup = p.lr_warmup_steps.min(shape.total_steps);
    lines.push(format!(
        "training: {} of {} = {}{} (learning rate {}, {} warmup {})",
        plural(shape.epochs_run as u64, "epoch", "epochs"),
        plural(shape.steps_per_epoch, "optimizer step", "optimizer steps"),
        plural(shape.total_steps, "step", "steps"),
        if p.max_steps.is_some_and(|m| m < shape.steps_per_epoch * p.num_epochs) { " (training_max_steps)" } else { "" },
        number(p.learning_rate),
        p.lr_scheduler,
        plural(p.lr_warmup_steps, "step", "steps"),
    ));
    if shape.total_steps <= p.lr_warmup_steps && p.learning_rate > 0.0 {
        lines.push(format!(
            "warning: all {} steps are warmup steps (training_lr_warmup_steps = {}): the learning rate never reaches {}; lower training_effective_batch_size or training_lr_warmup_steps, or raise training_num_epochs",
            shape.total_steps,
            p.lr_warmup_steps,
            number(p.learning_rate)
        ));
    }

    // The memory plan, from the config (the run makes it again once the weights are loaded).
    let cfg = ModelConfig::from_model_dir(&model.dir)?;
    let adapter = crate::run::adapter_config(p);
    let (mut targets, expert_params) = adapter.target_names(&cfg)?;
    targets.extend(expert_params);
    let switches = cfg.switches();
    lines.push(format!(
        "architecture: {} ({}), {} layers; switches: {}; LoRA on {}",
        cfg.arch.model_type(),
        cfg.arch.hf_name(),
        cfg.num_hidden_layers,
        if switches.is_empty() { "none".to_string() } else { switches.join(", ") },
        targets.join(", ")
    ));
    out.insert(
        "architecture".into(),
        json!({ "family": cfg.arch.model_type(), "architecture": cfg.arch.hf_name(), "layers": cfg.num_hidden_layers, "switches": switches, "lora_targets": targets }),
    );
    let device = crate::run::pick_device(&p.device)?;
    let backend = lora_engine::backend_for(device)?;
    let dtype = backend.activation_dtype();
    let tokens = prepared.largest_micro_batch_tokens(shape.epochs_run);
    // From the config: the weights need not be downloaded yet.
    let params = lora_engine::model::parameter_count(&cfg) as u64;
    let weight_bytes = if p.load_in_4bit || p.load_in_8bit {
        None
    } else {
        Some(params * backend.base_weight_dtype(lora_engine::DType::BF16).size() as u64)
    };
    let free_now = backend.available_memory_bytes();
    let memory = crate::run::MemoryPlan {
        tokens,
        kept: lora_engine::trainer::activation_bytes(&cfg, &adapter, tokens, false, dtype),
        recomputed: lora_engine::trainer::activation_bytes(&cfg, &adapter, tokens, true, dtype),
        available: free_now.map(|f| f.saturating_sub(weight_bytes.unwrap_or(0))),
    };
    let (recompute, memory_lines) = memory.decide(&p.gradient_checkpointing);
    lines.push(format!(
        "memory on {device}: base model {} parameters{}",
        params,
        weight_bytes.map(|b| format!(", ~{} as held", gib(b))).unwrap_or_else(|| " (quantized: see `quantization`)".into()),
    ));
    lines.extend(memory_lines.iter().map(|l| l.trim_start_matches("lora: ").to_string()));
    out.insert("data".into(), serde_json::to_value(&summary)?);
    out.insert(
        "training".into(),
        json!({
            "epochs": shape.epochs_run,
            "steps_per_epoch": shape.steps_per_epoch,
            "total_steps": shape.total_steps,
            "warmup_steps": warmup,
            "steps_after_warmup": shape.total_steps - warmup,
            "records": summary.report.records,
            "train_samples": summary.report.train_samples,
            "validation_samples": summary.report.validation_samples,
            "tokens_per_epoch": summary.epochs.first().map(|e| e.tokens),
            "trained_tokens_per_epoch": summary.epochs.first().map(|e| e.trained_tokens),
            "micro_batches_per_epoch": summary.epochs.first().map(|e| e.micro_batches),
        }),
    );
    out.insert(
        "memory".into(),
        json!({
            "device": device.to_string(),
            "base_parameters": params,
            "base_weight_bytes": weight_bytes,
            "largest_micro_batch_tokens": tokens,
            "activation_bytes_kept": memory.kept,
            "activation_bytes_recomputed": memory.recomputed,
            "free_bytes_after_weights": memory.available,
            "gradient_checkpointing": recompute,
            "lines": memory_lines,
        }),
    );
    Ok((out, lines))
}

/// Every path the run writes, for the text form (all checked writable by [`plan`]).
pub fn output_lines(req: &RunRequest) -> Vec<String> {
    let ws = req.workspace();
    let mut lines = vec![
        format!("  merged model     {}", req.outputs.model.display()),
        format!("  adapter          {}", req.outputs.model.join("adapter").display()),
        format!("  run manifest     {}", req.outputs.model.join("run_manifest.json").display()),
        format!("  metrics          {}", req.outputs.metrics.display()),
        format!("  loss chart       {}", req.outputs.loss_chart.display()),
        format!("  checkpoints      {}", ws.checkpoints.display()),
        format!("  metrics log      {}", ws.checkpoints.join("training_metrics.jsonl").display()),
        format!("  final_model copy {}", ws.final_model.display()),
    ];
    for (what, f) in [("executor output", &req.outputs.executor_output), ("output parameter", &req.outputs.output_parameter)] {
        if let Some(f) = f {
            lines.push(format!("  {what:<16} {}", f.display()));
        }
    }
    lines
}
