//! Checkpoints and the resume rule.
//!
//! Layout: `<pvc_path>/checkpoints/checkpoint-<step>/` with
//! - `adapter_model.safetensors` + `adapter_config.json`: the adapter at that step (a PEFT adapter);
//! - `optimizer.safetensors`: AdamW moments (`<key>.exp_avg`, `<key>.exp_avg_sq`);
//! - `trainer_state.json`: the engine's state (optimizer step count, micro-batch counter, dropout
//!   stream seed), the data position (epoch, step in epoch), the run history so far (losses,
//!   logged rows: the scheduler replays them and the chart covers the whole run);
//! - `run_manifest.json`: the manifest of the run that wrote it;
//! - `complete`: written last, a JSON object with the sha256 of every other file.
//!
//! A checkpoint is written into `.checkpoint-<step>.tmp-<pid>/` and renamed into place, so a
//! `checkpoint-<step>` folder is always whole; a killed write leaves only a temp folder, removed
//! by the next run. Only the `save_total_limit` newest are kept (the next run prunes what a run
//! killed between the rename and the pruning left). A checkpoint holding a non-finite adapter
//! value or optimizer moment is never written: a diverged adapter is never marked complete.
//!
//! Integrity: reading a checkpoint back hashes every file and compares with its `complete`
//! marker; a checkpoint that does not match (a flipped bit, a truncated or edited file) is
//! damaged: it is renamed `checkpoint-<step>.damaged` (kept for inspection, never resumed nor
//! counted) and the next older complete checkpoint is tried, saying so. When none verifies the
//! run starts from the beginning (training is deterministic, so it ends where an uninterrupted
//! run would).
//!
//! Resume rule (`training_resume=auto`): the newest intact checkpoint decides. If its manifest's
//! resume key equals this run's, the run continues after its step; if not, the run stops with the
//! list of what changed and how to start fresh (`training_resume=never`, or remove the folder).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use lora_engine::NamedTensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::hub::hex;
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
        "{auto}: the newest checkpoint {path} was written by a different run; what changed:\n  {}\n\
         Resuming would mix two runs. To start fresh, {never} (old checkpoints are removed) \
         or remove {root}; to resume, run again with the inputs it was written with",
        changes.join("\n  "), root = path.parent().map(|p| p.display().to_string()).unwrap_or_default(),
        auto = names.setting("training_resume", "auto"), never = names.set_it("training_resume", "never")
    )]
    Mismatch { path: PathBuf, changes: Vec<String>, names: crate::request::ParamNames },
    #[error(
        "not writing checkpoint-{step}: {tensor}[{index}] is {value} after step {step}; the adapter or its optimizer state \
         is no longer finite, so no checkpoint of it is marked complete"
    )]
    NonFinite { step: u64, tensor: String, index: usize, value: f32 },
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

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
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

/// Removes temp folders of checkpoint writes that were killed (`.checkpoint-<step>.tmp-<pid>` and
/// the `-old` folders a replacing write moved aside). Only for a run that holds the workspace lock
/// (`crate::run::outputs::WorkspaceLock`): then no other run is writing them.
pub fn remove_stale_temps(root: &Path) {
    for e in fs::read_dir(root).into_iter().flatten().filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Removes every checkpoint under `root` (`training_resume=never`), damaged ones included.
/// Returns how many.
pub fn remove_all(root: &Path) -> Result<usize, CheckpointError> {
    let mut all: Vec<PathBuf> = list(root).into_iter().map(|(_, dir)| dir).collect();
    all.extend(damaged(root));
    for dir in &all {
        fs::remove_dir_all(dir).map_err(io("removing", dir))?;
    }
    Ok(all.len())
}

/// Checkpoints set aside as damaged (`checkpoint-<step>.damaged`).
fn damaged(root: &Path) -> Vec<PathBuf> {
    fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".damaged")).and_then(step_of).is_some())
        .map(|e| e.path())
        .collect()
}

/// Keeps the `keep` newest complete checkpoints under `root` (`0`: all) and removes the others.
/// Returns the removed folders.
pub fn prune(root: &Path, keep: u64) -> Result<Vec<PathBuf>, CheckpointError> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let all = list(root);
    let excess = all.len().saturating_sub(keep as usize);
    let mut removed = Vec::new();
    for (_, dir) in all.into_iter().take(excess) {
        fs::remove_dir_all(&dir).map_err(io("removing old checkpoint", &dir))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// Fault injection for the kill tests (`tests/e2e`): `LORA_FAULT_INJECT=<point>:<step>` aborts
/// the process at that point, as a SIGKILL would. Points: `checkpoint-mid` (half-way through
/// writing checkpoint `<step>`), `checkpoint-prune` (after its rename, before pruning), and the
/// output points of `crate::run::outputs` (`<step>` = the run's last step), and `rank<r>-step`
/// (data-parallel rank `r`, after its micro-batches of step `<step>`). `<point>:<step>:hang`
/// stops there instead, printing its process id, until something kills it from outside (the
/// kill-one-rank test sends it SIGKILL).
pub fn fault_point(name: &str, step: u64) {
    let Some(spec) = std::env::var_os("LORA_FAULT_INJECT") else { return };
    let here = format!("{name}:{step}");
    if spec.to_str() == Some(&here) {
        eprintln!("lora: LORA_FAULT_INJECT={here}: aborting now");
        std::process::abort();
    }
    if spec.to_str() == Some(&format!("{here}:hang")) {
        eprintln!("lora: LORA_FAULT_INJECT={here}:hang: process {} waits to be killed", std::process::id());
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
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

/// The `complete` marker: which files the checkpoint holds, by sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Marker {
    format: String,
    step: u64,
    files: BTreeMap<String, String>,
}

impl Marker {
    const FORMAT: &'static str = "lora-checkpoint-complete/1";
}

/// The files of a checkpoint besides its marker, in the order they are written.
const FILES: [&str; 5] = ["adapter_model.safetensors", "optimizer.safetensors", "adapter_config.json", "trainer_state.json", "run_manifest.json"];

/// The first non-finite value among `tensors`.
fn first_non_finite(tensors: &[NamedTensor]) -> Option<(&str, usize, f32)> {
    tensors.iter().find_map(|t| t.data.iter().position(|v| !v.is_finite()).map(|i| (t.name.as_str(), i, t.data[i])))
}

/// Writes `checkpoint-<step>` atomically under `root` and prunes to the `keep` newest (`0`: keep
/// all). Returns the checkpoint folder. Refuses ([`CheckpointError::NonFinite`]) a snapshot with
/// a non-finite value.
pub fn save(root: &Path, snap: &Snapshot, keep: u64) -> Result<PathBuf, CheckpointError> {
    let step = snap.state.position.step;
    if let Some((tensor, index, value)) = first_non_finite(snap.adapter).or_else(|| first_non_finite(snap.optimizer)) {
        return Err(CheckpointError::NonFinite { step, tensor: tensor.to_string(), index, value });
    }
    fs::create_dir_all(root).map_err(io("creating", root))?;
    let tmp = root.join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let state = serde_json::to_vec_pretty(snap.state).map_err(|e| CheckpointError::Damaged { path: tmp.join("trainer_state.json"), why: e.to_string() })?;
    let manifest = serde_json::to_vec_pretty(snap.manifest).map_err(|e| CheckpointError::Damaged { path: tmp.join("run_manifest.json"), why: e.to_string() })?;
    let contents: [Vec<u8>; 5] =
        [encode_safetensors(snap.adapter, &meta), encode_safetensors(snap.optimizer, &BTreeMap::new()), snap.adapter_config.to_vec(), state, manifest];
    let mut marker = Marker { format: Marker::FORMAT.into(), step, files: BTreeMap::new() };
    for (i, (name, bytes)) in FILES.iter().zip(&contents).enumerate() {
        write_synced(&tmp.join(name), bytes)?;
        marker.files.insert(name.to_string(), sha256(bytes));
        if i == 0 {
            fault_point("checkpoint-mid", step);
        }
    }
    let marker = serde_json::to_vec_pretty(&marker).map_err(|e| CheckpointError::Damaged { path: tmp.join("complete"), why: e.to_string() })?;
    write_synced(&tmp.join("complete"), &marker)?;
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
    fault_point("checkpoint-prune", step);
    prune(root, keep)?;
    Ok(dest)
}

/// A checkpoint read back: its state and the tensors the engine's `load_state` wants (adapter
/// values and moments).
#[derive(Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub state: CheckpointState,
    pub manifest: Manifest,
    pub tensors: Vec<NamedTensor>,
}

/// Reads the checkpoint in `dir`, verifying every file against the sha256 its `complete` marker
/// records (each file is read once: what is verified is what is used).
pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let damaged = |path: PathBuf, why: String| CheckpointError::Damaged { path, why };
    let marker_path = dir.join("complete");
    let text = fs::read(&marker_path).map_err(|e| damaged(marker_path.clone(), format!("cannot be read: {e}")))?;
    let marker: Marker = serde_json::from_slice(&text).map_err(|e| {
        damaged(marker_path.clone(), format!("not a lora-checkpoint-complete/1 marker (file hashes): {e}"))
    })?;
    if marker.format != Marker::FORMAT {
        return Err(damaged(marker_path, format!("format `{}`, expected {}", marker.format, Marker::FORMAT)));
    }
    if marker.files.keys().map(String::as_str).ne(FILES.iter().copied().collect::<std::collections::BTreeSet<_>>()) {
        return Err(damaged(marker_path, format!("lists {:?}, expected {FILES:?}", marker.files.keys().collect::<Vec<_>>())));
    }
    let mut files = BTreeMap::new();
    for name in FILES {
        let p = dir.join(name);
        let bytes = fs::read(&p).map_err(|e| damaged(p.clone(), format!("cannot be read: {e}")))?;
        let (got, want) = (sha256(&bytes), &marker.files[name]);
        if &got != want {
            return Err(damaged(p, format!("its sha256 is {got}, the complete marker recorded {want} (the file changed after it was written)")));
        }
        files.insert(name, bytes);
    }
    let json_err = |name: &str, e: serde_json::Error| damaged(dir.join(name), e.to_string());
    let state: CheckpointState = serde_json::from_slice(&files["trainer_state.json"]).map_err(|e| json_err("trainer_state.json", e))?;
    if state.format != CheckpointState::FORMAT {
        return Err(damaged(dir.to_path_buf(), format!("format `{}`", state.format)));
    }
    if state.position.step != marker.step {
        return Err(damaged(dir.to_path_buf(), format!("trainer_state.json is at step {}, the marker says {}", state.position.step, marker.step)));
    }
    let manifest: Manifest = serde_json::from_slice(&files["run_manifest.json"]).map_err(|e| json_err("run_manifest.json", e))?;
    let mut tensors = decode_safetensors(&files["adapter_model.safetensors"], &dir.join("adapter_model.safetensors"))?;
    tensors.extend(decode_safetensors(&files["optimizer.safetensors"], &dir.join("optimizer.safetensors"))?);
    Ok(Loaded { path: dir.to_path_buf(), state, manifest, tensors })
}

/// What the resume rule found.
#[derive(Debug)]
pub struct Found {
    /// The checkpoint to resume from, verified; `None`: start from the beginning.
    pub resume: Option<Loaded>,
    /// Newer checkpoints that failed verification, newest first, each with why; each was renamed
    /// to `checkpoint-<step>.damaged`.
    pub damaged: Vec<(PathBuf, CheckpointError)>,
}

/// The resume rule: the newest complete checkpoint that verifies decides (damaged ones are set
/// aside and the next older tried). `Ok(Found { resume: None, .. })` when none is left,
/// `Err(Mismatch)` when the newest intact one belongs to a different run.
pub fn find_resumable(root: &Path, current: &Manifest, names: crate::request::ParamNames) -> Result<Found, CheckpointError> {
    let mut found = Found { resume: None, damaged: Vec::new() };
    for (step, dir) in list(root).into_iter().rev() {
        let loaded = match load(&dir) {
            Ok(l) => l,
            Err(e @ CheckpointError::Damaged { .. }) => {
                let aside = root.join(format!("checkpoint-{step}.damaged"));
                let _ = fs::remove_dir_all(&aside);
                fs::rename(&dir, &aside).map_err(io("setting aside the damaged checkpoint", &dir))?;
                found.damaged.push((dir, e));
                continue;
            }
            Err(e) => return Err(e),
        };
        if loaded.manifest.resume_key() != current.resume_key() {
            let mut changes: Vec<String> = current.differences(&loaded.manifest).iter().map(|c| names.in_text(c)).collect();
            if changes.is_empty() {
                changes.push("the manifest format or binary changed".into());
            }
            return Err(CheckpointError::Mismatch { path: dir, changes, names });
        }
        found.resume = Some(loaded);
        break;
    }
    Ok(found)
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
            build: None,
            device: "cpu".into(),
            model: Inputs::default(),
            dataset: Inputs::default(),
            plugins: BTreeMap::new(),
            params,
            notes: Vec::new(),
            quantization: None,
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
        let loaded = find_resumable(&root, &m, crate::request::ParamNames::Kfp).unwrap().resume.unwrap();
        assert!(loaded.path.ends_with("checkpoint-8"));
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
        // Named as parameters under KFP, as flags in a `lora train` run.
        let err = find_resumable(&root, &manifest(1e-4), crate::request::ParamNames::Kfp).unwrap_err().to_string();
        assert!(err.contains("\n  training_learning_rate: 0.0002 → 0.0001"), "{err}");
        assert!(err.contains("training_resume=auto:") && err.contains("set training_resume=never"), "{err}");
        let err = find_resumable(&root, &manifest(1e-4), crate::request::ParamNames::Cli).unwrap_err().to_string();
        assert!(err.contains("\n  --training-learning-rate: 0.0002 → 0.0001"), "{err}");
        assert!(err.contains("--training-resume auto:") && err.contains("pass --training-resume never"), "{err}");
        assert!(!err.contains("training_resume"), "{err}");
        assert_eq!(remove_all(&root).unwrap(), 1);
        assert!(find_resumable(&root, &manifest(1e-4), crate::request::ParamNames::Kfp).unwrap().resume.is_none());
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
        assert!(find_resumable(&root, &m, crate::request::ParamNames::Kfp).unwrap().resume.is_none());
        remove_stale_temps(&root);
        assert!(!root.join(".checkpoint-5.tmp-999").exists());
        let _ = fs::remove_dir_all(&root);
    }

    fn save_steps(root: &Path, m: &Manifest, steps: &[u64], keep: u64) {
        for &step in steps {
            let st = state(step, &m.resume_key());
            let adapter = [tensor("a.lora_A.weight", step as f32)];
            let optimizer = [tensor("a.lora_A.weight.exp_avg", 0.1), tensor("a.lora_A.weight.exp_avg_sq", 0.2)];
            save(root, &Snapshot { state: &st, adapter: &adapter, optimizer: &optimizer, adapter_config: b"{}", manifest: m }, keep).unwrap();
        }
    }

    /// Issue 11 item 13, the attack as written: one low mantissa bit flipped inside a checkpoint's
    /// adapter resumed silently to a different result. The flip is found by the hashes in the
    /// `complete` marker; the run falls back to the previous checkpoint, naming the file.
    #[test]
    fn a_flipped_bit_in_a_checkpoint_falls_back_to_the_previous_one() {
        let root = temp("bitflip");
        let m = manifest(2e-4);
        save_steps(&root, &m, &[2, 4], 3);
        let path = root.join("checkpoint-4/adapter_model.safetensors");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 24; // inside the f32 data, lowest mantissa byte of a value
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        // Still a valid safetensors file holding a different adapter: only the hash tells.
        assert!(decode_safetensors(&bytes, &path).is_ok());
        let found = find_resumable(&root, &m, crate::request::ParamNames::Kfp).unwrap();
        let loaded = found.resume.unwrap();
        assert!(loaded.path.ends_with("checkpoint-2"), "{:?}", loaded.path);
        assert_eq!(found.damaged.len(), 1);
        let why = found.damaged[0].1.to_string();
        assert!(why.contains("checkpoint-4/adapter_model.safetensors") && why.contains("sha256"), "{why}");
        // Set aside, not resumed again nor counted, removed by training_resume=never.
        assert_eq!(list(&root).into_iter().map(|(s, _)| s).collect::<Vec<_>>(), vec![2]);
        assert!(root.join("checkpoint-4.damaged/adapter_model.safetensors").is_file());
        assert_eq!(remove_all(&root).unwrap(), 2);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn when_no_checkpoint_verifies_the_run_starts_fresh() {
        let root = temp("none-verifies");
        let m = manifest(2e-4);
        save_steps(&root, &m, &[1, 2], 3);
        fs::write(root.join("checkpoint-1/optimizer.safetensors"), b"truncated").unwrap();
        fs::write(root.join("checkpoint-2/complete"), b"step 2\n").unwrap(); // an old marker without hashes
        let found = find_resumable(&root, &m, crate::request::ParamNames::Kfp).unwrap();
        assert!(found.resume.is_none());
        let whys: Vec<String> = found.damaged.iter().map(|(_, e)| e.to_string()).collect();
        assert_eq!(whys.len(), 2, "{whys:?}");
        assert!(whys[0].contains("checkpoint-2/complete") && whys[0].contains("file hashes"), "{whys:?}");
        assert!(whys[1].contains("checkpoint-1/optimizer.safetensors"), "{whys:?}");
        let _ = fs::remove_dir_all(&root);
    }

    /// Issue 11 item 7: a NaN adapter (an absurd learning rate) was written and marked complete.
    #[test]
    fn a_non_finite_snapshot_is_never_written() {
        let root = temp("nonfinite");
        let m = manifest(2e-4);
        let st = state(3, &m.resume_key());
        let mut bad = tensor("a.lora_B.weight", 1.0);
        bad.data[4] = f32::NAN;
        for (adapter, optimizer) in [(vec![bad.clone()], vec![]), (vec![], vec![NamedTensor { name: "m.exp_avg_sq".into(), ..bad.clone() }])] {
            let err = save(&root, &Snapshot { state: &st, adapter: &adapter, optimizer: &optimizer, adapter_config: b"{}", manifest: &m }, 3).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("not writing checkpoint-3") && text.contains("[4] is NaN after step 3"), "{text}");
        }
        assert!(list(&root).is_empty() && !root.join("checkpoint-3").exists());
        let _ = fs::remove_dir_all(&root);
    }

    /// Issue 11 item 11: a run killed after a checkpoint's rename and before pruning left more
    /// than `save_total_limit`; pruning (the next run does it at start) keeps the newest.
    #[test]
    fn prune_keeps_the_newest() {
        let root = temp("prune");
        let m = manifest(2e-4);
        save_steps(&root, &m, &[1, 2, 3, 4], 0);
        assert_eq!(list(&root).len(), 4);
        let removed = prune(&root, 2).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(list(&root).into_iter().map(|(s, _)| s).collect::<Vec<_>>(), vec![3, 4]);
        assert!(prune(&root, 0).unwrap().is_empty());
        let _ = fs::remove_dir_all(&root);
    }

    /// Issue 11 item 12: a loss read back from `trainer_state.json` lost a bit
    /// (`training_train_loss` 11.173966845301539 became 11.17396684530154 after a resume).
    #[test]
    fn floats_in_a_checkpoint_read_back_bit_for_bit() {
        let root = temp("floats");
        let m = manifest(2e-4);
        let mut st = state(1, &m.resume_key());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        st.history.losses = std::iter::once(11.173966845301539)
            .chain((0..20_000).map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                f64::from_bits((x >> 12) | 0x4000_0000_0000_0000) // in [2, 4), every mantissa bit random
            }))
            .collect();
        save(&root, &Snapshot { state: &st, adapter: &[], optimizer: &[], adapter_config: b"{}", manifest: &m }, 0).unwrap();
        let back = find_resumable(&root, &m, crate::request::ParamNames::Kfp).unwrap().resume.unwrap().state.history.losses;
        let differ = st.history.losses.iter().zip(&back).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{differ} of {} losses changed on the way through JSON", back.len());
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
