//! The client against an HTTP server on 127.0.0.1 that answers the few Kubernetes API
//! endpoints it uses (create/get/delete TrainJob, list pods, pod log) as the API server does.
//! No real kube-apiserver can run here (none in Debian or PyPI, no network for other sources).

use super::*;
use serde_json::json;
use std::sync::{Arc, Mutex};

#[path = "../../../tests/e2e/common/kube_api.rs"]
mod kube_api;
use kube_api::serve;

fn kube(base: &str) -> Kube {
    let sa = std::env::temp_dir().join(format!("lora-kube-sa-{}-{}", std::process::id(), base.rsplit(':').next().unwrap()));
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), "sa-token\n").unwrap();
    std::fs::write(sa.join("namespace"), "team-nlp").unwrap();
    let base = base.to_owned();
    let k = Kube::from_env(|k| (k == API_ENV).then(|| base.clone()), &sa, None).unwrap();
    let _ = std::fs::remove_dir_all(&sa);
    k
}

const JOBS: &str = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-nlp/trainjobs";
const PODS: &str = "/api/v1/namespaces/team-nlp/pods?labelSelector=jobset.sigs.k8s.io%2Fjobset-name%3Dlora-1";

fn status(code: u16, reason: &str, message: &str) -> String {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code }).to_string()
}

fn job(conditions: Value) -> String {
    json!({ "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": { "name": "lora-1" }, "status": { "conditions": conditions } }).to_string()
}

fn pods(rank1: Value) -> String {
    let pod = |name: &str, index: &str, status: Value| {
        json!({ "metadata": { "name": name, "creationTimestamp": "2026-12-02T14:00:00Z", "labels": {
            "jobset.sigs.k8s.io/jobset-name": "lora-1", "jobset.sigs.k8s.io/replicatedjob-name": "node", "batch.kubernetes.io/job-completion-index": index } },
            "status": status })
    };
    json!({ "kind": "PodList", "items": [
        pod("lora-1-node-0-0-aaaaa", "0", json!({ "phase": "Running", "containerStatuses": [{ "name": "node", "state": { "running": {} } }] })),
        pod("lora-1-node-0-1-bbbbb", "1", rank1),
    ] })
    .to_string()
}

fn running() -> Value {
    json!({ "phase": "Running", "containerStatuses": [{ "name": "node", "state": { "running": {} } }] })
}

#[test]
fn created_running_complete_with_node_0_log_streamed_once() {
    let gets = Arc::new(Mutex::new(0));
    let g = gets.clone();
    let (base, seen) = serve(Box::new(move |r, _| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => (201, r.body.clone()),
        ("GET", p) if p == format!("{JOBS}/lora-1") => {
            let mut n = g.lock().unwrap();
            *n += 1;
            let done = json!([{ "type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "" }]);
            (200, job(if *n >= 3 { done } else { json!([]) }))
        }
        ("GET", PODS) => (200, pods(running())),
        ("GET", p) if p.starts_with("/api/v1/namespaces/team-nlp/pods/lora-1-node-0-0-aaaaa/log?container=node") => {
            let n = *g.lock().unwrap();
            (200, ["step 1\n", "step 2\n", "done\n"][..n.min(3)].concat())
        }
        _ => (404, status(404, "NotFound", &format!("no route {} {}", r.method, r.path))),
    }));
    let k = kube(&base);
    let manifest = json!({ "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": { "name": "lora-1", "namespace": "team-nlp" }, "spec": {} });
    assert!(k.create_or_adopt(&manifest).unwrap(), "created");
    let mut out = Vec::new();
    k.wait("lora-1", Duration::from_millis(10), Duration::from_secs(30), &AtomicBool::new(false), &mut out).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "step 1\nstep 2\ndone\n", "each line once, in order");
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(serde_json::from_str::<Value>(&seen[0].body).unwrap(), manifest, "the manifest is sent as built");
    assert!(seen.iter().all(|r| r.auth.as_deref() == Some("Bearer sa-token")), "{seen:?}");
    assert!(!seen.iter().any(|r| r.method == "DELETE"), "a finished TrainJob stays for inspection");
}

#[test]
fn a_failed_trainjob_names_the_failed_rank_with_its_last_lines() {
    let (base, _) = serve(Box::new(|r, _| match (r.method.as_str(), r.path.as_str()) {
        ("GET", p) if p == format!("{JOBS}/lora-1") => {
            (200, job(json!([{ "type": "Failed", "status": "True", "reason": "JobsFailed", "message": "jobset failed: node" }])))
        }
        ("GET", PODS) => (200, pods(json!({ "phase": "Failed", "containerStatuses": [{ "name": "node", "state": { "terminated": { "exitCode": 1, "reason": "Error" } } }] }))),
        ("GET", p) if p.contains("/pods/lora-1-node-0-1-bbbbb/log") => {
            assert!(p.ends_with("&tailLines=20"), "{p}");
            (200, "step 3\nlora: training step 3: rank 1: CUDA out of memory\n".into())
        }
        ("GET", p) if p.contains("/pods/lora-1-node-0-0-aaaaa/log") => (200, "step 1\n".into()),
        _ => (404, status(404, "NotFound", "no route")),
    }));
    let k = kube(&base);
    let mut out = Vec::new();
    let e = k.wait("lora-1", Duration::from_millis(10), Duration::from_secs(30), &AtomicBool::new(false), &mut out).unwrap_err().to_string();
    assert!(e.starts_with("TrainJob lora-1 failed (JobsFailed): jobset failed: node"), "{e}");
    assert!(e.contains("node rank 1 (pod lora-1-node-0-1-bbbbb): exit code 1 (Error), its last lines:\nstep 3\nlora: training step 3: rank 1: CUDA out of memory"), "{e}");
    assert_eq!(String::from_utf8(out).unwrap(), "step 1\n");
}

#[test]
fn conflicts_refusals_and_a_missing_crd_say_what_happened() {
    let (base, _) = serve(Box::new(|_, n| match n {
        0 => (409, status(409, "AlreadyExists", "trainjobs.trainer.kubeflow.org \"lora-1\" already exists")),
        1 => (403, status(403, "Forbidden", "trainjobs.trainer.kubeflow.org is forbidden: User \"system:serviceaccount:team-nlp:pipeline-runner\" cannot create resource")),
        2 => (404, status(404, "NotFound", "the server could not find the requested resource")),
        _ => (422, status(422, "Invalid", "spec.trainer.numNodes: Invalid value: 0")),
    }));
    let k = kube(&base);
    let m = json!({ "metadata": { "name": "lora-1" } });
    let e = format!("{:#}", k.create_or_adopt(&m).unwrap_err());
    assert!(e.contains("creating TrainJob lora-1 in namespace team-nlp: it already exists (409)") && e.contains("already exists"), "{e}");
    let e = format!("{:#}", k.create_or_adopt(&m).unwrap_err());
    assert!(e.contains("may not do this in namespace team-nlp (403") && e.contains("pipeline-runner"), "{e}");
    let e = format!("{:#}", k.create_or_adopt(&m).unwrap_err());
    assert!(e.contains("is Kubeflow Trainer installed"), "{e}");
    let e = format!("{:#}", k.create_or_adopt(&m).unwrap_err());
    assert!(e.contains("invalid (422): spec.trainer.numNodes"), "{e}");
}

#[test]
fn a_timeout_or_a_cancel_deletes_the_trainjob() {
    for cancel in [false, true] {
        let (base, seen) = serve(Box::new(|r, _| match (r.method.as_str(), r.path.as_str()) {
            ("GET", p) if p == format!("{JOBS}/lora-1") => (200, job(json!([]))),
            ("GET", PODS) => (200, json!({ "items": [] }).to_string()),
            ("DELETE", p) if p == format!("{JOBS}/lora-1?propagationPolicy=Background") => (200, status(200, "", "")),
            _ => (404, status(404, "NotFound", "no route")),
        }));
        let k = kube(&base);
        let flag = AtomicBool::new(cancel);
        let deadline = if cancel { Duration::from_secs(30) } else { Duration::ZERO };
        let e = k.wait("lora-1", Duration::from_millis(10), deadline, &flag, &mut Vec::new()).unwrap_err().to_string();
        let why = if cancel { "cancelled" } else { "no end within 0 s" };
        assert_eq!(e, format!("{why}: deleted TrainJob lora-1 in namespace team-nlp"));
        assert_eq!(seen.lock().unwrap().iter().filter(|r| r.method == "DELETE").count(), 1);
    }
}

#[test]
fn without_a_cluster_the_client_says_what_it_needs() {
    let sa = std::env::temp_dir().join(format!("lora-kube-none-{}", std::process::id()));
    let e = Kube::from_env(|_| None, &sa, None).err().unwrap().to_string();
    assert!(e.contains("KUBERNETES_SERVICE_HOST is not set") && e.contains("LORA_KUBE_API"), "{e}");
    let e = Kube::from_env(|k| (k == API_ENV).then(|| "127.0.0.1:6443".to_owned()), &sa, None).err().unwrap().to_string();
    assert!(e.contains("LORA_KUBE_API=\"127.0.0.1:6443\": must be an http:// or https:// URL"), "{e}");
    let e = Kube::from_env(|k| (k == API_ENV).then(|| "http://127.0.0.1:1".to_owned()), &sa, None).err().unwrap().to_string();
    assert!(e.contains("namespace"), "{e}");
    // Nothing listens on port 1: the error names the server.
    let k = Kube::from_env(|k| (k == API_ENV).then(|| "http://127.0.0.1:1".to_owned()), &sa, Some("ns".into())).unwrap();
    let e = format!("{:#}", k.get("lora-1").unwrap_err());
    assert!(e.contains("GET http://127.0.0.1:1/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs/lora-1: the Kubernetes API server could not be reached"), "{e}");
}

#[test]
fn a_trainjob_already_there_for_the_same_kfp_pod_is_adopted_and_any_other_refused() {
    let (base, seen) = serve(Box::new(|r, _| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => (409, status(409, "AlreadyExists", "trainjobs.trainer.kubeflow.org \"lora-1\" already exists")),
        ("GET", p) if p == format!("{JOBS}/lora-1") => {
            (200, json!({ "metadata": { "name": "lora-1", "annotations": { crate::launcher::KFP_POD_ANNOTATION: "run-a-lora-123" } } }).to_string())
        }
        _ => (404, status(404, "NotFound", "no route")),
    }));
    let k = kube(&base);
    let ours = |pod: &str| json!({ "metadata": { "name": "lora-1", "annotations": { crate::launcher::KFP_POD_ANNOTATION: pod } } });
    assert!(!k.create_or_adopt(&ours("run-a-lora-123")).unwrap(), "adopted");
    let e = format!("{:#}", k.create_or_adopt(&ours("run-b-lora-456")).unwrap_err());
    assert!(e.contains("it already exists (409)"), "{e}");
    let e = format!("{:#}", k.create_or_adopt(&json!({ "metadata": { "name": "lora-1" } })).unwrap_err());
    assert!(e.contains("it already exists (409)"), "not from KFP: never adopted: {e}");
    let gets = seen.lock().unwrap().iter().filter(|r| r.method == "GET").count();
    assert_eq!(gets, 2, "only a KFP TrainJob is looked up");
}

#[test]
fn a_cancel_is_acted_on_without_waiting_out_the_poll_interval() {
    let (base, seen) = serve(Box::new(|r, _| match (r.method.as_str(), r.path.as_str()) {
        ("GET", p) if p == format!("{JOBS}/lora-1") => (200, job(json!([]))),
        ("GET", PODS) => (200, pods(running())),
        ("DELETE", p) if p.starts_with(&format!("{JOBS}/lora-1?")) => (200, json!({ "kind": "Status", "status": "Success" }).to_string()),
        _ => (404, status(404, "NotFound", "no route")),
    }));
    let k = kube(&base);
    let cancel = std::sync::Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let t0 = std::time::Instant::now();
    let e = k.wait("lora-1", Duration::from_secs(60), Duration::from_secs(600), &cancel, &mut Vec::new()).unwrap_err().to_string();
    let took = t0.elapsed();
    assert!(e.starts_with("cancelled: deleted TrainJob lora-1"), "{e}");
    assert!(took < Duration::from_secs(3), "a 60 s poll slept through the cancel: {took:?}");
    assert_eq!(seen.lock().unwrap().iter().filter(|r| r.method == "DELETE").count(), 1);
}
