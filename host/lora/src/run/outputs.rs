//! What a run leaves behind: the PEFT adapter (`output_model/adapter/`), the merged full model in
//! the base model's dtype (`output_model/`, sharded with an index above 5 GB), copies of the
//! tokenizer and generation files, the copy to `<pvc_path>/final_model`, the metrics and the
//! loss chart; and the rules that keep them whole.
//!
//! The merge is the engine's ([`lora_engine::merge`]): streamed tensor by tensor, unadapted
//! weights copied byte for byte, adapted ones merged in f32 and stored in the base dtype.
//!
//! **All or nothing.** Every output path is checked before anything runs ([`check_paths`], also
//! in `--dry-run`). The outputs are built under temp names next to their destinations
//! ([`Staging`]: `.<name>.tmp-<pid>`) and published only once all of them are written: earlier
//! outputs are moved aside (`.<name>.old-<pid>`; `output_model` first), the new ones renamed into
//! place with `output_model` last, then what was moved aside is removed. So at any instant a
//! reader sees the earlier run's outputs, or, for the milliseconds of the renames, no
//! `output_model` at all, or the new run's: a present `output_model` always comes with the
//! metrics, chart and `final_model` of the same run. A failed run removes its temp outputs and
//! leaves the earlier ones as they were.
//!
//! **Leftovers.** A run that was killed leaves temp and moved-aside paths. The next run that
//! publishes removes those of dead processes (by pid) next to each destination; checkpoint temp
//! folders are removed at the start of a run, under the workspace lock ([`WorkspaceLock`]) that
//! also keeps two runs from sharing one `pvc_path`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};
use lora_engine::{AdapterConfig, NamedTensor};
use serde_json::Value;

use crate::checkpoint::{encode_safetensors, fault_point};
use crate::request::RunRequest;

pub use lora_engine::export::peft_config;

/// Writes the merged model's weights into `out_dir` (same names and dtypes as the base), sharded
/// above transformers' 5 GB.
pub fn write_merged_weights(base_dir: &Path, out_dir: &Path, adapter: &[NamedTensor], cfg: &AdapterConfig, float32: bool) -> Result<()> {
    lora_engine::merge::write_merged_weights_as(base_dir, out_dir, adapter, cfg, lora_engine::export::MAX_SHARD_BYTES, float32)?;
    Ok(())
}

/// Writes `adapter_config.json` + `adapter_model.safetensors` (f32, PEFT keys) into `dir`.
pub fn write_adapter(dir: &Path, tensors: &[NamedTensor], config: &Value) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    fs::write(dir.join("adapter_model.safetensors"), encode_safetensors(tensors, &meta))
        .with_context(|| format!("writing {}", dir.join("adapter_model.safetensors").display()))?;
    fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(config)?)
        .with_context(|| format!("writing {}", dir.join("adapter_config.json").display()))?;
    Ok(())
}

/// Copies the base folder's config, tokenizer and generation files (everything but weights);
/// with `float32` the config names float32 as the weights' dtype.
pub fn copy_model_files(base_dir: &Path, out_dir: &Path, float32: bool) -> Result<()> {
    for e in fs::read_dir(base_dir).with_context(|| format!("reading {}", base_dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        let is_weights = name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || [".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt"].iter().any(|s| name.ends_with(s));
        let wanted = name.ends_with(".json") || name.ends_with(".jinja") || name.ends_with(".txt") || name.ends_with(".model") || name.ends_with(".tiktoken");
        if !path.is_file() || is_weights || !wanted {
            continue;
        }
        if name == "config.json" {
            // A merged model is a plain model: no quantisation section.
            let mut v: Value = serde_json::from_slice(&fs::read(&path)?).with_context(|| format!("{} is not JSON", path.display()))?;
            if let Some(o) = v.as_object_mut() {
                o.remove("quantization_config");
                if float32 {
                    for key in ["torch_dtype", "dtype"] {
                        if o.contains_key(key) {
                            o.insert(key.into(), Value::String("float32".into()));
                        }
                    }
                }
            }
            fs::write(out_dir.join(&name), serde_json::to_vec_pretty(&v)?)?;
        } else {
            fs::copy(&path, out_dir.join(&name)).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// Copies a folder tree (files and subfolders).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            fs::copy(e.path(), &target).with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

// ---- checking the paths before anything runs --------------------------------------------------

/// What goes at an output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A folder replaced as a whole (`output_model`, `final_model`).
    Folder,
    /// A folder written into (`pvc_path`, the checkpoints, the processed-data cache).
    Workspace,
    /// A file replaced as a whole.
    File,
}

/// One path a run writes, by the name the user knows it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPath {
    pub name: &'static str,
    pub path: PathBuf,
    pub kind: Kind,
}

/// Every path a run writes.
pub fn output_paths(req: &RunRequest) -> Vec<OutputPath> {
    let ws = req.workspace();
    let mut out = vec![
        OutputPath { name: "output_model", path: req.outputs.model.clone(), kind: Kind::Folder },
        OutputPath { name: "output_metrics", path: req.outputs.metrics.clone(), kind: Kind::File },
        OutputPath { name: "output_loss_chart", path: req.outputs.loss_chart.clone(), kind: Kind::File },
        OutputPath { name: "pvc_path", path: req.pvc_path.clone(), kind: Kind::Workspace },
        OutputPath { name: "<pvc_path>/checkpoints", path: ws.checkpoints, kind: Kind::Workspace },
        OutputPath { name: "<pvc_path>/final_model", path: ws.final_model, kind: Kind::Folder },
        OutputPath { name: "training_data_output_dir", path: ws.data_output_dir, kind: Kind::Workspace },
    ];
    if let Some(p) = &req.outputs.executor_output {
        out.push(OutputPath { name: "executor output (outputs.outputFile)", path: p.clone(), kind: Kind::File });
    }
    if let Some(p) = &req.outputs.output_parameter {
        out.push(OutputPath { name: "Output parameter file", path: p.clone(), kind: Kind::File });
    }
    out
}

/// Output paths a run cannot write, each with why; all found at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} output path problem{}:\n  - {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.join("\n  - "))]
pub struct OutputPathErrors(pub Vec<String>);

/// `path` made absolute and free of `.`/`..`, through the real location of its deepest existing
/// ancestor (so two spellings of one place compare equal).
fn normalized(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut lexical = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            c => lexical.push(c),
        }
    }
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|n| n.to_owned()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return lexical,
        }
    }
    let mut real = existing.canonicalize().unwrap_or(existing);
    real.extend(rest.iter().rev());
    real
}

/// Whether the effective user may create and remove entries in folder `dir`.
fn writable_dir(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; faccessat only reads it.
    unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK | libc::X_OK, libc::AT_EACCESS) == 0 }
}

/// The deepest existing ancestor of `path` (itself excluded), if any.
fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    let mut p = path.parent()?;
    loop {
        if p.as_os_str().is_empty() {
            return Some(PathBuf::from("."));
        }
        if fs::symlink_metadata(p).is_ok() {
            return Some(p.to_path_buf());
        }
        p = p.parent()?;
    }
}

/// Checks every path a run writes before anything runs: an existing file where a folder goes (or
/// a folder where a file goes) is refused, never renamed or replaced; so is a parent that is not
/// a folder or not writable, two outputs at one place, a file output inside a folder that is
/// replaced as a whole, and a replaced folder that is (or holds) the base model, the dataset or
/// the workspace.
pub fn check_paths(req: &RunRequest) -> Result<(), OutputPathErrors> {
    let paths = output_paths(req);
    let mut problems = Vec::new();
    let mut seen: Vec<(PathBuf, &OutputPath)> = Vec::new();
    for o in &paths {
        let shown = format!("{} {}", o.name, o.path.display());
        if o.path.as_os_str().is_empty() {
            problems.push(format!("{}: is empty; give a path", o.name));
            continue;
        }
        let meta = fs::metadata(&o.path);
        match (&meta, o.kind) {
            (Ok(m), Kind::File) if m.is_dir() => {
                problems.push(format!("{shown}: is an existing folder, and a file goes here; remove it or choose another path"))
            }
            (Ok(m), Kind::Folder | Kind::Workspace) if !m.is_dir() => problems.push(format!(
                "{shown}: is an existing file, and a folder goes here; lora does not rename or replace it: move it away or choose another path"
            )),
            _ => {}
        }
        // Folders written into need to be writable themselves; everything else is created or
        // replaced in its parent.
        let needs = match (&meta, o.kind) {
            (Ok(m), Kind::Workspace) if m.is_dir() => Some(o.path.clone()),
            _ => existing_ancestor(&o.path),
        };
        if let Some(dir) = needs {
            if !dir.is_dir() {
                problems.push(format!("{shown}: {} is not a folder, so nothing can be created under it", dir.display()));
            } else if !writable_dir(&dir) {
                problems.push(format!("{shown}: {} is not writable (permissions or a read-only file system)", dir.display()));
            }
        }
        // Two names for one place: fine for two folders of one kind (`output_model` given as
        // `<pvc_path>/final_model`, a data cache inside the workspace), never with a file.
        let norm = normalized(&o.path);
        if let Some((_, other)) = seen.iter().find(|(p, other)| *p == norm && (other.kind != o.kind || o.kind == Kind::File)) {
            problems.push(format!("{shown}: is the same path as {}", other.name));
        }
        seen.push((norm, o));
    }
    // Folders replaced as a whole must not swallow anything else (the same folder given for both
    // `output_model` and `final_model` is one output).
    let mut guarded: Vec<(&str, PathBuf, Option<Kind>)> = Vec::new();
    let base_model = Path::new(&req.params.base_model);
    if base_model.is_dir() {
        guarded.push(("training_base_model", normalized(base_model), None));
    }
    if let Ok(source) = req.dataset_source()
        && let Some(path) = source.local_path()
    {
        guarded.push(("the dataset", normalized(path), None));
    }
    guarded.extend(seen.iter().map(|(norm, o)| (o.name, norm.clone(), Some(o.kind))));
    for (norm, o) in seen.iter().filter(|(_, o)| o.kind == Kind::Folder) {
        for (what, other, kind) in &guarded {
            let same_output = *what == o.name || (*kind == Some(Kind::Folder) && other == norm);
            if other.starts_with(norm) && !same_output {
                let how = if other == norm { "is" } else { "holds" };
                problems.push(format!(
                    "{} {}: {how} {what} ({}), and this folder is replaced as a whole by the run's output; choose another path",
                    o.name,
                    o.path.display(),
                    other.display()
                ));
            }
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(OutputPathErrors(problems)) }
}

// ---- the workspace lock --------------------------------------------------------------------------

/// An exclusive lock on `<pvc_path>/.lora.lock`, held for the whole run: a second run on the same
/// workspace is refused instead of mixing its checkpoints in, and a run that holds it knows any
/// checkpoint temp folder it finds is a dead run's.
#[derive(Debug)]
pub struct WorkspaceLock {
    _file: fs::File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another lora run is using the workspace {pvc} (it holds {lock}{holder}); wait for it to end, or give this run another pvc_path"
    )]
    Held { pvc: PathBuf, lock: PathBuf, holder: String },
    #[error("cannot lock the workspace {lock}: {source}")]
    Io { lock: PathBuf, source: std::io::Error },
}

impl WorkspaceLock {
    pub fn acquire(pvc_path: &Path) -> Result<Self, LockError> {
        let lock = pvc_path.join(".lora.lock");
        let io = |source| LockError::Io { lock: lock.clone(), source };
        fs::create_dir_all(pvc_path).map_err(io)?;
        let mut file = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&lock).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&lock).ok().filter(|s| !s.trim().is_empty()).map(|s| format!(", {}", s.trim())).unwrap_or_default();
                return Err(LockError::Held { pvc: pvc_path.to_path_buf(), lock, holder });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        write!(file, "pid {}", std::process::id()).map_err(io)?;
        Ok(WorkspaceLock { _file: file })
    }
}

// ---- staging and publishing ------------------------------------------------------------------------

/// `.<name>.<what>-<pid>` next to `dest`.
fn sibling(dest: &Path, what: &str, pid: u32) -> PathBuf {
    dest.with_file_name(format!(".{}.{what}-{pid}", dest.file_name().unwrap_or_default().to_string_lossy()))
}

/// Whether process `pid` exists (and is not this one).
fn other_process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks whether the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes what dead runs left next to `dest`: `.<name>.tmp-<pid>` (a staged output),
/// `.<name>.tmp-<pid>-<n>` (a file [`crate::fs::write_atomic`] was writing) and
/// `.<name>.old-<pid>` (an earlier output moved aside), files or folders, whose process is gone.
/// Returns what was removed.
pub fn remove_dead_leftovers(dest: &Path) -> Vec<PathBuf> {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else { return Vec::new() };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let prefix = format!(".{}.", name.to_string_lossy());
    let mut removed = Vec::new();
    for e in fs::read_dir(parent).into_iter().flatten().filter_map(|e| e.ok()) {
        let file_name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = file_name.strip_prefix(&prefix) else { continue };
        let pid = rest
            .strip_prefix("tmp-")
            .map(|p| p.split_once('-').map_or(p, |(pid, n)| if n.bytes().all(|b| b.is_ascii_digit()) { pid } else { "" }))
            .or_else(|| rest.strip_prefix("old-"))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if other_process_alive(pid) {
            continue;
        }
        let path = e.path();
        let gone = if e.file_type().is_ok_and(|t| t.is_dir()) { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[derive(Debug)]
struct Staged {
    name: &'static str,
    dest: PathBuf,
    tmp: PathBuf,
    folder: bool,
}

/// Outputs built under temp names next to their destinations, published together by
/// [`Staging::publish`]: in the order they were staged, except the commit point (`output_model`),
/// which is moved aside first and renamed into place last. Dropped unpublished (a failed run), it
/// removes what it staged.
#[derive(Debug)]
pub struct Staging {
    entries: Vec<Staged>,
    commit: PathBuf,
    /// The run's last step, for the fault points `outputs-staged:<step>`/`outputs-publish:<step>`.
    step: u64,
}

impl Staging {
    /// Outputs whose presence at `commit` says the whole set is published.
    pub fn new(commit: &Path, step: u64) -> Self {
        Staging { entries: Vec::new(), commit: commit.to_path_buf(), step }
    }

    /// A fresh, empty temp folder next to `dest` to build folder output `name` in.
    pub fn folder(&mut self, name: &'static str, dest: &Path) -> Result<PathBuf> {
        let tmp = sibling(dest, "tmp", std::process::id());
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        self.entries.push(Staged { name, dest: dest.to_path_buf(), tmp: tmp.clone(), folder: true });
        Ok(tmp)
    }

    /// Writes file output `name` to a temp file next to `dest`, synced.
    pub fn file(&mut self, name: &'static str, dest: &Path, bytes: &[u8]) -> Result<()> {
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("writing {name}: creating {}", dir.display()))?;
        }
        let tmp = sibling(dest, "tmp", std::process::id());
        // Created exclusively: a link planted under the temp name is never followed.
        let _ = fs::remove_file(&tmp);
        self.entries.push(Staged { name, dest: dest.to_path_buf(), tmp: tmp.clone(), folder: false });
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("writing {name}: creating {}", tmp.display()))?;
        f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {name} to {}", tmp.display()))?;
        Ok(())
    }

    /// Publishes every staged output (see the module docs for what a reader sees meanwhile) and
    /// removes what dead runs left next to the destinations. On an error, what was already
    /// published is taken back and the earlier outputs restored, as far as the file system allows.
    pub fn publish(mut self) -> Result<()> {
        fault_point("outputs-staged", self.step);
        let pid = std::process::id();
        let mut entries = std::mem::take(&mut self.entries);
        if let Some(i) = entries.iter().position(|e| e.dest == self.commit) {
            let commit = entries.remove(i);
            entries.push(commit);
        }
        // Earlier outputs: folders moved aside (output_model, staged last, first), files linked
        // aside as a backup (their rename below replaces them atomically).
        let mut aside: Vec<(usize, PathBuf)> = Vec::new();
        let mut published: Vec<usize> = Vec::new();
        let mut result = Ok(());
        for (i, e) in entries.iter().enumerate().rev() {
            if fs::symlink_metadata(&e.dest).is_err() {
                continue;
            }
            let old = sibling(&e.dest, "old", pid);
            let _ = if old.is_dir() { fs::remove_dir_all(&old) } else { fs::remove_file(&old) };
            let moved = if e.folder { fs::rename(&e.dest, &old) } else { fs::hard_link(&e.dest, &old).or_else(|_| fs::copy(&e.dest, &old).map(|_| ())) };
            if let Err(err) = moved {
                result = Err(anyhow::Error::new(err).context(format!("publishing {}: moving the earlier {} aside to {}", e.name, e.dest.display(), old.display())));
                break;
            }
            aside.push((i, old));
        }
        if result.is_ok() {
            for (i, e) in entries.iter().enumerate() {
                if let Err(err) = fs::rename(&e.tmp, &e.dest) {
                    result = Err(anyhow::Error::new(err).context(format!("publishing {}: renaming {} to {}", e.name, e.tmp.display(), e.dest.display())));
                    break;
                }
                sync_parent(&e.dest);
                published.push(i);
                if i == 0 {
                    fault_point("outputs-publish", self.step);
                }
            }
        }
        if let Err(err) = result {
            // Take back what was published, restore what was moved aside.
            for &i in published.iter().rev() {
                let e = &entries[i];
                let _ = fs::rename(&e.dest, &e.tmp);
            }
            for (i, old) in &aside {
                let _ = fs::rename(old, &entries[*i].dest);
            }
            self.entries = entries; // removed by drop
            return Err(err);
        }
        for (_, old) in &aside {
            let _ = if old.is_dir() { fs::remove_dir_all(old) } else { fs::remove_file(old) };
        }
        for e in &entries {
            for path in remove_dead_leftovers(&e.dest) {
                eprintln!("lora: removed {}, left by a run that was stopped", path.display());
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for e in &self.entries {
            let _ = if e.folder { fs::remove_dir_all(&e.tmp) } else { fs::remove_file(&e.tmp) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_config_has_the_fields_peft_and_vllm_read() {
        let c = peft_config(&AdapterConfig::default(), &["q_proj", "v_proj"], "Qwen/Qwen2.5-1.5B-Instruct");
        assert_eq!(c["peft_type"], "LORA");
        assert_eq!(c["task_type"], "CAUSAL_LM");
        assert_eq!(c["lora_alpha"], 32);
        assert_eq!(c["r"], 16);
        assert_eq!(c["bias"], "none");
        assert_eq!(c["inference_mode"], true);
        assert!(c["modules_to_save"].is_null());
    }

    /// What a killed lora left next to an output (a staged folder, a half-written file of
    /// `fs::write_atomic`, an output moved aside) goes; a live process's, and other names, stay.
    #[test]
    fn dead_runs_leftovers_go_and_everything_else_stays() {
        let dir = std::env::temp_dir().join(format!("lora-leftovers-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // pid 1 is alive (init); a pid past pid_max is not.
        let dead = 4_194_305u32;
        let names = [
            format!(".out.json.tmp-{dead}"),
            format!(".out.json.tmp-{dead}-3"),
            format!(".out.json.old-{dead}"),
            ".out.json.tmp-1-0".to_string(),
            format!(".out.json.tmp-{dead}-x"),
            format!(".other.tmp-{dead}-0"),
        ];
        for n in &names {
            fs::write(dir.join(n), "x").unwrap();
        }
        let mut removed: Vec<String> = remove_dead_leftovers(&dir.join("out.json"))
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        removed.sort();
        let mut want = names[..3].to_vec();
        want.sort();
        assert_eq!(removed, want);
        for n in &names[3..] {
            assert!(dir.join(n).exists(), "{n} was removed");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
