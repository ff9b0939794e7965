//! The KFP v2 container contract: the executor input the launcher passes (`{{$}}`), the local
//! paths of artifact URIs, and the `executor_output.json` the launcher reads on exit 0.
//! Shapes follow kfp's `dsl/executor.py` and `dsl/types/artifact_types.py` (kfp 2.17) and the
//! `ExecutorInput`/`ExecutorOutput` messages of `pipeline_spec.proto`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::request::RunOutcome;

/// The artifacts of the component, by name, and their KFP schema titles.
pub const INPUT_ARTIFACTS: [(&str, &str); 1] = [("dataset", "system.Dataset")];
pub const OUTPUT_ARTIFACTS: [(&str, &str); 3] = [
    ("output_model", "system.Model"),
    ("output_metrics", "system.Metrics"),
    ("output_loss_chart", "system.HTML"),
];
/// The string return value of the reference component.
pub const OUTPUT_PARAMETER: &str = "Output";
/// The workspace parameter (an input path, not a training parameter).
pub const PVC_PATH: &str = "pvc_path";
/// Where KFP mounts the pipeline workspace (`kfp.dsl.constants.WORKSPACE_MOUNT_PATH`).
pub const WORKSPACE_MOUNT_PATH: &str = "/kfp-workspace";

#[derive(Debug, thiserror::Error)]
pub enum KfpError {
    #[error("cannot read the executor input file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the executor input is not valid JSON of the KFP ExecutorInput shape: {0}")]
    Parse(serde_json::Error),
    #[error(
        "the executor input has no {what}; KFP's launcher always passes it (is this the `{{{{$}}}}` placeholder of a compiled pipeline?)"
    )]
    Missing { what: String },
    #[error("inputs.parameterValues.pvc_path must be a string path, got {0}")]
    PvcPath(Value),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `ExecutorInput` as the launcher serialises it (protobuf JSON, camelCase). Unknown fields
/// are ignored; absent maps are empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorInput {
    #[serde(default)]
    pub inputs: Inputs,
    #[serde(default)]
    pub outputs: Outputs,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inputs {
    /// Parameter values; an optional parameter left unset is absent or `null`.
    #[serde(default)]
    pub parameter_values: Map<String, Value>,
    #[serde(default)]
    pub artifacts: BTreeMap<String, ArtifactList>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outputs {
    #[serde(default)]
    pub parameters: BTreeMap<String, OutputParameter>,
    #[serde(default)]
    pub artifacts: BTreeMap<String, ArtifactList>,
    /// Where to write `executor_output.json`.
    #[serde(default)]
    pub output_file: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputParameter {
    #[serde(default)]
    pub output_file: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArtifactList {
    #[serde(default)]
    pub artifacts: Vec<RuntimeArtifact>,
}

/// `RuntimeArtifact`: the fields we use (`type` and others are kept only as far as we echo them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeArtifact {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<Value>,
    #[serde(default)]
    pub uri: String,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

impl RuntimeArtifact {
    /// The local path of this artifact inside the container, as kfp's `Artifact.path` computes
    /// it: `gs://` → `/gcs/`, `s3://` → `/s3/`, `minio://` → `/minio/`, `oci://a/b` → `/oci/a_b`
    /// (a model under `oci://` lives in its `/models`), and metadata `_kfp_workspace: true` puts
    /// it under `/kfp-workspace/.artifacts/`.
    pub fn local_path(&self, is_model: bool) -> PathBuf {
        let uri = self.uri.as_str();
        let mut local = if let Some(rest) = uri.strip_prefix("gs://") {
            format!("/gcs/{rest}")
        } else if let Some(rest) = uri.strip_prefix("minio://") {
            format!("/minio/{rest}")
        } else if let Some(rest) = uri.strip_prefix("s3://") {
            format!("/s3/{rest}")
        } else if let Some(rest) = uri.strip_prefix("oci://") {
            format!("/oci/{}", rest.replace('/', "_"))
        } else {
            uri.to_owned()
        };
        if self.metadata.get("_kfp_workspace") == Some(&Value::Bool(true)) {
            local = format!(
                "{WORKSPACE_MOUNT_PATH}/.artifacts/{}",
                local.trim_start_matches('/')
            );
        }
        if is_model && uri.starts_with("oci://") {
            local.push_str("/models");
        }
        PathBuf::from(local)
    }
}

impl ExecutorInput {
    /// Parses the `--executor-input` argument: the JSON itself, or `@FILE` to read it from a file.
    pub fn parse_arg(arg: &str) -> Result<Self, KfpError> {
        let text = match arg.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path).map_err(|source| KfpError::Read {
                path: PathBuf::from(path),
                source,
            })?,
            None => arg.to_owned(),
        };
        serde_json::from_str(&text).map_err(KfpError::Parse)
    }

    /// The first artifact of input `name`, if it was given.
    pub fn input_artifact(&self, name: &str) -> Option<&RuntimeArtifact> {
        self.inputs
            .artifacts
            .get(name)
            .and_then(|l| l.artifacts.first())
    }

    /// The first artifact of output `name`.
    pub fn output_artifact(&self, name: &str) -> Option<&RuntimeArtifact> {
        self.outputs
            .artifacts
            .get(name)
            .and_then(|l| l.artifacts.first())
    }

    /// The local path of output artifact `name`; an error if the executor input lacks it.
    pub fn output_path(&self, name: &str) -> Result<PathBuf, KfpError> {
        self.output_artifact(name)
            .map(|a| a.local_path(name == "output_model"))
            .ok_or_else(|| KfpError::Missing {
                what: format!("outputs.artifacts.{name}"),
            })
    }

    /// `pvc_path` (required by the component).
    pub fn pvc_path(&self) -> Result<PathBuf, KfpError> {
        match self.inputs.parameter_values.get(PVC_PATH) {
            Some(Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
            None | Some(Value::Null) => Err(KfpError::Missing {
                what: "inputs.parameterValues.pvc_path".into(),
            }),
            Some(v) => Err(KfpError::PvcPath(v.clone())),
        }
    }

    /// The training parameters among `parameterValues` (everything except `pvc_path`).
    pub fn training_parameters(&self) -> Map<String, Value> {
        self.inputs
            .parameter_values
            .iter()
            .filter(|(k, _)| k.as_str() != PVC_PATH)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// `outputs.outputFile`.
    pub fn executor_output_file(&self) -> Option<PathBuf> {
        self.outputs
            .output_file
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    }

    /// `outputs.parameters.Output.outputFile`.
    pub fn output_parameter_file(&self) -> Option<PathBuf> {
        self.outputs
            .parameters
            .get(OUTPUT_PARAMETER)
            .map(|p| &p.output_file)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    }
}

/// The `ExecutorOutput` for a finished run: the `Output` string, and every output artifact with
/// its name, uri and metadata (metrics as the metadata of `output_metrics`).
pub fn executor_output(input: &ExecutorInput, outcome: &RunOutcome) -> Value {
    let mut artifacts = Map::new();
    for (name, list) in &input.outputs.artifacts {
        let Some(given) = list.artifacts.first() else {
            continue;
        };
        let mut metadata = given.metadata.clone();
        let extra = match name.as_str() {
            "output_metrics" => Some(&outcome.metrics),
            "output_model" => Some(&outcome.model_metadata),
            _ => None,
        };
        if let Some(extra) = extra {
            for (k, v) in extra {
                metadata.insert(k.clone(), v.clone());
            }
        }
        let artifact =
            serde_json::json!({ "name": given.name, "uri": given.uri, "metadata": metadata });
        artifacts.insert(name.clone(), serde_json::json!({ "artifacts": [artifact] }));
    }
    serde_json::json!({
        "parameterValues": { OUTPUT_PARAMETER: outcome.output },
        "artifacts": artifacts,
    })
}

/// Writes `executor_output.json` to `outputs.outputFile` and the `Output` parameter file (when
/// the executor input names one), each atomically. Returns the executor output path, if any.
pub fn write_executor_output(
    input: &ExecutorInput,
    outcome: &RunOutcome,
) -> Result<Option<PathBuf>, KfpError> {
    if let Some(path) = input.output_parameter_file() {
        write_atomic(&path, outcome.output.as_bytes())?;
    }
    let Some(path) = input.executor_output_file() else {
        return Ok(None);
    };
    let json = executor_output(input, outcome);
    write_atomic(&path, json.to_string().as_bytes())?;
    Ok(Some(path))
}

/// Writes `bytes` to `path` atomically, following no link ([`crate::fs::write_atomic`]), then
/// removes what dead runs left there ([`crate::run::outputs::remove_dead_leftovers`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KfpError> {
    crate::fs::write_atomic(path, bytes).map_err(|source| KfpError::Write { path: path.to_path_buf(), source })?;
    crate::run::outputs::remove_dead_leftovers(path);
    Ok(())
}
