//! The TrainJob as built, checked against the v2.3 TrainJob types (kubeflow/trainer
//! `pkg/apis/trainer/v1alpha1/trainjob_types.go`, Apache-2.0, read at commit 0015772c2 of the
//! v2.3 line, which has `runtimePatches` and `trainerStatus`; the CRD YAML of the v2.3.0 tag could
//! not be fetched here, so it is not kept as test data): which fields exist where, their types
//! and limits; and against a manifest written out by hand from those facts.

use super::*;
use serde_json::json;

/// A KFP TaskConfig as the driver passes it with the KUBERNETES_VOLUMES, ENV, RESOURCES,
/// node selector, tolerations and affinity passthroughs: the workspace PVC included.
fn task_config() -> Map<String, Value> {
    json!({
        "volumes": [{ "name": "kfp-workspace", "persistentVolumeClaim": { "claimName": "run-42-workspace" } }],
        "volume_mounts": [{ "name": "kfp-workspace", "mountPath": "/kfp-workspace" }],
        "env": [{ "name": "HF_TOKEN", "valueFrom": { "secretKeyRef": { "name": "hf", "key": "token" } } }],
        "resources": { "limits": { "memory": "64Gi" } },
        "node_selector": { "nvidia.com/gpu.product": "NVIDIA-H200" },
        "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }],
        "affinity": { "nodeAffinity": {} },
    })
    .as_object()
    .unwrap()
    .clone()
}

fn params() -> lora_params::Params {
    lora_params::Params {
        training_resource_num_workers: 2,
        training_resource_gpu_per_worker: 1,
        training_resource_num_procs_per_worker: "auto".into(),
        training_resource_cpu_per_worker: "8".into(),
        training_resource_memory_per_worker: "64Gi".into(),
        training_envs: "HF_HOME=/kfp-workspace/hf, NCCL_DEBUG=WARN".into(),
        training_metadata_labels: "team=nlp,kueue.x-k8s.io/queue-name=gpu".into(),
        training_metadata_annotations: "owner=ana@example.com".into(),
        kubernetes_config: Some(task_config()),
        ..Default::default()
    }
}

fn launch() -> Launch {
    Launch {
        name: "lora-3f9a2c".into(),
        namespace: "team-nlp".into(),
        image: "ghcr.io/lora-rs/lora:0.1.0".into(),
        runtime: DEFAULT_RUNTIME.into(),
        pvc_path: "/kfp-workspace".into(),
        dataset: Some("/kfp-workspace/.lora-trainjob/lora-3f9a2c/dataset/train.jsonl".into()),
    }
}

fn err(p: &lora_params::Params, l: &Launch) -> String {
    format!("{:#}", manifest(p, l).expect_err("must be refused"))
}

#[test]
fn the_manifest_is_the_one_written_from_the_v2_3_types() {
    let got = manifest(&params(), &launch()).unwrap();
    let dir = "/kfp-workspace/.lora-trainjob/lora-3f9a2c";
    let want = json!({
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {
            "name": "lora-3f9a2c",
            "namespace": "team-nlp",
            "labels": { "team": "nlp", "kueue.x-k8s.io/queue-name": "gpu", "app.kubernetes.io/managed-by": "lora" },
            "annotations": { "owner": "ana@example.com" },
        },
        "spec": {
            "runtimeRef": { "name": "torch-distributed", "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime" },
            "trainer": {
                "image": "ghcr.io/lora-rs/lora:0.1.0",
                "command": ["lora", "train"],
                "args": [
                    "--params", format!("{dir}/params.json"),
                    "--pvc-path", "/kfp-workspace",
                    "--output-model", format!("{dir}/output_model"),
                    "--output-metrics", format!("{dir}/output_metrics.json"),
                    "--output-loss-chart", format!("{dir}/output_loss_chart.html"),
                    "--dataset", format!("{dir}/dataset/train.jsonl"),
                ],
                "env": [
                    { "name": "HF_HOME", "value": "/kfp-workspace/hf" },
                    { "name": "NCCL_DEBUG", "value": "WARN" },
                    { "name": "HF_TOKEN", "valueFrom": { "secretKeyRef": { "name": "hf", "key": "token" } } },
                ],
                "numNodes": 2,
                // `auto` with 1 GPU per worker: 1, written out (not the runtime's `auto`).
                "numProcPerNode": 1,
                "resourcesPerNode": {
                    "requests": { "cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 1 },
                    "limits": { "memory": "64Gi", "nvidia.com/gpu": 1 },
                },
            },
            "runtimePatches": [{
                "manager": "lora",
                "trainingRuntimeSpec": { "template": { "spec": { "replicatedJobs": [{
                    "name": "node",
                    "template": { "spec": { "template": {
                        "metadata": {
                            "labels": { "team": "nlp", "kueue.x-k8s.io/queue-name": "gpu" },
                            "annotations": { "owner": "ana@example.com" },
                        },
                        "spec": {
                            "volumes": [{ "name": "kfp-workspace", "persistentVolumeClaim": { "claimName": "run-42-workspace" } }],
                            "containers": [{ "name": "node", "volumeMounts": [{ "name": "kfp-workspace", "mountPath": "/kfp-workspace" }] }],
                            "nodeSelector": { "nvidia.com/gpu.product": "NVIDIA-H200" },
                            "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }],
                            "affinity": { "nodeAffinity": {} },
                        },
                    } } },
                }] } } },
            }],
        },
    });
    assert_eq!(got, want, "got:\n{}", serde_json::to_string_pretty(&got).unwrap());
    assert!(conforms(&got).is_empty(), "{:?}", conforms(&got));
}

/// Where a field may be, by JSON path with `[]` for list items, from the v2.3 types: the
/// TrainJob fields we may write and the Kubernetes objects (pod spec pieces) below them, which
/// are the TaskConfig's own and left to the API server.
const FIELDS: &[(&str, &[&str])] = &[
    ("", &["apiVersion", "kind", "metadata", "spec"]),
    (".metadata", &["name", "namespace", "labels", "annotations"]),
    (".spec", &["runtimeRef", "initializer", "trainer", "runtimePatches", "suspend", "activeDeadlineSeconds", "managedBy"]),
    (".spec.runtimeRef", &["name", "apiGroup", "kind"]),
    (".spec.trainer", &["image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"]),
    (".spec.trainer.resourcesPerNode", &["claims", "limits", "requests"]),
    (".spec.runtimePatches[]", &["manager", "time", "trainingRuntimeSpec"]),
    (".spec.runtimePatches[].trainingRuntimeSpec", &["template"]),
    (".spec.runtimePatches[].trainingRuntimeSpec.template", &["metadata", "spec"]),
    (".spec.runtimePatches[].trainingRuntimeSpec.template.spec", &["replicatedJobs"]),
    (".spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[]", &["name", "template"]),
    (".spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template", &["metadata", "spec"]),
    (".spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template.spec", &["template"]),
    (".spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template.spec.template", &["metadata", "spec"]),
    (".spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template.spec.template.metadata", &["labels", "annotations"]),
    (
        ".spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template.spec.template.spec",
        &["serviceAccountName", "volumes", "initContainers", "containers", "imagePullSecrets", "securityContext", "nodeSelector", "affinity", "tolerations", "schedulingGates"],
    ),
    // ContainerPatch: `env` exists, but the Trainer refuses it for the `node` container.
    (".spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template.spec.template.spec.containers[]", &["name", "volumeMounts", "securityContext"]),
];

/// Below these the objects are Kubernetes' own types, passed through from the TaskConfig.
const OPAQUE: &[&str] = &["labels", "annotations", "env[]", "limits", "requests", "volumes[]", "volumeMounts[]", "nodeSelector", "tolerations[]", "affinity"];

/// Everything in `v` that the v2.3 types do not allow, or allow otherwise.
fn conforms(v: &Value) -> Vec<String> {
    fn walk(path: &str, v: &Value, out: &mut Vec<String>) {
        if OPAQUE.iter().any(|o| path.ends_with(&format!(".{o}"))) {
            return;
        }
        match v {
            Value::Object(m) => match FIELDS.iter().find(|(p, _)| *p == path) {
                Some((_, allowed)) => {
                    for (k, child) in m {
                        if !allowed.contains(&k.as_str()) {
                            out.push(format!("{path}.{k}: no such field"));
                        } else {
                            walk(&format!("{path}.{k}"), child, out);
                        }
                    }
                }
                None => out.push(format!("{path}: an object where the types have none")),
            },
            Value::Array(items) => items.iter().for_each(|i| walk(&format!("{path}[]"), i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    let s = &v["spec"];
    let t = &s["trainer"];
    // +required, MinLength 1, MaxLength 253.
    let name = s["runtimeRef"]["name"].as_str().unwrap_or_default();
    if name.is_empty() || name.len() > 253 {
        out.push("spec.runtimeRef.name: 1 to 253 characters".into());
    }
    // The CRD's rules on metadata.name.
    let job = v["metadata"]["name"].as_str().unwrap_or_default();
    if job.len() > 63 || check_name(job).is_err() {
        out.push("metadata.name: an RFC 1035 label of at most 63 characters".into());
    }
    // *int32, both.
    for k in ["numNodes", "numProcPerNode"] {
        if !t[k].as_i64().is_some_and(|n| (1..=i32::MAX as i64).contains(&n)) {
            out.push(format!("spec.trainer.{k}: an int32 >= 1 (not a string: the CRD says type integer)"));
        }
    }
    if t["image"].as_str().is_none_or(|i| i.len() > 500) {
        out.push("spec.trainer.image: a string of at most 500 characters".into());
    }
    for k in ["command", "args"] {
        let ok = t[k].as_array().is_some_and(|a| a.len() <= 128 && a.iter().all(|s| s.as_str().is_some_and(|s| s.len() <= 65536)));
        if !ok {
            out.push(format!("spec.trainer.{k}: at most 128 strings"));
        }
    }
    // listType=map keyed by name, at most 128.
    let env = t["env"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<&str> = env.iter().filter_map(|e| e["name"].as_str()).collect();
    names.sort();
    names.dedup();
    if names.len() != env.len() || env.len() > 128 {
        out.push("spec.trainer.env: unique names, at most 128".into());
    }
    for q in ["requests", "limits"] {
        for (k, val) in t["resourcesPerNode"][q].as_object().into_iter().flatten() {
            // int-or-string quantities (the CRD's pattern, roughly).
            let ok = val.is_u64() || val.as_str().is_some_and(|s| !s.is_empty() && s.starts_with(|c: char| c.is_ascii_digit() || c == '.'));
            if !ok {
                out.push(format!("spec.trainer.resourcesPerNode.{q}.{k}: a quantity"));
            }
        }
    }
    for p in s["runtimePatches"].as_array().into_iter().flatten() {
        if p["manager"].as_str().is_none_or(|m| m.is_empty() || m.len() > 253) {
            out.push("spec.runtimePatches[].manager: required, 1 to 253 characters".into());
        }
        for j in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"].as_array().into_iter().flatten() {
            if j["name"].as_str().is_none_or(|n| check_name(n).is_err() && !n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())) {
                out.push("replicatedJobs[].name: required, a DNS label".into());
            }
            for c in j["template"]["spec"]["template"]["spec"]["containers"].as_array().into_iter().flatten() {
                if c.get("env").is_some() && c["name"] == NODE {
                    out.push("containers[node].env: the Trainer refuses env patches of the node container".into());
                }
            }
        }
    }
    out
}

#[test]
fn the_schema_check_catches_what_the_types_do_not_allow() {
    // The checker itself must fail on what v2.3 would refuse, or the test above proves nothing.
    let mut bad = manifest(&params(), &launch()).unwrap();
    bad["spec"]["trainer"]["numProcPerNode"] = json!("auto");
    bad["spec"]["podTemplateOverrides"] = json!([]);
    bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["env"] =
        json!([{ "name": "A", "value": "1" }]);
    let found = conforms(&bad);
    assert!(found.iter().any(|f| f.contains("numProcPerNode")), "{found:?}");
    assert!(found.iter().any(|f| f.contains("podTemplateOverrides: no such field")), "{found:?}");
    assert!(found.iter().any(|f| f.contains("containers[node].env")), "{found:?}");
}

#[test]
fn a_minimal_run_gets_only_what_it_asks_for() {
    let p = lora_params::Params {
        training_resource_num_workers: 3,
        training_resource_gpu_per_worker: 1,
        training_resource_num_procs_per_worker: "auto".into(),
        kubernetes_config: Some(json!({ "volumes": [{ "name": "ws", "emptyDir": {} }], "volumeMounts": [{ "name": "ws", "mountPath": "/kfp-workspace" }] }).as_object().unwrap().clone()),
        ..Default::default()
    };
    let l = Launch { dataset: None, runtime: "training-hub".into(), ..launch() };
    let m = manifest(&p, &l).unwrap();
    assert!(conforms(&m).is_empty(), "{:?}", conforms(&m));
    let t = &m["spec"]["trainer"];
    assert_eq!(m["spec"]["runtimeRef"]["name"], "training-hub");
    assert_eq!((t["numNodes"].clone(), t["numProcPerNode"].clone()), (json!(3), json!(1)));
    // The reference's defaults: 4 CPUs, 32Gi.
    assert_eq!(t["resourcesPerNode"], json!({ "requests": { "cpu": "4", "memory": "32Gi", "nvidia.com/gpu": 1 }, "limits": { "nvidia.com/gpu": 1 } }));
    assert!(t.get("env").is_none());
    assert!(!t["args"].as_array().unwrap().contains(&json!("--dataset")));
    assert_eq!(m["metadata"]["labels"], json!({ "app.kubernetes.io/managed-by": "lora" }));
    assert!(m["metadata"].get("annotations").is_none());
    let pod = &m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"];
    assert!(pod.get("metadata").is_none());
    let mut keys: Vec<_> = pod["spec"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, vec!["containers", "volumes"]);
}

#[test]
fn what_the_trainjob_cannot_run_is_refused_naming_the_parameter() {
    let l = launch();
    let with = |f: &dyn Fn(&mut lora_params::Params)| {
        let mut p = params();
        f(&mut p);
        err(&p, &l)
    };
    let e = with(&|p| p.training_resource_gpu_per_worker = 0);
    assert!(e.contains("training_resource_gpu_per_worker=0") && e.contains("NCCL"), "{e}");
    let e = with(&|p| p.training_resource_num_procs_per_worker = "8".into());
    assert!(e.contains("training_resource_num_procs_per_worker=8") && e.contains("training_resource_gpu_per_worker=1"), "{e}");
    // Several processes per pod would need a torchrun-like parent the image lacks.
    let e = with(&|p| p.training_resource_gpu_per_worker = 4);
    assert!(e.contains("training_resource_num_procs_per_worker=auto (here 4 processes per pod)") && e.contains("one process per pod"), "{e}");
    let e = with(&|p| p.training_resource_num_procs_per_worker = "many".into());
    assert!(e.contains("training_resource_num_procs_per_worker=\"many\""), "{e}");
    let e = with(&|p| p.training_envs = "PET_MASTER_PORT=1234".into());
    assert!(e.contains("training_envs: PET_MASTER_PORT is set by the TrainJob's torch runtime"), "{e}");
    let e = with(&|p| p.training_envs = "HF_TOKEN=x".into());
    assert!(e.contains("kubernetes_config.env: HF_TOKEN is already set by training_envs"), "{e}");
    let e = with(&|p| p.training_envs = "NOEQUALS".into());
    assert!(e.contains("training_envs: \"NOEQUALS\" is not KEY=VALUE"), "{e}");
    let e = with(&|p| {
        p.kubernetes_config.as_mut().unwrap().insert("resources".into(), json!({ "requests": { "cpu": "2" } }));
    });
    assert!(e.contains("kubernetes_config.resources.requests.cpu=\"2\" disagrees with training_resource_cpu_per_worker=\"8\""), "{e}");
    let e = with(&|p| {
        p.kubernetes_config.as_mut().unwrap().insert("resources".into(), json!({ "limit": {} }));
    });
    assert!(e.contains("kubernetes_config.resources.limit: not a field"), "{e}");
    let e = with(&|p| {
        p.kubernetes_config.as_mut().unwrap().insert("init_containers".into(), json!([]));
    });
    assert!(e.contains("kubernetes_config.init_containers: not a TaskConfig field"), "{e}");
    let e = with(&|p| {
        p.kubernetes_config.as_mut().unwrap().remove("volume_mounts");
    });
    assert!(e.contains("pvc_path /kfp-workspace: is on none of the volume mounts"), "{e}");
    let e = with(&|p| {
        p.kubernetes_config.as_mut().unwrap().insert("volumes".into(), json!([]));
    });
    assert!(e.contains("kubernetes_config.volume_mounts[0]: mounts volume \"kfp-workspace\""), "{e}");
    let e = with(&|p| {
        p.kubernetes_config.as_mut().unwrap().insert("env".into(), json!([{ "value": "x" }]));
    });
    assert!(e.contains("kubernetes_config.env[0]: has no string `name`"), "{e}");
    let e = with(&|p| {
        p.kubernetes_config.as_mut().unwrap().insert("node_selector".into(), json!({ "gpu": 1 }));
    });
    assert!(e.contains("kubernetes_config.node_selector.gpu"), "{e}");
    for name in ["Lora-1", "1lora", "lora-", &"a".repeat(64), "lora_1"] {
        let e = err(&params(), &Launch { name: name.to_owned(), ..launch() });
        assert!(e.contains("RFC 1035"), "{name}: {e}");
    }
}

#[test]
fn the_runtime_name_comes_from_the_environment_when_set() {
    assert_eq!(runtime_name(&[]).unwrap(), "torch-distributed");
    let env = |v: &str| vec![(RUNTIME_ENV.to_owned(), v.to_owned())];
    assert_eq!(runtime_name(&env(" training-hub ")).unwrap(), "training-hub");
    assert!(runtime_name(&env("")).unwrap_err().to_string().contains("LORA_TRAINJOB_RUNTIME"));
}

#[test]
fn a_trainjob_is_needed_for_several_pods_only() {
    let p = |w, g| lora_params::Params { training_resource_num_workers: w, training_resource_gpu_per_worker: g, ..Default::default() };
    assert!(!needed(&p(1, 1)) && !needed(&p(1, 0)) && !needed(&p(1, 4)));
    assert!(needed(&p(2, 1)));
}

fn job(conditions: Value) -> Value {
    json!({ "apiVersion": API_VERSION, "kind": "TrainJob", "metadata": { "name": "lora-3f9a2c" }, "status": { "conditions": conditions } })
}

fn cond(t: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({ "type": t, "status": status, "reason": reason, "message": message, "lastTransitionTime": "2026-12-02T14:00:00Z" })
}

#[test]
fn the_phase_comes_from_the_conditions_that_hold() {
    assert_eq!(phase(&json!({ "metadata": {} })), Phase::Active);
    assert_eq!(phase(&job(json!([]))), Phase::Active);
    assert_eq!(phase(&job(json!([cond("Suspended", "False", "Resumed", "")]))), Phase::Active);
    assert_eq!(phase(&job(json!([cond("Suspended", "True", "Suspended", "")]))), Phase::Suspended);
    assert_eq!(phase(&job(json!([cond("Complete", "True", "JobsCompleted", "done")]))), Phase::Complete);
    assert_eq!(phase(&job(json!([cond("Complete", "False", "", "")]))), Phase::Active);
    let failed = cond("Failed", "True", "JobsFailed", "jobset failed: node-0 exited 1");
    assert_eq!(
        phase(&job(json!([cond("Complete", "True", "JobsCompleted", ""), failed]))),
        Phase::Failed { reason: "JobsFailed".into(), message: "jobset failed: node-0 exited 1".into() }
    );
}

fn pod(name: &str, index: &str, created: &str, status: Value) -> Value {
    json!({
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": "lora-3f9a2c",
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "batch.kubernetes.io/job-completion-index": index,
            },
        },
        "status": status,
    })
}

#[test]
fn node_0_and_the_failed_pods_are_found_by_their_labels_and_states() {
    let running = json!({ "phase": "Running", "containerStatuses": [{ "name": "node", "state": { "running": {} } }] });
    let killed = json!({ "phase": "Failed", "containerStatuses": [{ "name": "node", "state": { "terminated": { "exitCode": 137, "reason": "OOMKilled" } } }] });
    let ok = json!({ "phase": "Succeeded", "containerStatuses": [{ "name": "node", "state": { "terminated": { "exitCode": 0 } } }] });
    let evicted = json!({ "phase": "Failed", "reason": "Evicted" });
    let pods = json!({ "items": [
        pod("lora-3f9a2c-node-0-0-old", "0", "2026-12-02T14:00:00Z", ok.clone()),
        pod("lora-3f9a2c-node-0-1-abcde", "1", "2026-12-02T14:00:00Z", killed),
        pod("lora-3f9a2c-node-0-0-new", "0", "2026-12-02T14:05:00Z", running),
        pod("lora-3f9a2c-node-0-2-fghij", "2", "2026-12-02T14:00:00Z", evicted),
    ] });
    assert_eq!(node0_pod(&pods).as_deref(), Some("lora-3f9a2c-node-0-0-new"));
    assert_eq!(node0_pod(&json!({ "items": [] })), None);
    assert_eq!(
        failed_pods(&pods),
        vec![
            ("lora-3f9a2c-node-0-1-abcde".to_owned(), "1".to_owned(), "exit code 137 (OOMKilled)".to_owned()),
            ("lora-3f9a2c-node-0-2-fghij".to_owned(), "2".to_owned(), "Evicted".to_owned()),
        ]
    );
    assert_eq!(pods_selector("lora-3f9a2c"), "jobset.sigs.k8s.io/jobset-name=lora-3f9a2c");
}
