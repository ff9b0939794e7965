//! The KFP component spec (pipeline IR YAML) of the `lora` container, generated from the
//! parameter definition: what `@dsl.container_component` and kfp's compiler would write for the
//! reference signature, plus the `Output: str` return value and TaskConfig passthroughs.

use lora_params::{Kind, PARAMS};
use serde_json::{Map, Value, json};

use crate::kfp::{INPUT_ARTIFACTS, OUTPUT_ARTIFACTS, OUTPUT_PARAMETER, PVC_PATH};

/// The container image the component runs.
pub const IMAGE: &str = concat!("ghcr.io/lora-rs/lora:", env!("CARGO_PKG_VERSION"));

/// Kubernetes settings KFP forwards in `kubernetes_config` (the TaskConfig) and applies to our
/// own pod: we are the training workload, so resources, env and volumes are ours.
const PASSTHROUGHS: [(&str, bool); 6] = [
    ("RESOURCES", true),
    ("ENV", true),
    ("KUBERNETES_VOLUMES", true),
    ("KUBERNETES_TOLERATIONS", true),
    ("KUBERNETES_NODE_SELECTOR", true),
    ("KUBERNETES_AFFINITY", true),
];

fn artifact_type(title: &str) -> Value {
    json!({ "schemaTitle": title, "schemaVersion": "0.0.1" })
}

/// KFP writes every numeric default as a double (`128.0`).
fn kfp_default(kind: Kind, v: Value) -> Value {
    match (kind, &v) {
        (Kind::Int | Kind::Float, Value::Number(n)) => n.as_f64().map_or(v.clone(), |f| json!(f)),
        _ => v,
    }
}

/// `inputDefinitions` and `outputDefinitions` of the component.
fn interface() -> (Value, Value) {
    let mut params: Vec<(String, Value)> = Vec::new();
    params.push((
        PVC_PATH.to_owned(),
        json!({ "description": "Workspace PVC root path (use dsl.WORKSPACE_PATH_PLACEHOLDER).", "parameterType": "STRING" }),
    ));
    for d in PARAMS {
        let mut spec = Map::new();
        let default = d.default_json();
        if !default.is_null() {
            spec.insert("defaultValue".into(), kfp_default(d.kind, default));
        }
        spec.insert("description".into(), Value::String(d.help.to_owned()));
        spec.insert("isOptional".into(), Value::Bool(true));
        spec.insert(
            "parameterType".into(),
            Value::String(d.kind.kfp_type().to_owned()),
        );
        params.push((d.name.to_owned(), Value::Object(spec)));
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut in_artifacts = Map::new();
    for (name, title) in INPUT_ARTIFACTS {
        in_artifacts.insert(
            name.into(),
            json!({ "artifactType": artifact_type(title), "description": "Input training dataset artifact.", "isOptional": true }),
        );
    }
    let inputs = json!({ "artifacts": in_artifacts, "parameters": Map::from_iter(params) });
    let mut out_artifacts = Map::new();
    for (name, title) in OUTPUT_ARTIFACTS {
        out_artifacts.insert(name.into(), json!({ "artifactType": artifact_type(title) }));
    }
    let outputs = json!({
        "artifacts": out_artifacts,
        "parameters": { OUTPUT_PARAMETER: { "parameterType": "STRING" } },
    });
    (inputs, outputs)
}

/// The component spec as JSON (the pipeline IR of a one-component pipeline, as kfp compiles it).
pub fn component_spec() -> Value {
    let (inputs, outputs) = interface();
    let passthroughs: Vec<Value> = PASSTHROUGHS
        .iter()
        .map(|(f, apply)| {
            if *apply {
                json!({ "applyToTask": true, "field": f })
            } else {
                json!({ "field": f })
            }
        })
        .collect();

    let mut task_params = Map::new();
    for name in inputs["parameters"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
    {
        task_params.insert(name.clone(), json!({ "componentInputParameter": name }));
    }
    let mut task_artifacts = Map::new();
    for (name, _) in INPUT_ARTIFACTS {
        task_artifacts.insert(name.into(), json!({ "componentInputArtifact": name }));
    }
    let mut dag_out_artifacts = Map::new();
    for (name, _) in OUTPUT_ARTIFACTS {
        dag_out_artifacts.insert(
            name.into(),
            json!({ "artifactSelectors": [{ "outputArtifactKey": name, "producerSubtask": "lora" }] }),
        );
    }
    json!({
        "components": {
            "comp-lora": {
                "executorLabel": "exec-lora",
                "inputDefinitions": inputs,
                "outputDefinitions": outputs,
                "taskConfigPassthroughs": passthroughs,
            }
        },
        "deploymentSpec": {
            "executors": {
                "exec-lora": {
                    "container": {
                        "command": ["lora", "kfp", "--executor-input", "{{$}}"],
                        "image": IMAGE,
                    }
                }
            }
        },
        "pipelineInfo": {
            "description": "Train a model with LoRA (Low-Rank Adaptation). Outputs the merged model (adapter in adapter/), training metrics and a loss chart.",
            "name": "lora",
        },
        "root": {
            "dag": {
                "outputs": {
                    "artifacts": dag_out_artifacts,
                    "parameters": {
                        OUTPUT_PARAMETER: { "valueFromParameter": { "outputParameterKey": OUTPUT_PARAMETER, "producerSubtask": "lora" } }
                    },
                },
                "tasks": {
                    "lora": {
                        "cachingOptions": { "enableCache": true },
                        "componentRef": { "name": "comp-lora" },
                        "inputs": { "artifacts": task_artifacts, "parameters": task_params },
                        "taskInfo": { "name": "lora" },
                    }
                },
            },
            "inputDefinitions": inputs,
            "outputDefinitions": outputs,
        },
        "schemaVersion": "2.1.0",
        "sdkVersion": "kfp-2.17.3",
    })
}

/// The component spec as YAML, with a header saying where it comes from.
pub fn component_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&component_spec())?;
    Ok(format!(
        "# PIPELINE DEFINITION\n# Name: lora\n# Generated by `lora component` (lora {}) from the parameter definition; do not edit.\n{body}",
        env!("CARGO_PKG_VERSION")
    ))
}
