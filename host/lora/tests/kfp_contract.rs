//! The KFP contract: the executor input as the launcher writes it (tests/kfp/executor_input.json,
//! built from the compiled example pipeline by tests/kfp/test_kfp.py), URI → local path mapping,
//! the executor_output.json writer (golden tests/kfp/executor_output.golden.json, which
//! test_kfp.py parses as kfp's ExecutorOutput proto), and the component spec golden.
//! `LORA_BLESS=1` rewrites the goldens.

use std::path::{Path, PathBuf};

use lora::kfp::{ExecutorInput, RuntimeArtifact, write_executor_output};
use lora::request::RunOutcome;
use serde_json::{Map, Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> ExecutorInput {
    let path = repo().join("tests/kfp/executor_input.json");
    ExecutorInput::parse_arg(&format!("@{}", path.display())).expect("the fixture parses")
}

/// Compares `got` with the golden file, or rewrites it under LORA_BLESS=1; prints a line diff.
fn golden(path: &Path, got: &str) {
    if std::env::var_os("LORA_BLESS").is_some() {
        std::fs::write(path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    if want != got {
        let mut diff = String::new();
        for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
            if w != g {
                diff.push_str(&format!("line {}:\n- {w}\n+ {g}\n", i + 1));
            }
        }
        if want.lines().count() != got.lines().count() {
            diff.push_str(&format!(
                "line counts: golden {} vs now {}\n",
                want.lines().count(),
                got.lines().count()
            ));
        }
        panic!(
            "{} differs from what is generated now (LORA_BLESS=1 re-blesses):\n{diff}",
            path.display()
        );
    }
}

#[test]
fn reads_every_field_of_the_launchers_executor_input() {
    let ei = fixture();
    assert_eq!(ei.pvc_path().unwrap(), PathBuf::from("/kfp-workspace"));
    let params = ei.training_parameters();
    assert!(!params.contains_key("pvc_path"));
    assert_eq!(params["training_lora_r"], json!(8.0));
    assert!(params["kubernetes_config"].is_object());
    assert!(
        !params.contains_key("training_bf16"),
        "unset optional values are absent"
    );
    let base = "/minio/mlpipeline/v2/artifacts/lora-finetune/run-1/lora/exec-7/";
    assert_eq!(
        ei.output_path("output_model").unwrap(),
        PathBuf::from(format!("{base}output_model"))
    );
    assert_eq!(
        ei.output_path("output_metrics").unwrap(),
        PathBuf::from(format!("{base}output_metrics"))
    );
    assert_eq!(
        ei.output_path("output_loss_chart").unwrap(),
        PathBuf::from(format!("{base}output_loss_chart"))
    );
    assert_eq!(
        ei.executor_output_file(),
        Some(PathBuf::from("/tmp/kfp_outputs/output_metadata.json"))
    );
    assert_eq!(
        ei.output_parameter_file(),
        Some(PathBuf::from("/tmp/kfp/outputs/Output"))
    );
    let ds = ei.input_artifact("dataset").unwrap();
    assert_eq!(
        ds.local_path(false),
        PathBuf::from("/minio/mlpipeline/v2/artifacts/imported/train.jsonl")
    );
    assert_eq!(
        ds.metadata["artifact_path"],
        json!("s3://datasets/chat/train.jsonl")
    );

    // The parameters load and validate as a whole.
    let mut loader = lora_params::Loader::new();
    loader.apply_kfp(&params);
    let r = loader
        .finish()
        .expect("the example pipeline's parameters are valid");
    assert_eq!(
        (r.lora_r, r.lora_alpha, r.num_epochs, r.seed),
        (8, 16, 2, 42)
    );
    assert_eq!(r.lr_scheduler, "cosine");
}

#[test]
fn maps_uris_to_local_paths_like_kfp() {
    let art = |uri: &str, ws: bool| RuntimeArtifact {
        uri: uri.into(),
        metadata: if ws {
            Map::from_iter([("_kfp_workspace".to_string(), Value::Bool(true))])
        } else {
            Map::new()
        },
        ..Default::default()
    };
    let cases = [
        (art("gs://b/p/x", false), false, "/gcs/b/p/x"),
        (art("s3://b/p/x", false), false, "/s3/b/p/x"),
        (art("minio://b/p/x", false), false, "/minio/b/p/x"),
        (art("oci://reg/img:tag", false), false, "/oci/reg_img:tag"),
        (
            art("oci://reg/img:tag", false),
            true,
            "/oci/reg_img:tag/models",
        ),
        (art("/local/x", false), false, "/local/x"),
        (
            art("minio://b/x", true),
            false,
            "/kfp-workspace/.artifacts/minio/b/x",
        ),
    ];
    for (a, model, want) in cases {
        assert_eq!(a.local_path(model), PathBuf::from(want), "{}", a.uri);
    }
}

#[test]
fn missing_or_malformed_executor_input_is_a_clear_error() {
    let err = ExecutorInput::parse_arg("{\"inputs\": ")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not valid JSON"), "{err}");
    let err = ExecutorInput::parse_arg("@/nonexistent/ei.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/ei.json"), "{err}");
    let ei = ExecutorInput::parse_arg("{}").unwrap();
    assert!(
        ei.output_path("output_model")
            .unwrap_err()
            .to_string()
            .contains("outputs.artifacts.output_model")
    );
    assert!(ei.pvc_path().unwrap_err().to_string().contains("pvc_path"));
    let ei =
        ExecutorInput::parse_arg(r#"{"inputs": {"parameterValues": {"pvc_path": 3}}}"#).unwrap();
    assert!(
        ei.pvc_path()
            .unwrap_err()
            .to_string()
            .contains("must be a string")
    );
}

#[test]
fn executor_output_lists_every_artifact_metrics_and_output() {
    let dir = std::env::temp_dir().join(format!("lora-kfp-writer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut ei = fixture();
    let out_file = dir.join("kfp_outputs/output_metadata.json");
    let param_file = dir.join("kfp/outputs/Output");
    ei.outputs.output_file = Some(out_file.display().to_string());
    ei.outputs.parameters.get_mut("Output").unwrap().output_file = param_file.display().to_string();
    let outcome = RunOutcome {
        output: "training completed".into(),
        metrics: Map::from_iter([
            ("final_loss".to_string(), json!(1.25)),
            ("min_loss".to_string(), json!(1.125)),
            ("total_steps".to_string(), json!(12)),
        ]),
        model_metadata: Map::from_iter([(
            "base_model".to_string(),
            json!("Qwen/Qwen2.5-0.5B-Instruct"),
        )]),
    };
    let written = write_executor_output(&ei, &outcome).unwrap();
    assert_eq!(written, Some(out_file.clone()));
    assert_eq!(
        std::fs::read_to_string(&param_file).unwrap(),
        "training completed"
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["parameterValues"]["Output"], json!("training completed"));
    for name in ["output_model", "output_metrics", "output_loss_chart"] {
        let a = &v["artifacts"][name]["artifacts"][0];
        assert_eq!(
            a["uri"],
            json!(format!(
                "minio://mlpipeline/v2/artifacts/lora-finetune/run-1/lora/exec-7/{name}"
            ))
        );
        assert!(
            a["name"].is_string() && a["metadata"].is_object(),
            "{name}: {a}"
        );
    }
    assert_eq!(
        v["artifacts"]["output_metrics"]["artifacts"][0]["metadata"]["final_loss"],
        json!(1.25)
    );
    assert_eq!(
        v["artifacts"]["output_model"]["artifacts"][0]["metadata"]["base_model"],
        json!("Qwen/Qwen2.5-0.5B-Instruct")
    );
    // Nothing half-written is left next to the outputs.
    let leftovers: Vec<_> = std::fs::read_dir(out_file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    golden(
        &repo().join("tests/kfp/executor_output.golden.json"),
        &(serde_json::to_string_pretty(&v).unwrap() + "\n"),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn component_spec_matches_the_checked_in_file() {
    let yaml = lora::component::component_yaml().unwrap();
    golden(&repo().join("examples/kfp/lora.component.yaml"), &yaml);
}

#[test]
fn component_spec_inputs_come_from_the_parameter_table() {
    let spec = lora::component::component_spec();
    let params = spec["components"]["comp-lora"]["inputDefinitions"]["parameters"]
        .as_object()
        .unwrap();
    assert_eq!(
        params.len(),
        lora_params::PARAMS.len() + 1,
        "every parameter plus pvc_path"
    );
    assert_eq!(params["training_lora_r"]["defaultValue"], json!(16.0));
    assert_eq!(
        params["training_lora_r"]["parameterType"],
        json!("NUMBER_INTEGER")
    );
    assert_eq!(
        params["training_learning_rate"].get("defaultValue"),
        None,
        "unset optional: no default"
    );
    assert_eq!(
        params["kubernetes_config"]["parameterType"],
        json!("TASK_CONFIG")
    );
    assert_eq!(
        params["pvc_path"].get("isOptional"),
        None,
        "pvc_path is required"
    );
    let outs = &spec["components"]["comp-lora"]["outputDefinitions"];
    assert_eq!(
        outs["parameters"]["Output"]["parameterType"],
        json!("STRING")
    );
    assert_eq!(
        outs["artifacts"]["output_metrics"]["artifactType"]["schemaTitle"],
        json!("system.Metrics")
    );
    assert_eq!(
        spec["deploymentSpec"]["executors"]["exec-lora"]["container"]["command"],
        json!(["lora", "kfp", "--executor-input", "{{$}}"])
    );
}
