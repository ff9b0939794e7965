//! The hand-off from the commands (`train`, `kfp`) to the run: everything a run needs, already
//! validated and resolved, and what a run gives back.

use std::path::PathBuf;

use lora_params::ResolvedParams;
use serde_json::{Map, Value};

/// One run, fully described. Built by `lora train` (flags) or `lora kfp` (executor input).
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub params: ResolvedParams,
    pub dataset: DatasetInput,
    pub outputs: OutputPaths,
    /// The workspace root (`pvc_path`): `dataset/train`, `checkpoints`, `final_model` live under it.
    pub pvc_path: PathBuf,
    /// The KFP TaskConfig, when given (also in `params.kubernetes_config`); recorded in the manifest.
    pub kubernetes_config: Option<Value>,
    /// True when started by KFP (`lora kfp`): write `executor_output.json` at the end.
    pub kfp: Option<crate::kfp::ExecutorInput>,
}

/// The training dataset as the caller named it. Resolution order (reference): an existing
/// non-empty `<pvc_path>/dataset/train`, else `path`, else metadata `pvc_path`/`pvc_dir`, else
/// metadata `artifact_path`.
#[derive(Debug, Clone, Default)]
pub struct DatasetInput {
    /// A local file or folder (`--dataset`, or the input artifact's URI mapped to a local path).
    pub path: Option<PathBuf>,
    /// The input artifact's metadata (`pvc_path`, `pvc_dir`, `artifact_path`, ...); empty locally.
    pub metadata: Map<String, Value>,
}

/// Where the run writes its outputs.
#[derive(Debug, Clone)]
pub struct OutputPaths {
    /// The merged model folder (`output_model`); the PEFT adapter goes to `<model>/adapter/`.
    pub model: PathBuf,
    /// The metrics JSON file (`output_metrics`).
    pub metrics: PathBuf,
    /// The self-contained HTML loss chart (`output_loss_chart`).
    pub loss_chart: PathBuf,
    /// KFP's `outputs.outputFile` (`executor_output.json`), when started by KFP.
    pub executor_output: Option<PathBuf>,
    /// KFP's `outputs.parameters.Output.outputFile`, when given.
    pub output_parameter: Option<PathBuf>,
}

/// What a finished run gives back to the command that started it.
#[derive(Debug, Clone, Default)]
pub struct RunOutcome {
    /// The component's string return value (`Output`); the reference returns "training completed".
    pub output: String,
    /// Scalar metrics: the metadata of the `output_metrics` artifact (KFP shows them as a table).
    pub metrics: Map<String, Value>,
    /// Extra metadata for the `output_model` artifact (base model, adapter config, ...).
    pub model_metadata: Map<String, Value>,
}

/// The workspace layout under `pvc_path`, as the reference uses it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Workspace {
    /// `<pvc_path>/dataset/train`: a non-empty one is reused as the dataset.
    pub dataset_train: PathBuf,
    /// `<pvc_path>/checkpoints`: step/epoch checkpoints and `training_metrics.jsonl`.
    pub checkpoints: PathBuf,
    /// `<pvc_path>/final_model`: a copy of the output model.
    pub final_model: PathBuf,
    /// `training_data_output_dir`, or `<pvc_path>/checkpoints/_internal_data_processing`.
    pub data_output_dir: PathBuf,
    /// The default `HF_HOME` under KFP: `<pvc_path>/.cache/huggingface`.
    pub hf_home: PathBuf,
}

/// Where the training dataset comes from, after the reference's resolution order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum DatasetSource {
    /// An existing non-empty `<pvc_path>/dataset/train`.
    Workspace { path: PathBuf },
    /// The input artifact's local path (or `--dataset`).
    Artifact { path: PathBuf },
    /// The input artifact's metadata `pvc_path` / `pvc_dir`.
    MetadataPath { key: String, path: PathBuf },
    /// The input artifact's metadata `artifact_path`: an s3/http(s) file or a Hugging Face dataset id.
    Remote { artifact_path: String },
}

impl DatasetSource {
    /// The local file or folder the dataset is read from (`None` for a remote one).
    pub fn local_path(&self) -> Option<&std::path::Path> {
        match self {
            DatasetSource::Workspace { path } | DatasetSource::Artifact { path } | DatasetSource::MetadataPath { path, .. } => Some(path),
            DatasetSource::Remote { .. } => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("the dataset {what} {path} does not exist")]
    NotFound { what: String, path: PathBuf },
    #[error("dataset input artifact metadata `{key}` must be a string, got {value}")]
    BadMetadata { key: String, value: Value },
    #[error(
        "no training dataset: {workspace} is missing or empty, no dataset path was given (--dataset, or the KFP `dataset` input artifact) and its metadata has no pvc_path, pvc_dir or artifact_path"
    )]
    None { workspace: PathBuf },
}

fn non_empty_dir(p: &std::path::Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some())
}

impl RunRequest {
    /// A local run as `lora train` builds it with the default artifact flags, every output under
    /// `root` (`root/model`, `root/metrics.json`, `root/loss_chart.html`, `root/workspace`).
    /// For tests and embedders.
    pub fn local(
        params: ResolvedParams,
        dataset: Option<PathBuf>,
        root: &std::path::Path,
    ) -> RunRequest {
        RunRequest {
            kubernetes_config: params.kubernetes_config.clone().map(Value::Object),
            params,
            dataset: DatasetInput {
                path: dataset,
                metadata: Map::new(),
            },
            outputs: OutputPaths {
                model: root.join("model"),
                metrics: root.join("metrics.json"),
                loss_chart: root.join("loss_chart.html"),
                executor_output: None,
                output_parameter: None,
            },
            pvc_path: root.join("workspace"),
            kfp: None,
        }
    }

    pub fn workspace(&self) -> Workspace {
        let pvc = &self.pvc_path;
        let checkpoints = pvc.join("checkpoints");
        Workspace {
            dataset_train: pvc.join("dataset").join("train"),
            data_output_dir: self.params.data_output_dir.as_ref().map_or_else(
                || checkpoints.join("_internal_data_processing"),
                PathBuf::from,
            ),
            checkpoints,
            final_model: pvc.join("final_model"),
            hf_home: pvc.join(".cache").join("huggingface"),
        }
    }

    /// Resolves the dataset in the reference's order: an existing non-empty
    /// `<pvc_path>/dataset/train`, the artifact path, metadata `pvc_path`/`pvc_dir`, metadata
    /// `artifact_path`. Local paths must exist.
    pub fn dataset_source(&self) -> Result<DatasetSource, DatasetError> {
        let ws = self.workspace().dataset_train;
        if non_empty_dir(&ws) {
            return Ok(DatasetSource::Workspace { path: ws });
        }
        // The artifact's path when it exists; else its metadata (as the reference does); a
        // path that exists nowhere is named in the error.
        let has_metadata = ["pvc_path", "pvc_dir", "artifact_path"]
            .iter()
            .any(|k| self.dataset.metadata.contains_key(*k));
        if let Some(path) = &self.dataset.path {
            if path.exists() {
                return Ok(DatasetSource::Artifact { path: path.clone() });
            }
            if !has_metadata {
                return Err(DatasetError::NotFound {
                    what: "path".into(),
                    path: path.clone(),
                });
            }
        }
        for key in ["pvc_path", "pvc_dir", "artifact_path"] {
            let Some(v) = self.dataset.metadata.get(key) else {
                continue;
            };
            let Some(s) = v.as_str().filter(|s| !s.is_empty()) else {
                return Err(DatasetError::BadMetadata {
                    key: key.into(),
                    value: v.clone(),
                });
            };
            if key == "artifact_path" {
                return Ok(DatasetSource::Remote {
                    artifact_path: s.to_owned(),
                });
            }
            let path = PathBuf::from(s);
            if !path.exists() {
                return Err(DatasetError::NotFound {
                    what: format!("metadata {key}"),
                    path,
                });
            }
            return Ok(DatasetSource::MetadataPath {
                key: key.into(),
                path,
            });
        }
        Err(DatasetError::None { workspace: ws })
    }
}

/// A model folder that cannot be trained on as this run asks, found before anything is loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelInputError {
    #[error(
        "training_base_model {dir} has no tokenizer.json: lora reads the model's tokenizer from tokenizer.json \
         (the file transformers' fast tokenizers save); add it to the folder"
    )]
    NoTokenizer { dir: PathBuf },
    #[error("training_base_model {dir} has no weights: neither model.safetensors nor model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("training_base_model {dir}: model.safetensors.index.json is not a weights index ({why})")]
    BadIndex { dir: PathBuf, why: String },
    #[error("training_base_model {dir}: model.safetensors.index.json lists the shard {shard}, which is not in the folder")]
    MissingShard { dir: PathBuf, shard: String },
    #[error(
        "training_max_seq_len = {max_seq_len} is above the model's max_position_embeddings {max_pos} ({config}){why}; \
         lower training_max_seq_len to at most {allowed}"
    )]
    SeqLen { max_seq_len: u64, max_pos: usize, allowed: usize, config: PathBuf, why: String },
    #[error(transparent)]
    Config(#[from] lora_engine::EngineError),
}

/// Checks a model folder against the run before anything is loaded: the tokenizer and every
/// weight shard are there, and `training_max_seq_len` fits the model's positions. Returns
/// warnings to log and record (a `training_max_seq_len` that relies on the model's RoPE scaling).
///
/// Sequence length rule: up to `max_position_embeddings` is accepted. Beyond it, a model without
/// RoPE scaling, or with `llama3` scaling (whose `max_position_embeddings` already is the scaled
/// window), is refused; with `linear` or `dynamic` scaling by `factor` up to
/// `max_position_embeddings × factor` is accepted with a warning, and beyond that refused.
pub fn check_model_dir(dir: &std::path::Path, params: &ResolvedParams) -> Result<Vec<String>, ModelInputError> {
    check_model_files(dir, params, true)
}

/// [`check_model_dir`]; with `weights` false the weight files are not looked for (a dry run's
/// hub snapshot holds only the config and tokenizer until the run downloads the weights).
pub fn check_model_files(dir: &std::path::Path, params: &ResolvedParams, weights: bool) -> Result<Vec<String>, ModelInputError> {
    let d = || dir.to_path_buf();
    let index = dir.join("model.safetensors.index.json");
    if weights && index.is_file() {
        let bad = |why: String| ModelInputError::BadIndex { dir: d(), why };
        let text = std::fs::read(&index).map_err(|e| bad(e.to_string()))?;
        let v: Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        if let Some(shard) = shards.iter().find(|s| !dir.join(s).is_file()) {
            return Err(ModelInputError::MissingShard { dir: d(), shard: shard.to_string() });
        }
    } else if weights && !dir.join("model.safetensors").is_file() {
        return Err(ModelInputError::NoWeights { dir: d() });
    }
    if !dir.join("tokenizer.json").is_file() {
        return Err(ModelInputError::NoTokenizer { dir: d() });
    }
    let cfg = lora_engine::ModelConfig::from_model_dir(dir)?;
    let (max_pos, want) = (cfg.max_position_embeddings, params.max_seq_len);
    if want <= max_pos as u64 {
        return Ok(Vec::new());
    }
    let config = dir.join("config.json");
    let (scaling, factor) = match cfg.rope_scaling {
        lora_engine::RopeScaling::Linear { factor } => ("linear", factor),
        lora_engine::RopeScaling::Dynamic { factor } => ("dynamic", factor),
        lora_engine::RopeScaling::Llama3 { .. } | lora_engine::RopeScaling::LongRope { .. } => {
            let kind = if matches!(cfg.rope_scaling, lora_engine::RopeScaling::Llama3 { .. }) { "llama3" } else { "longrope" };
            let why = format!(", which its {kind} RoPE scaling already covers");
            return Err(ModelInputError::SeqLen { max_seq_len: want, max_pos, allowed: max_pos, config, why });
        }
        lora_engine::RopeScaling::None => {
            let why = " and it has no RoPE scaling: positions past it were never trained".to_string();
            return Err(ModelInputError::SeqLen { max_seq_len: want, max_pos, allowed: max_pos, config, why });
        }
    };
    let allowed = (max_pos as f64 * factor).floor() as usize;
    if want > allowed as u64 {
        let why = format!(", even with its {scaling} RoPE scaling (factor {factor}: {allowed} positions)");
        return Err(ModelInputError::SeqLen { max_seq_len: want, max_pos, allowed, config, why });
    }
    Ok(vec![format!(
        "training_max_seq_len = {want} is above the model's max_position_embeddings {max_pos}: sequences past it rely on the model's {scaling} RoPE scaling (factor {factor}, up to {allowed} positions)"
    )])
}

/// How a run's messages name a parameter: `lora train` users type flags
/// (`--training-resume never`), KFP users set parameters (`training_resume=never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamNames {
    Cli,
    Kfp,
}

impl ParamNames {
    pub fn of(req: &RunRequest) -> Self {
        if req.kfp.is_some() { ParamNames::Kfp } else { ParamNames::Cli }
    }

    /// `name` with `value` as it was given: `--training-resume never` or `training_resume=never`.
    pub fn setting(self, name: &str, value: &str) -> String {
        match self {
            ParamNames::Cli => format!("{} {value}", flag(name)),
            ParamNames::Kfp => format!("{name}={value}"),
        }
    }

    /// An instruction to give `name` the value `value`.
    pub fn set_it(self, name: &str, value: &str) -> String {
        match self {
            ParamNames::Cli => format!("pass {}", self.setting(name, value)),
            ParamNames::Kfp => format!("set {}", self.setting(name, value)),
        }
    }

    /// `text` with a leading `params.<name>` (the run manifest's spelling) named as this
    /// run's users name it.
    pub fn in_text(self, text: &str) -> String {
        match text.strip_prefix("params.") {
            Some(rest) => {
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                let name = &rest[..end];
                match self {
                    ParamNames::Cli if lora_params::PARAMS.iter().any(|d| d.name == name) => format!("{}{}", flag(name), &rest[end..]),
                    _ => rest.to_string(),
                }
            }
            None => text.to_string(),
        }
    }
}

fn flag(name: &str) -> String {
    format!("--{}", name.replace('_', "-"))
}
