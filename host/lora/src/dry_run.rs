//! What a run would do, without doing it: `--dry-run` prints this plan; the real run applies
//! the same environment and workspace layout.

use std::path::PathBuf;

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

/// The workspace folders a run creates.
pub fn workspace_dirs(req: &RunRequest) -> Vec<PathBuf> {
    let ws = req.workspace();
    vec![ws.dataset_train, ws.checkpoints, ws.final_model]
}

/// The base model as a run will look for it: an existing folder, an `oci://` image, or a hub id.
/// Something that can only be a path (absolute, `./`, `../`, `~`) must exist.
fn base_model(req: &RunRequest) -> anyhow::Result<Value> {
    let m = &req.params.base_model;
    let p = PathBuf::from(m);
    Ok(if p.is_dir() {
        json!({ "kind": "local", "path": p, "has_config_json": p.join("config.json").is_file() })
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
    let base_model = base_model(req)?;
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
