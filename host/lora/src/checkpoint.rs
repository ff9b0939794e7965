//! Checkpoints and the resume rule.
//!
//! Layout: `<pvc_path>/checkpoints/checkpoint-<step>/` with
//! - `adapter_model.safetensors` + `adapter_config.json`: the adapter at that step (a PEFT adapter);
//! - `optimizer.safetensors`: AdamW moments (`<key>.exp_avg`, `<key>.exp_avg_sq`);
//! - `trainer_state.json`: the engine's state (optimizer step count, micro-batch counter, dropout
//!   stream seed), the data position (epoch, step in epoch), the run history so far (losses,
//!   logged rows: the scheduler replays them and the chart covers the whole run);
//! - `run_manifest.json`: the manifest of the run that wrote it;
//! - `complete`: written last.
//!
//! A checkpoint is written into `.checkpoint-<step>.tmp-<pid>/` and renamed into place, so a
//! `checkpoint-<step>` folder is always whole; a killed write leaves only a temp folder, removed
//! by the next run. Only the `save_total_limit` newest are kept.
//!
//! Resume rule (`training_resume=auto`): the newest complete checkpoint decides. If its manifest's
//! resume key equals this run's, the run continues after its step; if not, the run stops with the
//! list of what changed and how to start fresh (`training_resume=never`, or remove the folder).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use lora_engine::NamedTensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::Manifest;
use crate::report::History;

/// Where the run is: `step` optimizer steps are done; the next one is step `step_in_epoch` of epoch
/// `epoch` (0-based) of the data plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: String,
    pub position: Position,
    /// The engine's `TrainerState::meta` (step count, micro-batch counter, dropout stream seed).
    pub trainer: Value,
    /// The random streams and how they are derived, for people (all follow from `training_seed`
    /// and the counters above; nothing else is random).
    pub rng: Value,
    pub resume_key: String,
    pub history: History,
}

impl CheckpointState {
    pub const FORMAT: &'static str = "lora-checkpoint/1";
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error(
        "training_resume=auto: the newest checkpoint {path} was written by a different run; what changed:\n  {}\n\
         Resuming would mix two runs. To start fresh, set training_resume=never (old checkpoints are removed) \
         or remove {root}; to resume, run again with the inputs it was written with",
        changes.join("\n  "), root = path.parent().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    Mismatch { path: PathBuf, changes: Vec<String> },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io { what, path: path.to_path_buf(), source }
}

// ---- safetensors (f32), small and exact ---------------------------------------------------

/// Encodes f32 tensors as a safetensors file.
pub fn encode_safetensors(tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap_or(Value::Null));
    }
    let mut offset = 0usize;
    for t in tensors {
        let bytes = t.data.len() * 4;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for t in tensors {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Decodes an f32 safetensors file written by [`encode_safetensors`] (or any F32 one).
pub fn decode_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<NamedTensor>, CheckpointError> {
    let bad = |why: String| CheckpointError::Damaged { path: path.to_path_buf(), why };
    let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(|| bad("shorter than a header".into()))?.try_into().unwrap()) as usize;
    let head = bytes.get(8..8 + n).ok_or_else(|| bad("header runs past the end".into()))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(head).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        if info["dtype"] != "F32" {
            return Err(bad(format!("tensor {name}: dtype {} (checkpoints hold F32)", info["dtype"])));
        }
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone()).map_err(|e| bad(format!("tensor {name}: shape {e}")))?;
        let offs: [usize; 2] =
            serde_json::from_value(info["data_offsets"].clone()).map_err(|e| bad(format!("tensor {name}: offsets {e}")))?;
        let raw = data.get(offs[0]..offs[1]).filter(|r| r.len() == shape.iter().product::<usize>() * 4);
        let raw = raw.ok_or_else(|| bad(format!("tensor {name}: data does not match shape {shape:?}")))?;
        let values = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        out.push(NamedTensor { name, shape, data: values });
    }
    Ok(out)
}

// ---- writing ---------------------------------------------------------------------------------

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = fs::File::create(path).map_err(io("creating", path))?;
    f.write_all(bytes).map_err(io("writing", path))?;
    f.sync_all().map_err(io("syncing", path))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The step number of a `checkpoint-<step>` folder name.
fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?.parse().ok()
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = step_of(&name)?;
            e.path().join("complete").is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Removes temp folders of checkpoint writes that were killed.
pub fn remove_stale_temps(root: &Path) {
    for e in fs::read_dir(root).into_iter().flatten().filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Removes every checkpoint under `root` (`training_resume=never`). Returns how many.
pub fn remove_all(root: &Path) -> Result<usize, CheckpointError> {
    let all = list(root);
    for (_, dir) in &all {
        fs::remove_dir_all(dir).map_err(io("removing", dir))?;
    }
    Ok(all.len())
}

/// Fault injection for the kill test (`tests/e2e`): `LORA_FAULT_INJECT=checkpoint-mid:<step>`
/// aborts the process half-way through writing checkpoint `<step>`, as a SIGKILL would.
fn fault_point(name: &str, step: u64) {
    if let Ok(spec) = std::env::var("LORA_FAULT_INJECT")
        && spec == format!("{name}:{step}")
    {
        eprintln!("lora: LORA_FAULT_INJECT={spec}: aborting now");
        std::process::abort();
    }
}

/// Everything a checkpoint holds, ready to write.
pub struct Snapshot<'a> {
    pub state: &'a CheckpointState,
    /// Adapter values under their PEFT keys.
    pub adapter: &'a [NamedTensor],
    /// AdamW moments (`.exp_avg`, `.exp_avg_sq`).
    pub optimizer: &'a [NamedTensor],
    /// `adapter_config.json` content.
    pub adapter_config: &'a [u8],
    pub manifest: &'a Manifest,
}

/// Writes `checkpoint-<step>` atomically under `root` and prunes to the `keep` newest (`0`: keep
/// all). Returns the checkpoint folder.
pub fn save(root: &Path, snap: &Snapshot, keep: u64) -> Result<PathBuf, CheckpointError> {
    let step = snap.state.position.step;
    fs::create_dir_all(root).map_err(io("creating", root))?;
    let tmp = root.join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_synced(&tmp.join("adapter_model.safetensors"), &encode_safetensors(snap.adapter, &meta))?;
    fault_point("checkpoint-mid", step);
    write_synced(&tmp.join("optimizer.safetensors"), &encode_safetensors(snap.optimizer, &BTreeMap::new()))?;
    write_synced(&tmp.join("adapter_config.json"), snap.adapter_config)?;
    let state = serde_json::to_vec_pretty(snap.state).expect("checkpoint state serialises");
    write_synced(&tmp.join("trainer_state.json"), &state)?;
    let manifest = serde_json::to_vec_pretty(snap.manifest).expect("manifest serialises");
    write_synced(&tmp.join("run_manifest.json"), &manifest)?;
    write_synced(&tmp.join("complete"), format!("step {step}\n").as_bytes())?;
    sync_dir(&tmp);
    let dest = root.join(format!("checkpoint-{step}"));
    if dest.exists() {
        let old = root.join(format!(".checkpoint-{step}.tmp-{}-old", std::process::id()));
        fs::rename(&dest, &old).map_err(io("moving aside", &dest))?;
        fs::rename(&tmp, &dest).map_err(io("renaming into", &dest))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, &dest).map_err(io("renaming into", &dest))?;
    }
    sync_dir(root);
    if keep > 0 {
        let all = list(root);
        let excess = all.len().saturating_sub(keep as usize);
        for (_, dir) in all.into_iter().take(excess) {
            fs::remove_dir_all(&dir).map_err(io("removing old checkpoint", &dir))?;
        }
    }
    Ok(dest)
}

/// A checkpoint read back: its state and the tensors the engine's `load_state` wants (adapter
/// values and moments).
pub struct Loaded {
    pub path: PathBuf,
    pub state: CheckpointState,
    pub tensors: Vec<NamedTensor>,
}

pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let read = |name: &str| -> Result<Vec<u8>, CheckpointError> {
        let p = dir.join(name);
        fs::read(&p).map_err(io("reading", &p))
    };
    let state: CheckpointState = serde_json::from_slice(&read("trainer_state.json")?)
        .map_err(|e| CheckpointError::Damaged { path: dir.join("trainer_state.json"), why: e.to_string() })?;
    if state.format != CheckpointState::FORMAT {
        return Err(CheckpointError::Damaged { path: dir.to_path_buf(), why: format!("format `{}`", state.format) });
    }
    let mut tensors = decode_safetensors(&read("adapter_model.safetensors")?, &dir.join("adapter_model.safetensors"))?;
    tensors.extend(decode_safetensors(&read("optimizer.safetensors")?, &dir.join("optimizer.safetensors"))?);
    Ok(Loaded { path: dir.to_path_buf(), state, tensors })
}

/// The resume rule: `Ok(Some(dir))` to resume from, `Ok(None)` to start fresh (no checkpoint),
/// `Err(Mismatch)` when the newest checkpoint belongs to a different run.
pub fn find_resumable(root: &Path, current: &Manifest) -> Result<Option<PathBuf>, CheckpointError> {
    let Some((_, newest)) = list(root).pop() else { return Ok(None) };
    let path = newest.join("run_manifest.json");
    let text = fs::read(&path).map_err(io("reading", &path))?;
    let older: Manifest = serde_json::from_slice(&text).map_err(|e| CheckpointError::Damaged { path: path.clone(), why: e.to_string() })?;
    if older.resume_key() == current.resume_key() {
        return Ok(Some(newest));
    }
    let mut changes = current.differences(&older);
    if changes.is_empty() {
        changes.push("the manifest format or binary changed".into());
    }
    Err(CheckpointError::Mismatch { path: newest, changes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Inputs;

    fn manifest(lr: f64) -> Manifest {
        let mut params = serde_json::Map::new();
        params.insert("training_learning_rate".into(), serde_json::json!(lr));
        Manifest {
            format: Manifest::FORMAT.into(),
            binary: "lora test".into(),
            device: "cpu".into(),
            model: Inputs::default(),
            dataset: Inputs::default(),
            plugins: BTreeMap::new(),
            params,
            trackers: serde_json::Value::Null,
        }
    }

    fn state(step: u64, key: &str) -> CheckpointState {
        CheckpointState {
            format: CheckpointState::FORMAT.into(),
            position: Position { step, epoch: 0, step_in_epoch: step },
            trainer: serde_json::json!({"step": step}),
            rng: Value::Null,
            resume_key: key.into(),
            history: History { losses: vec![1.0; step as usize], ..Default::default() },
        }
    }

    fn tensor(name: &str, v: f32) -> NamedTensor {
        NamedTensor { name: name.into(), shape: vec![2, 3], data: vec![v, -v, v * 0.5, 1e-30, f32::MAX, 0.0] }
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lora-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn save_load_round_trip_is_exact_and_keeps_the_newest() {
        let root = temp("roundtrip");
        let m = manifest(2e-4);
        for step in [2, 4, 6, 8] {
            let st = state(step, &m.resume_key());
            let snap = Snapshot {
                state: &st,
                adapter: &[tensor("a.lora_A.weight", step as f32)],
                optimizer: &[tensor("a.lora_A.weight.exp_avg", 0.1), tensor("a.lora_A.weight.exp_avg_sq", 0.2)],
                adapter_config: b"{}",
                manifest: &m,
            };
            save(&root, &snap, 3).unwrap();
        }
        let steps: Vec<u64> = list(&root).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![4, 6, 8]);
        let dir = find_resumable(&root, &m).unwrap().unwrap();
        assert!(dir.ends_with("checkpoint-8"));
        let loaded = load(&dir).unwrap();
        assert_eq!(loaded.state, state(8, &m.resume_key()));
        assert_eq!(loaded.tensors.len(), 3);
        let a = loaded.tensors.iter().find(|t| t.name == "a.lora_A.weight").unwrap();
        assert_eq!(a, &tensor("a.lora_A.weight", 8.0));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_checkpoint_of_another_run_is_refused_naming_the_change() {
        let root = temp("mismatch");
        let old = manifest(2e-4);
        let st = state(3, &old.resume_key());
        save(&root, &Snapshot { state: &st, adapter: &[], optimizer: &[], adapter_config: b"{}", manifest: &old }, 3).unwrap();
        let err = find_resumable(&root, &manifest(1e-4)).unwrap_err().to_string();
        assert!(err.contains("params.training_learning_rate: 0.0002 → 0.0001"), "{err}");
        assert!(err.contains("training_resume=never"), "{err}");
        assert_eq!(remove_all(&root).unwrap(), 1);
        assert!(find_resumable(&root, &manifest(1e-4)).unwrap().is_none());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn an_incomplete_write_is_never_resumed_and_is_cleaned_up() {
        let root = temp("partial");
        let m = manifest(2e-4);
        // A killed write: temp folder without `complete`, and a folder named like a checkpoint
        // but without the marker.
        fs::create_dir_all(root.join(".checkpoint-5.tmp-999")).unwrap();
        fs::create_dir_all(root.join("checkpoint-7")).unwrap();
        fs::write(root.join("checkpoint-7/adapter_model.safetensors"), b"half").unwrap();
        assert!(find_resumable(&root, &m).unwrap().is_none());
        remove_stale_temps(&root);
        assert!(!root.join(".checkpoint-5.tmp-999").exists());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn damaged_safetensors_are_named() {
        let p = Path::new("x/adapter_model.safetensors");
        assert!(decode_safetensors(b"\x05", p).unwrap_err().to_string().contains("x/adapter_model.safetensors"));
        let mut bytes = encode_safetensors(&[tensor("t", 1.0)], &BTreeMap::new());
        bytes.truncate(bytes.len() - 4);
        assert!(decode_safetensors(&bytes, p).unwrap_err().to_string().contains("tensor t"));
    }
}
