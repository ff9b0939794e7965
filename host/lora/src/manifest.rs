//! The run manifest: what a run was made of, by content (sha256 of the model files, dataset files,
//! tokenizer, plugins), plus the resolved parameters and the binary version. It is written with
//! the outputs (`run_manifest.json`) and into every checkpoint.
//!
//! Its `resume_key` covers only what changes the trained adapter: a checkpoint resumes a run whose
//! key is equal. Parameters that only change where or how often things are written or logged
//! (`training_save_steps`, `training_logging_steps`, resources, labels, ...) are recorded but left
//! out of the key, so changing them does not block a resume.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::hub::hex;

/// Parameters recorded in the manifest but not part of the resume key: they do not change the
/// trained adapter.
pub const NOT_IN_RESUME_KEY: &[&str] = &[
    "training_merged_dtype",
    "training_save_steps",
    "training_save_total_limit",
    "training_checkpoint_at_epoch",
    "training_logging_steps",
    "training_eval_steps",
    "training_envs",
    "training_resume",
    "training_gradient_checkpointing",
    "training_data_output_dir",
    "training_resource_cpu_per_worker",
    "training_resource_gpu_per_worker",
    "training_resource_memory_per_worker",
    "training_resource_num_procs_per_worker",
    "training_resource_num_workers",
    "training_metadata_labels",
    "training_metadata_annotations",
    "training_wandb_project",
    "training_wandb_entity",
    "training_wandb_run_name",
    "training_tensorboard_log_dir",
    "kubernetes_config",
    "pvc_path",
    "dataset",
    "output_model",
    "output_metrics",
    "output_loss_chart",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// `lora <version>`.
    pub binary: String,
    /// The commit the binary was built from (`-dirty`: with uncommitted changes; `unknown`
    /// without git); for people, not part of the resume key (the version is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// The device the run computes on (`cpu`, `cuda:0`): bit-identity holds per backend.
    pub device: String,
    pub model: Inputs,
    pub dataset: Inputs,
    /// Plugin files by `kind=path`, with their sha256.
    pub plugins: BTreeMap<String, String>,
    /// Every parameter as the run uses it (snake_case names).
    pub params: Map<String, Value>,
    /// Warnings the run was started with (a `training_max_seq_len` relying on RoPE scaling), for
    /// people; not part of the resume key (they follow from what is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// With 4-bit or 8-bit: how the base projections are held (what the checkpoint or the
    /// quantization at load gave), their size, and what the merged model is folded into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Value>,
    /// The experiment trackers enabled and where they write (`crate::trackers`); not part of
    /// the resume key.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub trackers: Value,
}

/// A set of input files and their sha256, and where they came from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Inputs {
    /// The hub id or folder the user named.
    pub name: String,
    /// The hub commit, for hub models.
    pub commit: Option<String>,
    /// File name (relative to the folder) → sha256.
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("hashing {path} for the run manifest: {source}")]
pub struct HashError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// sha256 of a file's content, streamed.
pub fn sha256_file(path: &Path) -> Result<String, HashError> {
    let err = |source| HashError { path: path.to_path_buf(), source };
    let mut f = fs::File::open(path).map_err(err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Hashes the files directly in `dir` whose names pass `keep` (symlinks followed: HF cache
/// snapshots are links into blobs).
pub fn hash_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, String>, HashError> {
    let mut out = BTreeMap::new();
    let entries = fs::read_dir(dir).map_err(|source| HashError { path: dir.to_path_buf(), source })?;
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        if path.is_file() && keep(&name) {
            out.insert(name, sha256_file(&path)?);
        }
    }
    Ok(out)
}

/// The files of a model folder that define the model and its tokenizer.
pub fn is_model_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".json") || name.ends_with(".jinja") || name == "tokenizer.model"
}

/// sha256 of `value` serialised canonically (object keys sorted).
pub fn canonical_hash(value: &Value) -> String {
    fn canon(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, canon(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(canon).collect()),
            other => other.clone(),
        }
    }
    hex(&Sha256::digest(canon(value).to_string().as_bytes()))
}

impl Manifest {
    pub const FORMAT: &'static str = "lora-run-manifest/1";

    /// What decides the trained adapter, as JSON: everything except [`NOT_IN_RESUME_KEY`]
    /// parameters and the names the inputs were given by (a model folder or dataset moved to
    /// another path is the same input: its content hashes decide).
    pub fn resume_view(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(params) = v.get_mut("params").and_then(Value::as_object_mut) {
            params.retain(|k, _| !NOT_IN_RESUME_KEY.contains(&k.as_str()));
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("notes");
            o.remove("trackers");
            o.remove("build");
        }
        for input in ["model", "dataset"] {
            if let Some(o) = v.get_mut(input).and_then(Value::as_object_mut) {
                o.remove("name");
            }
        }
        v
    }

    /// The key a checkpoint must match to be resumed.
    pub fn resume_key(&self) -> String {
        canonical_hash(&self.resume_view())
    }

    /// A short run id for reporters (first 16 hex digits of the resume key).
    pub fn run_id(&self) -> String {
        self.resume_key()[..16].to_string()
    }

    /// What differs between `self` and `older` in the resume view, one `path: old → new` line each.
    pub fn differences(&self, older: &Manifest) -> Vec<String> {
        let mut out = Vec::new();
        diff("", &older.resume_view(), &self.resume_view(), &mut out);
        out
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 { format!("{}…", &s[..s.char_indices().nth(77).map_or(s.len(), |(i, _)| i)]) } else { s }
}

fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&p, x, y, out),
                    (Some(x), None) => out.push(format!("{p}: {} → (absent)", short(x))),
                    (None, Some(y)) => out.push(format!("{p}: (absent) → {}", short(y))),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {} → {}", short(a), short(b))),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(lr: f64, save_steps: u64) -> Manifest {
        let mut params = Map::new();
        params.insert("training_learning_rate".into(), json!(lr));
        params.insert("training_save_steps".into(), json!(save_steps));
        Manifest {
            format: Manifest::FORMAT.into(),
            binary: "lora 0.1.0".into(),
            build: None,
            device: "cpu".into(),
            model: Inputs { name: "m".into(), commit: None, files: [("model.safetensors".to_string(), "aa".to_string())].into() },
            dataset: Inputs::default(),
            plugins: BTreeMap::new(),
            params,
            notes: Vec::new(),
            quantization: None,
            trackers: Value::Null,
        }
    }

    #[test]
    fn the_resume_key_ignores_where_and_how_often_things_are_written() {
        assert_eq!(manifest(2e-4, 500).resume_key(), manifest(2e-4, 10).resume_key());
        let mut moved = manifest(2e-4, 500);
        moved.model.name = "/elsewhere/m".into();
        assert_eq!(moved.resume_key(), manifest(2e-4, 500).resume_key(), "the content decides, not the folder name");
        assert_ne!(manifest(2e-4, 500).resume_key(), manifest(1e-4, 500).resume_key());
    }

    #[test]
    fn differences_name_what_changed() {
        let mut newer = manifest(1e-4, 500);
        newer.model.files.insert("model.safetensors".into(), "bb".into());
        let d = newer.differences(&manifest(2e-4, 500));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("model.files.model.safetensors: \"aa\" → \"bb\"")), "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("params.training_learning_rate: 0.0002 → 0.0001")), "{d:?}");
    }

    #[test]
    fn canonical_hash_does_not_depend_on_key_order() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":3,"y":2},"b":1}"#).unwrap();
        assert_eq!(canonical_hash(&a), canonical_hash(&b));
    }
}
