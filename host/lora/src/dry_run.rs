//! What a run would do, without doing it: `--dry-run` prints this plan; the real run applies
//! the same environment and workspace layout.

use std::path::PathBuf;

use lora_engine::quant::{QuantPlan, QuantSource, bnb};
use serde_json::{Map, Value, json};

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
    let ws = req.workspace();
    vec![ws.dataset_train, ws.checkpoints]
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
            "kubernetes_config": req.kubernetes_config,
        },
    }))
}
