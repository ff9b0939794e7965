//! `lora kfp` with `training_resource_num_workers` = 2: the TrainJob launcher, against the local
//! Kubernetes API test server (`common/kube_api.rs`; no real kube-apiserver can run here). The
//! Complete case runs a real `lora train` worker with the command and arguments of the TrainJob
//! as created and the `PET_*` variables of the torch runtime, for one node (two ranks need GPUs:
//! `--training-resource-num-workers 1` is added, beating the `params.json` the launcher wrote).

use super::common::kube_api::{Seen, serve};
use super::common::*;
use lora_engine::DType;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const JOBS: &str = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-nlp/trainjobs";

fn status(code: u16, reason: &str) -> String {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": reason, "code": code }).to_string()
}

fn job(name: &str, conditions: Value) -> String {
    json!({ "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": { "name": name }, "status": { "conditions": conditions } }).to_string()
}

fn pod(job: &str, index: &str, status: Value) -> Value {
    json!({ "metadata": { "name": format!("{job}-node-0-{index}-x"), "creationTimestamp": "2026-12-02T14:00:00Z", "labels": {
        "jobset.sigs.k8s.io/jobset-name": job, "jobset.sigs.k8s.io/replicatedjob-name": "node", "batch.kubernetes.io/job-completion-index": index } },
        "status": status })
}

/// The executor input of a 2-worker run whose workspace is `work/pvc`, mounted as such.
fn executor_input(work: &Path, model: &Path) -> PathBuf {
    executor_input_with(work, model, |_| {})
}

/// [`executor_input`] changed by `edit` first.
fn executor_input_with(work: &Path, model: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let art = |name: &str, path: &Path, kind: &str| json!({ name: { "artifacts": [{ "name": name, "type": { "schemaTitle": kind }, "uri": path, "metadata": {} }] } });
    let mut outputs = serde_json::Map::new();
    for (name, path, kind) in [
        ("output_model", work.join("kfp/model"), "system.Model"),
        ("output_metrics", work.join("kfp/metrics"), "system.Metrics"),
        ("output_loss_chart", work.join("kfp/chart.html"), "system.HTML"),
    ] {
        outputs.extend(art(name, &path, kind).as_object().unwrap().clone());
    }
    let pvc = work.join("pvc");
    let input = json!({
        "inputs": {
            "artifacts": art("dataset", &capitals(), "system.Dataset"),
            "parameterValues": {
                "pvc_path": pvc,
                "training_base_model": model,
                "training_effective_batch_size": 8.0,
                "training_max_seq_len": 256.0,
                "training_max_tokens_per_gpu": 1024.0,
                "training_max_steps": 2.0,
                "training_device": "cpu",
                "training_lora_r": 8.0,
                "training_lora_alpha": 16.0,
                "training_resource_num_workers": 2.0,
                "training_resource_gpu_per_worker": 1.0,
                "kubernetes_config": {
                    "volumes": [{ "name": "ws", "persistentVolumeClaim": { "claimName": "run-ws" } }],
                    "volume_mounts": [{ "name": "ws", "mountPath": pvc }],
                },
            }
        },
        "outputs": {
            "artifacts": outputs,
            "parameters": { "Output": { "outputFile": work.join("kfp/Output") } },
            "outputFile": work.join("kfp/executor_output.json"),
        }
    });
    let mut input = input;
    edit(&mut input);
    let path = work.join("executor_input.json");
    std::fs::write(&path, input.to_string()).unwrap();
    path
}

fn kfp_cmd(work: &Path, input: &Path, api: &str) -> std::process::Command {
    let mut c = std::process::Command::new(BIN);
    c.args(["kfp", "--executor-input"])
        .arg(format!("@{}", input.display()))
        .env("LORA_KUBE_API", api)
        .env("LORA_KUBE_NAMESPACE", "team-nlp")
        .env("LORA_TRAINJOB_POLL_SECONDS", "0.05")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", work.join("hf"))
        .env_remove("PET_NNODES")
        .env_remove("KFP_POD_NAME")
        .env_remove("KFP_POD_UID")
        .env_remove("LORA_KUBE_POD_NAMESPACE");
    c
}

#[derive(Default)]
struct Worker {
    manifest: Option<Value>,
    log: String,
    exit: Option<i32>,
}

#[test]
fn a_two_worker_kfp_run_creates_the_trainjob_and_writes_the_outputs_of_its_workers() {
    let work = temp_dir("launch-ok");
    let model = tiny_model(&work.join("base"), DType::F32);
    let state = Arc::new(Mutex::new(Worker::default()));
    let s = state.clone();
    let hf = work.join("hf");
    let (api, seen) = serve(Box::new(move |r: &Seen, _| {
        let mut w = s.lock().unwrap();
        match (r.method.as_str(), r.path.as_str()) {
            ("POST", JOBS) => {
                let m: Value = serde_json::from_str(&r.body).unwrap();
                let trainer = &m["spec"]["trainer"];
                let command: Vec<String> = trainer["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
                assert_eq!(command, ["lora", "train"]);
                let args: Vec<String> = trainer["args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
                w.manifest = Some(m.clone());
                let (s, hf) = (s.clone(), hf.clone());
                std::thread::spawn(move || {
                    let out = std::process::Command::new(BIN)
                        .args(&command[1..])
                        .args(&args)
                        .args(["--training-resource-num-workers", "1"])
                        .env("PET_NNODES", "1")
                        .env("PET_NPROC_PER_NODE", "1")
                        .env("PET_NODE_RANK", "0")
                        .env("PET_MASTER_ADDR", "127.0.0.1")
                        .env("PET_MASTER_PORT", "29500")
                        .env("HF_HUB_OFFLINE", "1")
                        .env("HF_HOME", hf)
                        .env_remove("LORA_KUBE_API")
                        .output()
                        .unwrap();
                    let mut w = s.lock().unwrap();
                    w.log = String::from_utf8_lossy(&out.stderr).into_owned();
                    w.exit = out.status.code();
                });
                (201, r.body.clone())
            }
            ("GET", p) if p.starts_with(&format!("{JOBS}/")) => {
                let name = &p[JOBS.len() + 1..];
                let cond = match w.exit {
                    Some(0) => json!([{ "type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "" }]),
                    Some(_) => json!([{ "type": "Failed", "status": "True", "reason": "JobsFailed", "message": "worker failed" }]),
                    None => json!([]),
                };
                (200, job(name, cond))
            }
            ("GET", p) if p.starts_with("/api/v1/namespaces/team-nlp/pods?labelSelector=") => {
                let name = w.manifest.as_ref().unwrap()["metadata"]["name"].as_str().unwrap().to_owned();
                (200, json!({ "kind": "PodList", "items": [pod(&name, "0", json!({ "phase": "Running" }))] }).to_string())
            }
            ("GET", p) if p.contains("/log?container=node") => (200, w.log.clone()),
            _ => (404, status(404, "NotFound")),
        }
    }));
    let input = executor_input(&work, &model);
    let out = run_ok(kfp_cmd(&work, &input, &api));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);

    let w = state.lock().unwrap();
    let m = w.manifest.as_ref().expect("a TrainJob was created");
    let name = m["metadata"]["name"].as_str().unwrap();
    assert_eq!(m["spec"]["trainer"]["numNodes"], 2);
    assert_eq!(m["metadata"]["namespace"], "team-nlp");
    assert!(stderr.contains(&format!("created TrainJob {name} in namespace team-nlp (2 workers, runtime torch-distributed)")), "{stderr}");
    // Node 0's log is the launcher's output.
    assert!(stdout.contains("lora: base model") && stdout.contains(&w.log), "stdout:\n{stdout}");
    // What the workers needed is on the workspace.
    let dir = work.join("pvc/.lora-trainjob").join(name);
    let params: Value = serde_json::from_slice(&std::fs::read(dir.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["training_resource_num_workers"], 2);
    assert_eq!(params["training_max_steps"], 2);
    assert_eq!(std::fs::read(dir.join("dataset").join(capitals().file_name().unwrap())).unwrap(), std::fs::read(capitals()).unwrap(), "the dataset, copied");
    // The KFP outputs are the worker's.
    let eo: Value = serde_json::from_slice(&std::fs::read(work.join("kfp/executor_output.json")).unwrap()).unwrap();
    assert_eq!(eo["parameterValues"]["Output"], "training completed");
    assert_eq!(std::fs::read_to_string(work.join("kfp/Output")).unwrap(), "training completed");
    let metrics: Value = serde_json::from_slice(&std::fs::read(work.join("kfp/metrics")).unwrap()).unwrap();
    assert_eq!(metrics, serde_json::from_slice::<Value>(&std::fs::read(dir.join("output_metrics.json")).unwrap()).unwrap());
    let meta = &eo["artifacts"]["output_metrics"]["artifacts"][0]["metadata"];
    assert!(meta["training_final_loss"].is_number() && meta["training_final_loss"] == metrics["training_final_loss"], "{meta}");
    let mm = &eo["artifacts"]["output_model"]["artifacts"][0]["metadata"];
    assert_eq!(mm["base_model"], json!(model), "{mm}");
    assert_eq!(mm["run_id"].as_str().map(str::len), Some(16), "{mm}");
    assert_eq!(mm["lora_r"], 8);
    for f in ["adapter/adapter_model.safetensors", "model.safetensors", "run_manifest.json"] {
        assert_eq!(std::fs::read(work.join("kfp/model").join(f)).unwrap(), std::fs::read(dir.join("output_model").join(f)).unwrap(), "{f}");
    }
    assert_eq!(std::fs::read(work.join("kfp/chart.html")).unwrap(), std::fs::read(dir.join("output_loss_chart.html")).unwrap());
    assert!(work.join("pvc/final_model/model.safetensors").is_file(), "rank 0 wrote the workspace copy");
    assert!(!seen.lock().unwrap().iter().any(|r| r.method == "DELETE"));
    drop(w);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_failed_trainjob_fails_the_step_with_the_failed_ranks_last_lines() {
    let work = temp_dir("launch-failed");
    let model = tiny_model(&work.join("base"), DType::F32);
    let (api, seen) = serve(Box::new(|r: &Seen, _| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => (201, r.body.clone()),
        ("GET", p) if p.starts_with(&format!("{JOBS}/")) => {
            (200, job(&p[JOBS.len() + 1..], json!([{ "type": "Failed", "status": "True", "reason": "JobsFailed", "message": "jobset failed: node" }])))
        }
        ("GET", p) if p.starts_with("/api/v1/namespaces/team-nlp/pods?labelSelector=jobset.sigs.k8s.io%2Fjobset-name%3D") => {
            let name = p.rsplit("%3D").next().unwrap();
            let failed = json!({ "phase": "Failed", "containerStatuses": [{ "name": "node", "state": { "terminated": { "exitCode": 1, "reason": "Error" } } }] });
            (200, json!({ "items": [pod(name, "0", json!({ "phase": "Running" })), pod(name, "1", failed)] }).to_string())
        }
        ("GET", p) if p.contains("-node-0-1-x/log") => (200, "step 1\nlora: rank 1: CUDA out of memory\n".into()),
        ("GET", p) if p.contains("-node-0-0-x/log") => (200, "lora: node 0 says hello\n".into()),
        _ => (404, status(404, "NotFound")),
    }));
    let input = executor_input(&work, &model);
    let out = kfp_cmd(&work, &input, &api).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed (JobsFailed): jobset failed: node"), "{stderr}");
    assert!(stderr.contains("node rank 1 (pod lora-") && stderr.contains("exit code 1 (Error), its last lines:\nstep 1\nlora: rank 1: CUDA out of memory"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("lora: node 0 says hello"));
    assert!(!work.join("kfp/executor_output.json").exists() && !work.join("kfp/model").exists(), "no outputs");
    assert_eq!(seen.lock().unwrap().iter().filter(|r| r.method == "POST").count(), 1);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn sigterm_deletes_the_running_trainjob_and_fails_the_step() {
    let work = temp_dir("launch-term");
    let model = tiny_model(&work.join("base"), DType::F32);
    let (api, seen) = serve(Box::new(|r: &Seen, _| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => (201, r.body.clone()),
        ("GET", p) if p.starts_with(&format!("{JOBS}/")) => (200, job(&p[JOBS.len() + 1..], json!([]))),
        ("GET", p) if p.starts_with("/api/v1/namespaces/team-nlp/pods?") => (200, json!({ "items": [] }).to_string()),
        ("DELETE", p) if p.starts_with(&format!("{JOBS}/lora-")) && p.ends_with("?propagationPolicy=Background") => (200, json!({ "kind": "Status", "status": "Success" }).to_string()),
        _ => (404, status(404, "NotFound")),
    }));
    let input = executor_input(&work, &model);
    // A 30 s poll: the launcher is asleep between two looks when the signal comes.
    let mut c = kfp_cmd(&work, &input, &api);
    c.env("LORA_TRAINJOB_POLL_SECONDS", "30");
    let child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !seen.lock().unwrap().iter().any(|r| r.method == "GET") {
        assert!(t0.elapsed().as_secs() < 60, "the launcher never looked at its TrainJob");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t1 = std::time::Instant::now();
    // SAFETY: a signal to the child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let took = t1.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(took < std::time::Duration::from_secs(3), "the 30 s poll slept through SIGTERM: {took:?}");
    assert!(stderr.contains("cancelled: deleted TrainJob lora-") && stderr.contains("in namespace team-nlp"), "{stderr}");
    let seen = seen.lock().unwrap();
    let created: Value = serde_json::from_str(&seen.iter().find(|r| r.method == "POST").unwrap().body).unwrap();
    let deletes: Vec<&Seen> = seen.iter().filter(|r| r.method == "DELETE").collect();
    assert_eq!(deletes.len(), 1);
    assert!(deletes[0].path.contains(&format!("/trainjobs/{}?", created["metadata"]["name"].as_str().unwrap())));
    assert!(!work.join("kfp/executor_output.json").exists());
    drop(seen);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn dry_run_prints_the_trainjob_without_contacting_a_cluster() {
    let work = temp_dir("launch-dry");
    let model = tiny_model(&work.join("base"), DType::F32);
    let (api, seen) = serve(Box::new(|_, _| (500, status(500, "dry run must not call"))));
    let input = executor_input(&work, &model);
    let mut c = kfp_cmd(&work, &input, &api);
    c.args(["--dry-run", "--json"]).env("LORA_IMAGE", "registry.example/lora:test");
    let out = run_ok(c);
    let m: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(m["apiVersion"], "trainer.kubeflow.org/v1alpha1");
    assert_eq!(m["kind"], "TrainJob");
    assert_eq!(m["metadata"]["namespace"], "team-nlp");
    let name = m["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("lora-") && name.len() == 17, "{name}");
    let t = &m["spec"]["trainer"];
    assert_eq!(t["image"], "registry.example/lora:test");
    assert_eq!(t["numNodes"], 2);
    assert_eq!(t["numProcPerNode"], 1);
    assert_eq!(t["resourcesPerNode"]["limits"]["nvidia.com/gpu"], 1);
    let dir = work.join("pvc/.lora-trainjob").join(name);
    let args: Vec<&str> = t["args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let pos = |f: &str| args[args.iter().position(|a| *a == f).unwrap() + 1];
    assert_eq!(pos("--params"), dir.join("params.json").to_str().unwrap());
    assert_eq!(pos("--dataset"), dir.join("dataset").join(capitals().file_name().unwrap()).to_str().unwrap());
    assert!(seen.lock().unwrap().is_empty(), "no request");
    assert!(!work.join("pvc/.lora-trainjob").exists(), "nothing written");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_dataset_on_the_workspace_is_read_where_it_is() {
    let work = temp_dir("launch-dry-pvc");
    let model = tiny_model(&work.join("base"), DType::F32);
    let on_pvc = work.join("pvc/data/train.jsonl");
    std::fs::create_dir_all(on_pvc.parent().unwrap()).unwrap();
    std::fs::copy(capitals(), &on_pvc).unwrap();
    let input = executor_input_with(&work, &model, |i| i["inputs"]["artifacts"]["dataset"]["artifacts"][0]["uri"] = json!(on_pvc));
    let mut c = kfp_cmd(&work, &input, "http://127.0.0.1:1");
    c.args(["--dry-run", "--json"]);
    let m: Value = serde_json::from_slice(&run_ok(c).stdout).unwrap();
    let args: Vec<&str> = m["spec"]["trainer"]["args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(args[args.iter().position(|a| *a == "--dataset").unwrap() + 1], on_pvc.to_str().unwrap());
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn bad_launcher_input_exits_2_before_any_request() {
    let work = temp_dir("launch-bad");
    let model = tiny_model(&work.join("base"), DType::F32);
    let (api, seen) = serve(Box::new(|_, _| (500, status(500, "must not be called"))));
    let cases: [(&str, Box<dyn Fn(&mut Value)>, Option<(&str, &str)>); 4] = [
        ("is on none of the volume mounts of kubernetes_config.volume_mounts", Box::new(|i| i["inputs"]["parameterValues"]["kubernetes_config"]["volume_mounts"] = json!([])), None),
        ("training_resource_gpu_per_worker=0", Box::new(|i| i["inputs"]["parameterValues"]["training_resource_gpu_per_worker"] = json!(0.0)), None),
        ("the dataset artifact path", Box::new(|i| i["inputs"]["artifacts"]["dataset"]["artifacts"][0]["uri"] = json!("/nonexistent/train.jsonl")), None),
        ("LORA_TRAINJOB_POLL_SECONDS=\"soon\": must be a number of seconds", Box::new(|_| {}), Some(("LORA_TRAINJOB_POLL_SECONDS", "soon"))),
    ];
    for (want, edit, var) in cases {
        let input = executor_input_with(&work, &model, |i| edit(i));
        let mut c = kfp_cmd(&work, &input, &api);
        if let Some((k, v)) = var {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{want}: {stderr}");
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
    assert!(seen.lock().unwrap().is_empty(), "no request");
    let _ = std::fs::remove_dir_all(&work);
}

/// A minimal run manifest, as rank 0 writes it into its model.
fn run_manifest() -> String {
    let inputs = json!({ "name": "tiny", "commit": null, "files": {} });
    json!({ "format": "lora-run/1", "binary": "lora 0", "device": "cpu", "model": inputs, "dataset": inputs, "plugins": {}, "params": {} }).to_string()
}

#[test]
fn sigterm_during_the_output_copy_leaves_the_previous_outputs_as_they_were() {
    let work = temp_dir("launch-copy-term");
    let model = tiny_model(&work.join("base"), DType::F32);
    let pvc = work.join("pvc");
    let fifo = Arc::new(Mutex::new(None::<PathBuf>));
    let f = fifo.clone();
    let (api, seen) = serve(Box::new(move |r: &Seen, _| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => {
            // What the workers would leave: a model whose one file is a FIFO, so that the
            // launcher's copy blocks in it until the test opens its other end.
            let m: Value = serde_json::from_str(&r.body).unwrap();
            let dir = pvc.join(".lora-trainjob").join(m["metadata"]["name"].as_str().unwrap());
            std::fs::create_dir_all(dir.join("output_model")).unwrap();
            std::fs::write(dir.join("output_model/run_manifest.json"), run_manifest()).unwrap();
            std::fs::write(dir.join("output_metrics.json"), "{}").unwrap();
            std::fs::write(dir.join("output_loss_chart.html"), "<html></html>").unwrap();
            let p = dir.join("output_model/slow.safetensors");
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            *f.lock().unwrap() = Some(p);
            (201, r.body.clone())
        }
        ("GET", p) if p.starts_with(&format!("{JOBS}/")) => {
            (200, job(&p[JOBS.len() + 1..], json!([{ "type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "" }])))
        }
        ("GET", p) if p.starts_with("/api/v1/namespaces/team-nlp/pods?") => (200, json!({ "items": [] }).to_string()),
        _ => (404, status(404, "NotFound")),
    }));
    // A previous attempt's output model, which a cancelled copy must not damage.
    std::fs::create_dir_all(work.join("kfp/model")).unwrap();
    std::fs::write(work.join("kfp/model/previous.txt"), "previous").unwrap();
    let input = executor_input(&work, &model);
    let child = kfp_cmd(&work, &input, &api).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let partial = || std::fs::read_dir(work.join("kfp")).unwrap().filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().contains("lora-partial")).count();
    let t0 = std::time::Instant::now();
    while partial() == 0 {
        assert!(t0.elapsed().as_secs() < 60, "the launcher never started copying its outputs");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: a signal to the child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The other end of the FIFO (non-blocking: an error, not a hang, if the launcher is not in it).
    use std::os::unix::fs::OpenOptionsExt;
    let end = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(fifo.lock().unwrap().as_ref().unwrap());
    drop(end.expect("the launcher's copy is reading the FIFO"));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cancelled while copying"), "{stderr}");
    assert_eq!(std::fs::read_to_string(work.join("kfp/model/previous.txt")).unwrap(), "previous", "the previous output is intact");
    assert_eq!(std::fs::read_dir(work.join("kfp/model")).unwrap().count(), 1, "nothing half-copied in it");
    assert_eq!(partial(), 0, "the staged copy is removed");
    assert!(!work.join("kfp/executor_output.json").exists());
    assert!(!seen.lock().unwrap().iter().any(|r| r.method == "DELETE"), "a completed TrainJob is left for inspection");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn in_a_kfp_pod_the_trainjob_is_named_after_and_owned_by_the_pod() {
    let work = temp_dir("launch-dry-kfp");
    let model = tiny_model(&work.join("base"), DType::F32);
    let input = executor_input(&work, &model);
    let dry = |uid: &str, pod_ns: &str| -> Value {
        let mut c = kfp_cmd(&work, &input, "http://127.0.0.1:1");
        c.args(["--dry-run", "--json"]).env("KFP_POD_NAME", "tune-7xk2p-system-container-impl-1234").env("KFP_POD_UID", uid).env("LORA_KUBE_POD_NAMESPACE", pod_ns);
        serde_json::from_slice(&run_ok(c).stdout).unwrap()
    };
    let a = dry("0c6e2f7e-1111-4d3a-9c51-5b8a2f0d9e01", "team-nlp");
    let name = a["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("lora-") && name.len() == 17, "{name}");
    assert_eq!(dry("0c6e2f7e-1111-4d3a-9c51-5b8a2f0d9e01", "team-nlp")["metadata"]["name"], name, "the same pod: the same TrainJob");
    assert_ne!(dry("9f3b1c2d-2222-4d3a-9c51-5b8a2f0d9e02", "team-nlp")["metadata"]["name"], name, "another pod: another TrainJob");
    assert_eq!(a["metadata"]["annotations"]["lora.kubeflow.org/kfp-pod"], "tune-7xk2p-system-container-impl-1234");
    assert_eq!(
        a["metadata"]["ownerReferences"],
        json!([{ "apiVersion": "v1", "kind": "Pod", "name": "tune-7xk2p-system-container-impl-1234", "uid": "0c6e2f7e-1111-4d3a-9c51-5b8a2f0d9e01" }])
    );
    // The TrainJob in another namespace than the pod's: no owner (they cannot cross namespaces).
    let b = dry("0c6e2f7e-1111-4d3a-9c51-5b8a2f0d9e01", "kubeflow");
    assert!(b["metadata"].get("ownerReferences").is_none(), "{b}");
    assert_eq!(b["metadata"]["annotations"]["lora.kubeflow.org/kfp-pod"], "tune-7xk2p-system-container-impl-1234");
    // Outside KFP: a fresh name each time, no tie.
    let mut c = kfp_cmd(&work, &input, "http://127.0.0.1:1");
    c.args(["--dry-run", "--json"]);
    let m: Value = serde_json::from_slice(&run_ok(c).stdout).unwrap();
    assert_ne!(m["metadata"]["name"], name);
    assert!(m["metadata"].get("ownerReferences").is_none() && m["metadata"]["annotations"].get("lora.kubeflow.org/kfp-pod").is_none(), "{m}");
    let _ = std::fs::remove_dir_all(&work);
}
