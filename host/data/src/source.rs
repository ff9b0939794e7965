//! Dataset sources, resolved in the reference's order, and readers that turn files into
//! `RawRecord`s (JSONL, JSON array; Parquet and Arrow in `columnar`).
//!
//! Resolution order (as the reference component):
//! 1. an existing non-empty `<pvc_path>/dataset/train` (reused);
//! 2. the input artifact's local path (a file or a folder);
//! 3. the artifact metadata `pvc_path` / `pvc_dir`;
//! 4. the artifact metadata `artifact_path` (s3/http(s)/hub id): refused with a clear message:
//!    this binary does not download datasets (download it in a pipeline step before, or mount it);
//! 5. otherwise an error.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use lora_api::RawRecord;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, RecordLocation, Result};

/// What the run was given to find the dataset.
#[derive(Debug, Clone, Default)]
pub struct DatasetInput {
    /// The input artifact's local path (already mapped from its URI), if any.
    pub artifact_path: Option<PathBuf>,
    /// The input artifact's metadata (`pvc_path`, `pvc_dir`, `artifact_path`).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The run's `pvc_path`.
    pub pvc_path: Option<PathBuf>,
}

/// A readable data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    pub path: PathBuf,
    pub kind: FileKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    Jsonl,
    Json,
    Parquet,
    /// Arrow IPC (stream or file), as `datasets.save_to_disk` writes.
    Arrow,
}

/// A resolved dataset: the training files, the validation files (from a `validation` or `test`
/// split), and a line saying where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSource {
    pub train: Vec<DataFile>,
    pub validation: Vec<DataFile>,
    pub origin: String,
}

impl DatasetSource {
    /// A single file or folder given directly.
    pub fn from_path(path: &Path) -> Result<Self> {
        let (train, validation) = files_of(path)?;
        Ok(DatasetSource {
            train,
            validation,
            origin: path.display().to_string(),
        })
    }
}

fn non_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Resolves `input` in the reference's order.
pub fn resolve_dataset(input: &DatasetInput) -> Result<DatasetSource> {
    if let Some(pvc) = &input.pvc_path {
        let reuse = pvc.join("dataset").join("train");
        if non_empty_dir(&reuse) {
            let mut s = DatasetSource::from_path(&reuse)?;
            s.origin = format!(
                "{} (reused: an existing non-empty <pvc_path>/dataset/train comes first, as in the reference)",
                reuse.display()
            );
            return Ok(s);
        }
    }
    if let Some(p) = &input.artifact_path
        && p.exists()
    {
        return DatasetSource::from_path(p);
    }
    for key in ["pvc_path", "pvc_dir"] {
        if let Some(v) = input.metadata.get(key) {
            let Some(s) = v.as_str() else {
                return Err(DataError::source(format!(
                    "dataset artifact metadata `{key}` must be a string path, found {v}"
                )));
            };
            let p = PathBuf::from(s);
            if !p.exists() {
                return Err(DataError::source(format!(
                    "dataset artifact metadata `{key}` points to `{s}`, which does not exist"
                )));
            }
            let mut src = DatasetSource::from_path(&p)?;
            src.origin = format!("{s} (artifact metadata `{key}`)");
            return Ok(src);
        }
    }
    if let Some(v) = input.metadata.get("artifact_path") {
        return Err(DataError::source(format!(
            "dataset artifact metadata `artifact_path` = {v} is remote; lora does not download datasets (no network access is assumed on training nodes). \
             Download it into the workspace in an earlier pipeline step and pass that path, or mount it (s3:// is mounted under /s3/ by KFP)"
        )));
    }
    match &input.artifact_path {
        Some(p) => Err(DataError::source(format!(
            "the dataset artifact path `{}` does not exist",
            p.display()
        ))),
        None => Err(DataError::source(
            "no dataset: give a dataset artifact (file or folder), artifact metadata `pvc_path`/`pvc_dir`, or put the data in <pvc_path>/dataset/train",
        )),
    }
}

/// The kind a file's extension names, if it names one.
fn kind_of(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Some(FileKind::Jsonl)
    } else if name.ends_with(".json") {
        Some(FileKind::Json)
    } else if name.ends_with(".parquet") {
        Some(FileKind::Parquet)
    } else if name.ends_with(".arrow") {
        Some(FileKind::Arrow)
    } else {
        None
    }
}

/// Bytes of a file's head that [`sniff`] looks at.
const SNIFF_BYTES: usize = 1 << 20;

/// The kind of a data file whose name says nothing (a KFP artifact is written to `.../dataset`
/// or `out.path`), told by its content: Parquet (`PAR1` at both ends), Arrow IPC (the file
/// format's `ARROW1`, or a stream's first message: continuation marker `0xFFFFFFFF` and a
/// length), a JSON array (`[` first), JSON Lines (the first line is a JSON object on its own).
/// Anything else, or content that looks like two of them, is an error listing what was tried.
pub fn sniff(path: &Path) -> Result<FileKind> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let len = f.metadata().map_err(|e| DataError::io("read", path, e))?.len();
    let mut head = Vec::with_capacity(SNIFF_BYTES.min(len as usize));
    (&mut f)
        .take(SNIFF_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|e| DataError::io("read", path, e))?;
    let mut tail = [0u8; 4];
    let tail_ok = len >= 8
        && f.seek(SeekFrom::End(-4)).is_ok()
        && f.read_exact(&mut tail).is_ok();
    let tried = |found: &str| {
        DataError::format(
            path,
            format!(
                "the file name has no dataset extension (.jsonl, .json, .parquet, .arrow) and the content {found}; \
                 tried: Parquet (`PAR1` at start and end), Arrow IPC file (`ARROW1`), Arrow IPC stream \
                 (0xFFFFFFFF and a message length), JSON array (`[` first), JSON Lines (a JSON object \
                 on the first line). Rename the file with its extension, or write one of these"
            ),
        )
    };
    if head.is_empty() {
        return Err(tried("is empty"));
    }
    if head.starts_with(b"PAR1") {
        return if tail_ok && &tail == b"PAR1" {
            Ok(FileKind::Parquet)
        } else {
            Err(tried("starts like Parquet (`PAR1`) but does not end with `PAR1` (truncated?)"))
        };
    }
    if head.starts_with(b"ARROW1") {
        return Ok(FileKind::Arrow);
    }
    if head.len() >= 8 && head[..4] == [0xff; 4] {
        let n = i32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if n > 0 && (n as u64) < len {
            return Ok(FileKind::Arrow);
        }
        return Err(tried("starts with an Arrow stream marker but no valid message length"));
    }
    let text = match std::str::from_utf8(&head) {
        Ok(t) => t,
        // A multi-byte character cut at the end of the head is fine.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or(""),
        Err(e) => {
            return Err(tried(&format!(
                "is binary (not UTF-8 at byte {}) and no known binary format",
                e.valid_up_to()
            )));
        }
    };
    let body = text.trim_start_matches('\u{feff}').trim_start();
    match body.chars().next() {
        Some('[') => Ok(FileKind::Json),
        Some('{') => {
            let first = body.lines().next().unwrap_or("");
            match serde_json::from_str::<serde_json::Value>(first) {
                Ok(serde_json::Value::Object(_)) => Ok(FileKind::Jsonl),
                Ok(_) => Err(tried("starts with `{` but its first line is not a JSON object")),
                Err(e) => Err(tried(&format!(
                    "starts with `{{` but its first line is not a whole JSON object ({e}): \
                     a pretty-printed JSON object is one value, not a list of records"
                ))),
            }
        }
        Some(c) => Err(tried(&format!("starts with {c:?}"))),
        None => Err(tried("holds only white space")),
    }
}

/// The kind of a data file: by its extension, else by its content ([`sniff`]).
/// A `.json` file holding JSON Lines (pandas' `lines=True`, `datasets`' `to_json`) is read as
/// JSON Lines, as `datasets.load_dataset("json")` does.
fn kind_or_sniff(path: &Path) -> Result<FileKind> {
    match kind_of(path) {
        Some(FileKind::Json) if matches!(sniff(path), Ok(FileKind::Jsonl)) => Ok(FileKind::Jsonl),
        Some(kind) => Ok(kind),
        None => sniff(path),
    }
}

/// Metadata files of `datasets.save_to_disk` that are not data.
const HF_METADATA: &[&str] = &["dataset_info.json", "state.json", "dataset_dict.json"];

/// The data files of one split folder (or a single file).
fn split_files(path: &Path) -> Result<Vec<DataFile>> {
    if path.is_file() {
        return Ok(vec![DataFile {
            path: path.to_owned(),
            kind: kind_or_sniff(path)?,
        }]);
    }
    // A `datasets.save_to_disk` folder lists its Arrow files, in order, in state.json.
    let state = path.join("state.json");
    if state.is_file() {
        let bytes = std::fs::read(&state).map_err(|e| DataError::io("read", &state, e))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| DataError::format(&state, format!("not valid JSON: {e}")))?;
        let files = v
            .get("_data_files")
            .and_then(|f| f.as_array())
            .ok_or_else(|| {
                DataError::format(
                    &state,
                    "no `_data_files` list (is this a datasets.save_to_disk folder?)",
                )
            })?;
        let mut out = Vec::new();
        for f in files {
            let name = f.get("filename").and_then(|n| n.as_str()).ok_or_else(|| {
                DataError::format(&state, "a `_data_files` entry has no `filename`")
            })?;
            let p = path.join(name);
            if !p.is_file() {
                return Err(DataError::format(
                    &state,
                    format!("lists `{name}`, which is not in {}", path.display()),
                ));
            }
            out.push(DataFile {
                path: p,
                kind: FileKind::Arrow,
            });
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    let mut unnamed = Vec::new();
    let rd = std::fs::read_dir(path).map_err(|e| DataError::io("list", path, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io("list", path, e))?;
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !p.is_file() || name.starts_with('.') || HF_METADATA.contains(&name.as_str()) {
            continue;
        }
        match kind_of(&p) {
            Some(_) => {
                let kind = kind_or_sniff(&p)?;
                out.push(DataFile { path: p, kind });
            }
            None if Path::new(&name).extension().is_none() => unnamed.push(p),
            None => {}
        }
    }
    // A folder holding a single extension-less file (an upstream step's `out.path` in a folder
    // artifact) is that file, told by its content. Several such files next to no named one are
    // not guessed at.
    if out.is_empty() {
        match unnamed.len() {
            0 => {}
            1 => {
                let p = unnamed.remove(0);
                let kind = sniff(&p)?;
                out.push(DataFile { path: p, kind });
            }
            _ => {
                unnamed.sort();
                let names: Vec<String> = unnamed
                    .iter()
                    .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                    .collect();
                return Err(DataError::format(
                    path,
                    format!(
                        "holds several files without a dataset extension ({}) and none with one; \
                         lora reads a folder's .jsonl, .json, .parquet and .arrow files, or a single \
                         extension-less file by its content: give the file itself, or name them by format",
                        names.join(", ")
                    ),
                ));
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Train and validation files of a file or folder. A folder with a `train` subfolder (a
/// `DatasetDict` or a split layout) takes `validation` (else `test`) as the validation split.
fn files_of(path: &Path) -> Result<(Vec<DataFile>, Vec<DataFile>)> {
    if !path.exists() {
        return Err(DataError::source(format!(
            "`{}` does not exist",
            path.display()
        )));
    }
    let (train, validation) = if path.is_dir() && path.join("train").is_dir() {
        let val = ["validation", "test"]
            .iter()
            .map(|s| path.join(s))
            .find(|p| p.is_dir());
        (
            split_files(&path.join("train"))?,
            match val {
                Some(v) => split_files(&v)?,
                None => Vec::new(),
            },
        )
    } else {
        (split_files(path)?, Vec::new())
    };
    if train.is_empty() {
        return Err(DataError::source(format!(
            "`{}` has no dataset files (.jsonl, .json, .parquet, .arrow, or a datasets.save_to_disk folder)",
            path.display()
        )));
    }
    Ok((train, validation))
}

/// A record that could not even be read (invalid JSON, bad bytes): reported like a bad field.
#[derive(Debug, Clone)]
pub struct ReadProblem {
    pub location: RecordLocation,
    pub field: String,
    pub message: String,
}

/// Streams the records of `file` into `sink`: `Ok(record)` or a per-record read problem.
/// File-level failures (cannot open, not a JSON array, corrupt Parquet) are errors.
pub fn read_records(
    file: &DataFile,
    sink: &mut dyn FnMut(std::result::Result<RawRecord, ReadProblem>) -> Result<()>,
) -> Result<()> {
    read_records_keeping_text(file, false, sink)
}

/// [`read_records`], and with `keep_text` each JSONL record also carries its line
/// ([`RawRecord::json`], without the line break) for a preprocessor that takes JSON text.
pub fn read_records_keeping_text(
    file: &DataFile,
    keep_text: bool,
    sink: &mut dyn FnMut(std::result::Result<RawRecord, ReadProblem>) -> Result<()>,
) -> Result<()> {
    let source = file.path.display().to_string();
    match file.kind {
        FileKind::Jsonl => {
            let f = std::fs::File::open(&file.path)
                .map_err(|e| DataError::io("open", &file.path, e))?;
            let mut reader = std::io::BufReader::with_capacity(1 << 20, f);
            let mut line = Vec::new();
            let mut index = 0u64;
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .map_err(|e| DataError::io("read", &file.path, e))?;
                if n == 0 {
                    break;
                }
                index += 1;
                let location = RecordLocation {
                    source: source.clone(),
                    index,
                };
                let text = match std::str::from_utf8(&line) {
                    Ok(t) => t,
                    Err(e) => {
                        sink(Err(ReadProblem {
                            location,
                            field: "(line)".into(),
                            message: format!("not valid UTF-8 at byte {}", e.valid_up_to()),
                        }))?;
                        continue;
                    }
                };
                let text = if index == 1 { text.strip_prefix('\u{feff}').unwrap_or(text) } else { text };
                if text.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(value) => sink(Ok(RawRecord {
                        index,
                        source: source.clone(),
                        value,
                        json: keep_text.then(|| text.trim_end().to_owned()),
                    }))?,
                    Err(e) => sink(Err(ReadProblem {
                        location,
                        field: "(line)".into(),
                        message: format!("invalid JSON: {e}"),
                    }))?,
                }
            }
            Ok(())
        }
        FileKind::Json => {
            let bytes =
                std::fs::read(&file.path).map_err(|e| DataError::io("read", &file.path, e))?;
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                DataError::format(
                    &file.path,
                    format!("not valid UTF-8 at byte {}", e.valid_up_to()),
                )
            })?;
            // A byte order mark (as some Windows tools write) is not part of the JSON.
            let text = text.strip_prefix('\u{feff}').unwrap_or(text);
            let value: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| DataError::format(&file.path, format!("invalid JSON: {e}")))?;
            let items = match value {
                serde_json::Value::Array(items) => items,
                // A JSON file with one object per line under a .json name (as pandas writes with lines=True).
                _ => {
                    return Err(DataError::format(
                        &file.path,
                        "expected a JSON array of records (for one record per line use .jsonl)",
                    ));
                }
            };
            for (i, value) in items.into_iter().enumerate() {
                sink(Ok(RawRecord {
                    index: i as u64 + 1,
                    source: source.clone(),
                    value,
                    json: None,
                }))?;
            }
            Ok(())
        }
        FileKind::Parquet | FileKind::Arrow => crate::columnar::read_columnar(file, &source, sink),
    }
}
