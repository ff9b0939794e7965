//! The Kubeflow Trainer TrainJob (`trainer.kubeflow.org/v1alpha1`) that `lora kfp` creates when
//! a run needs more than one pod (`training_resource_num_workers` > 1) or more than one GPU in
//! its pod: the workers are `lora train` processes that join from the `PET_*` variables of the
//! torch runtime ([`crate::rendezvous`]), reading the parameters and writing their outputs on
//! the shared workspace PVC.
//!
//! The fields follow the TrainJob types of kubeflow/trainer v2.3 (`pkg/apis/trainer/v1alpha1/
//! trainjob_types.go`, notes in shared/research/scale-out.md): `spec.runtimeRef`,
//! `spec.trainer{image, command, args, env, numNodes, numProcPerNode, resourcesPerNode}` and one
//! `spec.runtimePatches` entry that patches the pod template of the runtime's `node` job (labels,
//! annotations, volumes, the `node` container's volume mounts, node selector, tolerations,
//! affinity). The Trainer allows no env patch of the `node` container: every variable goes in
//! `trainer.env`. `numProcPerNode` is always an integer here, never the runtime's `auto` (which
//! torchrun would resolve to the GPU count, on the node, after the pod is placed).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

/// API group and version of the TrainJob.
pub const API_VERSION: &str = "trainer.kubeflow.org/v1alpha1";
/// The stock runtime of Kubeflow Trainer that sets the `PET_*` variables our workers join from.
pub const DEFAULT_RUNTIME: &str = "torch-distributed";
/// Overrides [`DEFAULT_RUNTIME`] (a ClusterTrainingRuntime name).
pub const RUNTIME_ENV: &str = "LORA_TRAINJOB_RUNTIME";
/// The replicated job and container of the torch runtime that run the trainer.
pub const NODE: &str = "node";
/// `spec.runtimePatches[].manager` of our patch.
pub const MANAGER: &str = "lora";
/// The GPU resource name of the NVIDIA device plugin.
pub const GPU: &str = "nvidia.com/gpu";

/// Variables the torch runtime sets in the trainer container; the workers' rendezvous depends
/// on them, so nobody else may set them.
const RUNTIME_VARS: [&str; 5] = ["PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"];

/// What the TrainJob is, besides the parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// `metadata.name`: an RFC 1035 label of at most 63 characters (the CRD's rule).
    pub name: String,
    pub namespace: String,
    /// The workers' image (ours).
    pub image: String,
    /// `spec.runtimeRef.name`.
    pub runtime: String,
    /// The workspace PVC as mounted in every pod (the KFP `pvc_path`).
    pub pvc_path: PathBuf,
    /// The training data, on the workspace (KFP's input artifact is only in the launcher's pod).
    pub dataset: Option<PathBuf>,
}

impl Launch {
    /// The folder of this TrainJob on the workspace: the workers' parameters and outputs.
    pub fn job_dir(&self) -> PathBuf {
        self.pvc_path.join(".lora-trainjob").join(&self.name)
    }
    pub fn params_file(&self) -> PathBuf {
        self.job_dir().join("params.json")
    }
    pub fn output_model(&self) -> PathBuf {
        self.job_dir().join("output_model")
    }
    pub fn output_metrics(&self) -> PathBuf {
        self.job_dir().join("output_metrics.json")
    }
    pub fn output_loss_chart(&self) -> PathBuf {
        self.job_dir().join("output_loss_chart.html")
    }
}

/// The runtime name: `LORA_TRAINJOB_RUNTIME` from `env` if set, else `torch-distributed`.
pub fn runtime_name(env: &[(String, String)]) -> Result<String> {
    match env.iter().rev().find(|(k, _)| k == RUNTIME_ENV) {
        None => Ok(DEFAULT_RUNTIME.to_owned()),
        Some((_, v)) if !v.trim().is_empty() && v.trim().len() <= 253 => Ok(v.trim().to_owned()),
        Some((_, v)) => bail!("{RUNTIME_ENV}={v:?}: must name a ClusterTrainingRuntime (1 to 253 characters)"),
    }
}

/// Whether a run with these parameters needs a TrainJob: more than one pod. (Several GPUs in
/// one pod are trained by `mpirun` in that pod, the `mpi` cargo feature: [`crate::parallel`].)
pub fn needed(p: &lora_params::Params) -> bool {
    p.training_resource_num_workers > 1
}

fn check_name(name: &str) -> Result<()> {
    let ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!("TrainJob name {name:?}: must be an RFC 1035 label (a-z, 0-9 and '-', starting with a letter, not ending with '-') of at most 63 characters");
    }
    Ok(())
}

/// Processes per node: the number given, or with `auto` one per GPU of the pod. A process count
/// the pod's GPUs cannot hold (one GPU each) is refused, and so, for now, is more than one.
fn procs_per_node(p: &lora_params::Params) -> Result<u64> {
    let gpus = p.training_resource_gpu_per_worker.max(0) as u64;
    let raw = p.training_resource_num_procs_per_worker.trim();
    let n = if raw == "auto" {
        gpus
    } else {
        raw.parse::<u64>()
            .ok()
            .filter(|n| *n >= 1)
            .with_context(|| format!("training_resource_num_procs_per_worker={raw:?}: must be auto or an integer >= 1"))?
    };
    if gpus == 0 {
        bail!(
            "training_resource_gpu_per_worker=0: the processes of a TrainJob train on GPUs over NCCL (one GPU each); request at least 1 GPU per worker, or train on the CPU in one pod (training_resource_num_workers=1)"
        );
    }
    if n > gpus {
        bail!("training_resource_num_procs_per_worker={n}: each process trains on its own GPU, and training_resource_gpu_per_worker={gpus} gives only {gpus} per worker");
    }
    if n > 1 {
        // `lora train` under PET_NPROC_PER_NODE > 1 wants LOCAL_RANK from a torchrun-like
        // parent (crate::rendezvous), which the image does not have.
        bail!(
            "training_resource_num_procs_per_worker={raw} (here {n} processes per pod): a TrainJob worker of lora runs one process per pod for now (it does not start one process per GPU like torchrun); use training_resource_num_procs_per_worker=1 and training_resource_gpu_per_worker=1, with more workers"
        );
    }
    Ok(n)
}

/// The TaskConfig fields we pass on to the TrainJob's pods, by their names in `kubernetes_config`.
#[derive(Default)]
struct TaskConfig {
    affinity: Option<Value>,
    tolerations: Option<Value>,
    node_selector: Option<Value>,
    env: Vec<Value>,
    volumes: Vec<Value>,
    volume_mounts: Vec<Value>,
    resources: Option<Map<String, Value>>,
}

fn task_config(cfg: Option<&Map<String, Value>>) -> Result<TaskConfig> {
    let mut t = TaskConfig::default();
    let Some(cfg) = cfg else { return Ok(t) };
    let list = |k: &str, v: &Value| -> Result<Vec<Value>> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Array(items) if items.iter().all(Value::is_object) => Ok(items.clone()),
            _ => bail!("kubernetes_config.{k}: must be a list of objects (Kubernetes {k} entries)"),
        }
    };
    let object = |k: &str, v: &Value| -> Result<Option<Value>> {
        match v {
            Value::Null => Ok(None),
            Value::Object(_) => Ok(Some(v.clone())),
            _ => bail!("kubernetes_config.{k}: must be an object"),
        }
    };
    for (k, v) in cfg {
        match k.as_str() {
            "affinity" => t.affinity = object(k, v)?,
            "tolerations" => t.tolerations = (!v.is_null()).then(|| list(k, v).map(Value::Array)).transpose()?,
            "node_selector" | "nodeSelector" => {
                t.node_selector = object(k, v)?;
                if let Some(Value::Object(m)) = &t.node_selector
                    && let Some((key, _)) = m.iter().find(|(_, v)| !v.is_string())
                {
                    bail!("kubernetes_config.{k}.{key}: a node selector value must be a string");
                }
            }
            "env" => t.env = list(k, v)?,
            "volumes" => t.volumes = list(k, v)?,
            "volume_mounts" | "volumeMounts" => t.volume_mounts = list(k, v)?,
            "resources" => t.resources = object(k, v)?.and_then(|v| v.as_object().cloned()),
            other => bail!(
                "kubernetes_config.{other}: not a TaskConfig field the TrainJob can take (known: affinity, tolerations, node_selector, env, volumes, volume_mounts, resources)"
            ),
        }
    }
    for (what, items) in [("env", &t.env), ("volumes", &t.volumes), ("volume_mounts", &t.volume_mounts)] {
        for (i, item) in items.iter().enumerate() {
            if !item.get("name").is_some_and(Value::is_string) {
                bail!("kubernetes_config.{what}[{i}]: has no string `name`");
            }
        }
    }
    Ok(t)
}

/// `trainer.env`: `training_envs`, then `kubernetes_config.env`, each name once; the torch
/// runtime's own variables are refused.
fn trainer_env(p: &lora_params::Params, t: &TaskConfig) -> Result<Vec<Value>> {
    let mut env: Vec<(String, &'static str, Value)> = Vec::new();
    for item in p.training_envs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("training_envs: {item:?} is not KEY=VALUE"))?;
        env.push((k.trim().to_owned(), "training_envs", json!({ "name": k.trim(), "value": v.trim() })));
    }
    for e in &t.env {
        let name = e["name"].as_str().unwrap_or_default().to_owned();
        env.push((name, "kubernetes_config.env", e.clone()));
    }
    for (i, (name, from, _)) in env.iter().enumerate() {
        if RUNTIME_VARS.contains(&name.as_str()) {
            bail!("{from}: {name} is set by the TrainJob's torch runtime (the workers join from it); remove it");
        }
        if let Some((_, first, _)) = env[..i].iter().find(|(n, _, _)| n == name) {
            bail!("{from}: {name} is already set by {first}; set it once");
        }
    }
    if env.len() > 128 {
        bail!("training_envs and kubernetes_config.env: {} variables, a TrainJob takes at most 128", env.len());
    }
    Ok(env.into_iter().map(|(_, _, v)| v).collect())
}

/// `trainer.resourcesPerNode`: `kubernetes_config.resources` with cpu and memory requests and
/// the GPUs (request and limit) from the `training_resource_*` parameters; a different value for
/// the same resource in both is refused.
fn resources(p: &lora_params::Params, t: &TaskConfig) -> Result<Value> {
    let mut out = t.resources.clone().unwrap_or_default();
    for k in out.keys() {
        if !["limits", "requests", "claims"].contains(&k.as_str()) {
            bail!("kubernetes_config.resources.{k}: not a field of Kubernetes ResourceRequirements (limits, requests, claims)");
        }
    }
    let gpus = p.training_resource_gpu_per_worker.max(0);
    let mut set = |section: &str, key: &str, value: Value, param: &str| -> Result<()> {
        let entry = out.entry(section.to_owned()).or_insert_with(|| json!({}));
        let Some(map) = entry.as_object_mut() else {
            bail!("kubernetes_config.resources.{section}: must be an object of quantities");
        };
        if let Some(given) = map.get(key)
            && quantity_text(given) != quantity_text(&value)
        {
            bail!("kubernetes_config.resources.{section}.{key}={given} disagrees with {param}={value}; set it in one place");
        }
        map.insert(key.to_owned(), value);
        Ok(())
    };
    set("requests", "cpu", json!(p.training_resource_cpu_per_worker.trim()), "training_resource_cpu_per_worker")?;
    set("requests", "memory", json!(p.training_resource_memory_per_worker.trim()), "training_resource_memory_per_worker")?;
    if gpus > 0 {
        // Extended resources: the request must equal the limit.
        set("requests", GPU, json!(gpus), "training_resource_gpu_per_worker")?;
        set("limits", GPU, json!(gpus), "training_resource_gpu_per_worker")?;
    }
    out.retain(|_, v| !v.as_object().is_some_and(Map::is_empty));
    Ok(Value::Object(out))
}

fn quantity_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim().to_owned(),
        other => other.to_string(),
    }
}

/// `(key, value)` pairs of a `key=value,key=value` parameter.
fn kv_map(param: &str, raw: &str) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').with_context(|| format!("{param}: {item:?} is not key=value"))?;
        out.insert(k.trim().to_owned(), Value::String(v.trim().to_owned()));
    }
    Ok(out)
}

/// Whether `path` lies on one of the volume mounts.
fn mounted(path: &Path, mounts: &[Value]) -> bool {
    mounts.iter().filter_map(|m| m.get("mountPath").and_then(Value::as_str)).any(|m| path.starts_with(m))
}

/// The worker command line: `lora train` with the parameters, data and outputs on the workspace.
pub fn worker_args(l: &Launch) -> Vec<String> {
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let mut args = vec![
        "--params".to_owned(),
        s(l.params_file()),
        "--pvc-path".to_owned(),
        s(l.pvc_path.clone()),
        "--output-model".to_owned(),
        s(l.output_model()),
        "--output-metrics".to_owned(),
        s(l.output_metrics()),
        "--output-loss-chart".to_owned(),
        s(l.output_loss_chart()),
    ];
    if let Some(d) = &l.dataset {
        args.extend(["--dataset".to_owned(), s(d.clone())]);
    }
    args
}

/// The TrainJob for the run with parameters `p`, as the API server is to receive it.
pub fn manifest(p: &lora_params::Params, l: &Launch) -> Result<Value> {
    check_name(&l.name)?;
    if l.namespace.trim().is_empty() {
        bail!("the TrainJob needs a namespace");
    }
    if l.image.len() > 500 {
        bail!("TrainJob image {:?}: at most 500 characters", l.image);
    }
    let nodes = p.training_resource_num_workers;
    if !(1..=i32::MAX as i64).contains(&nodes) {
        bail!("training_resource_num_workers={nodes}: must be an integer >= 1");
    }
    let procs = procs_per_node(p)?;
    let t = task_config(p.kubernetes_config.as_ref())?;
    if !mounted(&l.pvc_path, &t.volume_mounts) {
        bail!(
            "pvc_path {}: is on none of the volume mounts of kubernetes_config.volume_mounts, so the TrainJob's pods would not see the workspace (its parameters, data, checkpoints and outputs); pass the workspace volume through (KFP's KUBERNETES_VOLUMES task config)",
            l.pvc_path.display()
        );
    }
    for (i, m) in t.volume_mounts.iter().enumerate() {
        let name = m["name"].as_str().unwrap_or_default();
        if !t.volumes.iter().any(|v| v["name"].as_str() == Some(name)) {
            bail!("kubernetes_config.volume_mounts[{i}]: mounts volume {name:?}, which kubernetes_config.volumes does not have");
        }
    }
    let labels = kv_map("training_metadata_labels", &p.training_metadata_labels)?;
    let annotations = kv_map("training_metadata_annotations", &p.training_metadata_annotations)?;

    let mut pod_meta = Map::new();
    if !labels.is_empty() {
        pod_meta.insert("labels".into(), Value::Object(labels.clone()));
    }
    if !annotations.is_empty() {
        pod_meta.insert("annotations".into(), Value::Object(annotations.clone()));
    }
    let mut pod_spec = Map::new();
    pod_spec.insert("volumes".into(), Value::Array(t.volumes.clone()));
    pod_spec.insert("containers".into(), json!([{ "name": NODE, "volumeMounts": t.volume_mounts }]));
    if let Some(v) = &t.node_selector {
        pod_spec.insert("nodeSelector".into(), v.clone());
    }
    if let Some(v) = &t.tolerations {
        pod_spec.insert("tolerations".into(), v.clone());
    }
    if let Some(v) = &t.affinity {
        pod_spec.insert("affinity".into(), v.clone());
    }
    let mut pod_template = Map::new();
    if !pod_meta.is_empty() {
        pod_template.insert("metadata".into(), Value::Object(pod_meta));
    }
    pod_template.insert("spec".into(), Value::Object(pod_spec));

    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(l.name));
    metadata.insert("namespace".into(), json!(l.namespace));
    let mut job_labels = labels;
    job_labels.insert("app.kubernetes.io/managed-by".into(), json!(MANAGER));
    metadata.insert("labels".into(), Value::Object(job_labels));
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), Value::Object(annotations));
    }

    let mut trainer = Map::new();
    trainer.insert("image".into(), json!(l.image));
    trainer.insert("command".into(), json!(["lora", "train"]));
    trainer.insert("args".into(), json!(worker_args(l)));
    let env = trainer_env(p, &t)?;
    if !env.is_empty() {
        trainer.insert("env".into(), Value::Array(env));
    }
    trainer.insert("numNodes".into(), json!(nodes));
    trainer.insert("numProcPerNode".into(), json!(procs));
    trainer.insert("resourcesPerNode".into(), resources(p, &t)?);

    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": { "name": l.runtime, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime" },
            "trainer": trainer,
            "runtimePatches": [{
                "manager": MANAGER,
                "trainingRuntimeSpec": { "template": { "spec": { "replicatedJobs": [{
                    "name": NODE,
                    "template": { "spec": { "template": pod_template } },
                }] } } },
            }],
        },
    }))
}

/// Where a TrainJob is, from its `status.conditions` (`metav1.Condition`: `type`, `status`
/// `"True"`/`"False"`/`"Unknown"`, `reason`, `message`).
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// No finishing condition yet (pods pending or running).
    Active,
    /// `Suspended` is True: nothing runs until someone resumes it.
    Suspended,
    Complete,
    Failed { reason: String, message: String },
}

/// The phase of `job` (a TrainJob as the API server returns it). A Failed condition wins over
/// Complete (a controller sets only one; a broken object with both must not pass as success).
pub fn phase(job: &Value) -> Phase {
    let conditions = job["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let holds = |t: &str| conditions.iter().find(|c| c["type"] == t && c["status"] == "True");
    if let Some(c) = holds("Failed") {
        let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        return Phase::Failed { reason: text("reason"), message: text("message") };
    }
    if holds("Complete").is_some() {
        return Phase::Complete;
    }
    if holds("Suspended").is_some() {
        return Phase::Suspended;
    }
    Phase::Active
}

/// The label selector of the pods of TrainJob `name` (its JobSet has the TrainJob's name).
pub fn pods_selector(name: &str) -> String {
    format!("jobset.sigs.k8s.io/jobset-name={name}")
}

fn label<'a>(pod: &'a Value, k: &str) -> Option<&'a str> {
    pod["metadata"]["labels"][k].as_str()
}

/// The pod of node 0 (`PET_NODE_RANK` 0: completion index 0 of the `node` job) among `pods` (a
/// PodList), whose log the launcher streams. The newest such pod when a restart made several.
pub fn node0_pod(pods: &Value) -> Option<String> {
    pods["items"]
        .as_array()?
        .iter()
        .filter(|p| label(p, "jobset.sigs.k8s.io/replicatedjob-name") == Some(NODE) && label(p, "batch.kubernetes.io/job-completion-index") == Some("0"))
        .max_by_key(|p| p["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_owned())
        .and_then(|p| p["metadata"]["name"].as_str().map(str::to_owned))
}

/// The pods whose trainer container ended in failure (non-zero exit, or the pod Failed), with
/// their node rank and how the container ended: whose last log lines a Failed TrainJob reports.
pub fn failed_pods(pods: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in pods["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let rank = label(p, "batch.kubernetes.io/job-completion-index").unwrap_or("?").to_owned();
        let node = p["status"]["containerStatuses"].as_array().into_iter().flatten().find(|c| c["name"] == NODE);
        let ended = node.map(|c| &c["state"]["terminated"]).filter(|t| t.is_object());
        match ended {
            Some(t) if t["exitCode"].as_i64() != Some(0) => {
                let how = match (t["exitCode"].as_i64(), t["reason"].as_str()) {
                    (Some(code), Some(reason)) => format!("exit code {code} ({reason})"),
                    (Some(code), None) => format!("exit code {code}"),
                    (None, _) => "ended without an exit code".to_owned(),
                };
                out.push((name, rank, how));
            }
            None if p["status"]["phase"] == "Failed" => {
                let why = p["status"]["reason"].as_str().or(p["status"]["message"].as_str()).unwrap_or("pod Failed");
                out.push((name, rank, why.to_owned()));
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
#[path = "trainjob_test.rs"]
mod tests;
