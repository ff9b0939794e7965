//! `lora kfp` with `training_resource_num_workers` > 1 (and not itself a TrainJob worker): the
//! TrainJob launcher. It puts what the workers need on the workspace PVC (the parameters as
//! `params.json`, the dataset when it is not already there), creates the TrainJob
//! ([`crate::trainjob::manifest`]) with the client of [`crate::kube`], waits while printing node
//! 0's log, deletes the TrainJob on SIGTERM/SIGINT, and on Complete writes the KFP outputs from
//! what rank 0 wrote on the PVC, as a single-pod `lora kfp` run writes them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use crate::kube::{self, Kube};
use crate::request::RunOutcome;
use crate::trainjob::{self, Launch};

/// The workers' image; [`crate::component::IMAGE`] unless this names another.
pub const IMAGE_ENV: &str = "LORA_IMAGE";
/// The TrainJob's namespace; the service account's unless this names another.
pub const NAMESPACE_ENV: &str = "LORA_KUBE_NAMESPACE";
/// Seconds between two looks at the TrainJob (default 5; fractions allowed).
pub const POLL_ENV: &str = "LORA_TRAINJOB_POLL_SECONDS";
/// How long the launcher waits for the TrainJob to end before deleting it (default 7 days).
pub const DEADLINE_ENV: &str = "LORA_TRAINJOB_DEADLINE_SECONDS";
/// The namespace of the launcher's own pod, where the service account file is not there.
pub const POD_NAMESPACE_ENV: &str = "LORA_KUBE_POD_NAMESPACE";

static CANCELLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    CANCELLED.store(true, Ordering::SeqCst);
}

fn var(env: &[(String, String)], k: &str) -> Option<String> {
    env.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

fn seconds(env: &[(String, String)], k: &str, default: f64) -> Result<Duration> {
    match var(env, k) {
        None => Ok(Duration::from_secs_f64(default)),
        Some(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
            .map(Duration::from_secs_f64)
            .with_context(|| format!("{k}={v:?}: must be a number of seconds >= 0")),
    }
}

/// The KFP executor pod's name and uid, as KFP's driver sets them (downward API) on every
/// component pod.
pub const KFP_POD_NAME_ENV: &str = "KFP_POD_NAME";
pub const KFP_POD_UID_ENV: &str = "KFP_POD_UID";
/// The annotation that names the KFP pod a TrainJob was created for.
pub const KFP_POD_ANNOTATION: &str = "lora.kubeflow.org/kfp-pod";

/// The KFP executor pod this launcher runs in (name, uid), when KFP says so.
fn kfp_pod(env: &[(String, String)]) -> Option<(String, String)> {
    let get = |k| var(env, k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    Some((get(KFP_POD_NAME_ENV)?, get(KFP_POD_UID_ENV)?))
}

/// A name for the TrainJob: `lora-` and 12 hex digits. In a KFP pod they come from the pod's
/// uid, so a restarted launcher container finds the TrainJob it created instead of starting a
/// second one; elsewhere from the time and the process id.
fn job_name(env: &[(String, String)]) -> String {
    let seed = match kfp_pod(env) {
        Some((_, uid)) => format!("kfp-pod-{uid}"),
        None => {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
            format!("{nanos}-{}", std::process::id())
        }
    };
    let d = <sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes());
    format!("lora-{}", d.iter().take(6).map(|b| format!("{b:02x}")).collect::<String>())
}

/// Ties the TrainJob to the KFP run: an annotation naming the KFP pod, and, when the TrainJob is
/// in the pod's own namespace (owners cannot cross namespaces), an owner reference to the pod,
/// so that deleting the run's pods (a deleted or terminated KFP run) garbage-collects the
/// TrainJob, its JobSet and its workers even if the launcher was killed before it could.
fn tie_to_kfp(manifest: &mut Value, env: &[(String, String)], pod_namespace: Option<&str>) {
    let Some((pod, uid)) = kfp_pod(env) else { return };
    let meta = &mut manifest["metadata"];
    meta["annotations"][KFP_POD_ANNOTATION] = json!(pod);
    if pod_namespace.is_some_and(|ns| Some(ns) == meta["namespace"].as_str()) {
        meta["ownerReferences"] = json!([{ "apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid }]);
    }
}

/// The namespace: `LORA_KUBE_NAMESPACE`, else the service account's (in a pod), else `default`.
fn namespace(env: &[(String, String)], sa: &Path) -> String {
    if let Some(ns) = var(env, NAMESPACE_ENV).filter(|s| !s.trim().is_empty()) {
        return ns.trim().to_owned();
    }
    std::fs::read_to_string(sa.join("namespace")).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into())
}

/// What the launcher works with: the parameters, where the data is, the KFP executor input.
pub struct Request<'a> {
    pub params: &'a lora_params::ResolvedParams,
    pub pvc_path: PathBuf,
    /// The dataset as the launcher's pod sees it (the input artifact's local path).
    pub dataset: Option<PathBuf>,
    pub model: PathBuf,
    pub metrics: PathBuf,
    pub loss_chart: PathBuf,
}

fn launch_of(r: &Request, env: &[(String, String)], name: String, ns: String) -> Result<Launch> {
    let mut l = Launch {
        name,
        namespace: ns,
        image: var(env, IMAGE_ENV).filter(|s| !s.trim().is_empty()).unwrap_or_else(|| crate::component::IMAGE.to_owned()),
        runtime: trainjob::runtime_name(env)?,
        pvc_path: r.pvc_path.clone(),
        dataset: None,
    };
    l.dataset = r.dataset.as_ref().map(|d| {
        if d.starts_with(&r.pvc_path) {
            d.clone()
        } else {
            l.job_dir().join("dataset").join(d.file_name().unwrap_or_else(|| "train".as_ref()))
        }
    });
    Ok(l)
}

/// `lora kfp --dry-run`: the TrainJob it would create, as JSON; no cluster is contacted.
pub fn dry_run(r: &Request, env: &[(String, String)]) -> Result<Value> {
    let sa = Path::new(kube::SERVICE_ACCOUNT);
    let l = launch_of(r, env, job_name(env), namespace(env, sa))?;
    let mut m = trainjob::manifest(&r.params.params, &l)?;
    tie_to_kfp(&mut m, env, pod_namespace(env, sa).as_deref());
    Ok(m)
}

/// The namespace of the launcher's own pod (where an owner reference to it may point):
/// `LORA_KUBE_POD_NAMESPACE`, else the service account's namespace file; not
/// `LORA_KUBE_NAMESPACE`, which names where the TrainJob goes.
fn pod_namespace(env: &[(String, String)], sa: &Path) -> Option<String> {
    var(env, POD_NAMESPACE_ENV)
        .or_else(|| std::fs::read_to_string(sa.join("namespace")).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Copies file or folder `from` to `to` (a folder's contents, recursively), looking at
/// `CANCELLED` before and after every file: a SIGTERM stops it (an error met once cancelled is
/// reported as the cancellation, with the error as its cause).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let cancelled = || anyhow::anyhow!("cancelled while copying {}", from.display());
    if CANCELLED.load(Ordering::SeqCst) {
        return Err(cancelled());
    }
    let copied = (|| -> Result<()> {
        let meta = std::fs::metadata(from).with_context(|| format!("reading {}", from.display()))?;
        if meta.is_dir() {
            std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
            for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
                let e = e?;
                copy_tree(&e.path(), &to.join(e.file_name()))?;
            }
        } else {
            std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        Ok(())
    })();
    match copied {
        Err(e) if CANCELLED.load(Ordering::SeqCst) && !format!("{e}").starts_with("cancelled") => Err(e.context(cancelled())),
        Ok(()) if CANCELLED.load(Ordering::SeqCst) => Err(cancelled()),
        r => r,
    }
}

/// Copies `from` to `to` staged: into a temporary name next to `to`, renamed over `to` (a folder
/// there is removed first) only once complete. Cancelled (SIGTERM) or failed: the temporary copy
/// is removed and `to` is as it was.
fn copy(from: &Path, to: &Path) -> Result<()> {
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.lora-partial-{}", std::process::id()));
    let remove = |p: &Path| {
        let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
    };
    remove(&tmp);
    if let Err(e) = copy_tree(from, &tmp) {
        remove(&tmp);
        return Err(e);
    }
    if to.is_dir() {
        std::fs::remove_dir_all(to).with_context(|| format!("replacing {}", to.display()))?;
    }
    std::fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

/// The dataset the workers read, found in the single-pod run's order (`lora_data::resolve_dataset`,
/// whose errors are the run's): None when an existing non-empty `<pvc_path>/dataset/train` is
/// there (the workers reuse it themselves), else the artifact's path, else its metadata
/// `pvc_path`/`pvc_dir`.
pub fn dataset_path(d: &crate::request::DatasetInput, pvc: &Path) -> Result<Option<PathBuf>> {
    lora_data::resolve_dataset(&lora_data::DatasetInput { artifact_path: d.path.clone(), metadata: d.metadata.clone(), pvc_path: Some(pvc.to_path_buf()) })?;
    let reuse = pvc.join("dataset").join("train");
    if std::fs::read_dir(&reuse).is_ok_and(|mut e| e.next().is_some()) {
        return Ok(None);
    }
    if let Some(p) = d.path.as_ref().filter(|p| p.exists()) {
        return Ok(Some(p.clone()));
    }
    Ok(["pvc_path", "pvc_dir"].iter().find_map(|k| d.metadata.get(*k).and_then(Value::as_str)).map(PathBuf::from))
}

/// A TrainJob ready to be created: everything checked that can be before the cluster is asked.
pub struct Prepared {
    client: Kube,
    poll: Duration,
    deadline: Duration,
    launch: Launch,
    manifest: Value,
}

/// The client, the timings and the TrainJob; errors here are bad input (exit 2).
pub fn prepare(r: &Request, env: &[(String, String)]) -> Result<Prepared> {
    let sa = Path::new(kube::SERVICE_ACCOUNT);
    let client = Kube::from_env(|k| var(env, k), sa, var(env, NAMESPACE_ENV).filter(|s| !s.trim().is_empty()))?;
    let poll = seconds(env, POLL_ENV, 5.0)?;
    let deadline = seconds(env, DEADLINE_ENV, 7.0 * 86400.0)?;
    let launch = launch_of(r, env, job_name(env), client.namespace.clone())?;
    let mut manifest = trainjob::manifest(&r.params.params, &launch)?;
    tie_to_kfp(&mut manifest, env, pod_namespace(env, sa).as_deref());
    Ok(Prepared { client, poll, deadline, launch, manifest })
}

/// The run: prepare the PVC, create the TrainJob, wait, write the outputs. The outcome that
/// `lora kfp` writes into `executor_output.json`.
pub fn run(r: &Request, prepared: Prepared) -> Result<RunOutcome> {
    let Prepared { client, poll, deadline, launch: l, manifest } = prepared;
    // SAFETY: plain handlers that only store to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let dir = l.job_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating the TrainJob's folder {} on the workspace", dir.display()))?;
    let params = serde_json::to_vec_pretty(&Value::Object(r.params.params.to_json()))?;
    crate::fs::write_atomic(&l.params_file(), &params).with_context(|| format!("writing {}", l.params_file().display()))?;
    if let (Some(from), Some(to)) = (&r.dataset, &l.dataset)
        && from != to
    {
        eprintln!("lora: copying the dataset {} to the workspace ({})", from.display(), to.display());
        copy(from, to).context("the TrainJob's workers read the dataset from the workspace")?;
    }

    if client.create_or_adopt(&manifest)? {
        eprintln!(
            "lora: created TrainJob {} in namespace {} ({} workers, runtime {}); node 0's log follows",
            l.name, l.namespace, r.params.params.training_resource_num_workers, l.runtime
        );
    } else {
        eprintln!("lora: TrainJob {} in namespace {} already exists for this KFP pod (the launcher was restarted); waiting for it; node 0's log follows", l.name, l.namespace);
    }
    client.wait(&l.name, poll, deadline, &CANCELLED, &mut std::io::stdout())?;
    eprintln!("lora: TrainJob {} completed; writing the outputs from {}", l.name, dir.display());
    outputs(r, &l)
}

/// The KFP outputs from what rank 0 wrote on the PVC.
fn outputs(r: &Request, l: &Launch) -> Result<RunOutcome> {
    let model = l.output_model();
    let manifest_path = model.join("run_manifest.json");
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("the TrainJob completed, but its model has no run manifest {}", manifest_path.display()))?;
    let run_manifest: crate::manifest::Manifest =
        serde_json::from_str(&text).with_context(|| format!("{}: not a run manifest", manifest_path.display()))?;
    let metrics_text = std::fs::read_to_string(l.output_metrics()).with_context(|| format!("reading the workers' metrics {}", l.output_metrics().display()))?;
    let metrics: Map<String, Value> = serde_json::from_str(&metrics_text).with_context(|| format!("{}: not a JSON object", l.output_metrics().display()))?;
    if !l.output_loss_chart().is_file() {
        bail!("the TrainJob completed, but its loss chart {} is missing", l.output_loss_chart().display());
    }
    copy(&model, &r.model).context("writing the KFP output model")?;
    crate::kfp::write_atomic(&r.metrics, metrics_text.as_bytes())?;
    let chart = std::fs::read(l.output_loss_chart()).with_context(|| format!("reading {}", l.output_loss_chart().display()))?;
    crate::kfp::write_atomic(&r.loss_chart, &chart)?;

    let p = &r.params;
    let mut model_metadata = Map::new();
    model_metadata.insert("base_model".into(), json!(run_manifest.model.name));
    if let Some(c) = &run_manifest.model.commit {
        model_metadata.insert("base_model_commit".into(), json!(c));
    }
    model_metadata.insert("adapter".into(), json!("adapter/"));
    model_metadata.insert("run_id".into(), json!(run_manifest.run_id()));
    model_metadata.insert("lora_r".into(), json!(p.lora_r));
    model_metadata.insert("lora_alpha".into(), json!(p.lora_alpha));
    Ok(RunOutcome { output: crate::run::OUTPUT.into(), metrics, model_metadata })
}
