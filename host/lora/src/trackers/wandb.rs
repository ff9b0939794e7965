//! Weights & Biases: the run as a W&B *offline run*, the folder the `wandb` SDK writes with
//! `WANDB_MODE=offline` and `wandb sync` uploads:
//! `$WANDB_DIR/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>/run-<id>.wandb` plus `files/`.
//! `WANDB_DIR` defaults to `pvc_path`, so under KFP the run lands on the PVC.
//!
//! Streaming to W&B while training is not built (it could not be tested here): `WANDB_MODE`
//! unset or `offline` writes the offline run, `disabled` writes nothing, `online` is refused
//! before the run starts. Upload afterwards with `wandb sync <run folder>` (it needs
//! `WANDB_API_KEY`).
//!
//! The `.wandb` file is the SDK's transaction log: a 7-byte header (`:W&B`, magic `0xBEE1`,
//! version 0), then LevelDB-log framing (32 KiB blocks; each chunk `u32 crc32(type, data)`,
//! `u16 length`, `u8 type` full/first/middle/last) of `wandb_internal.Record` protobufs:
//! `header`, `run` (entity, project, display name, config = the resolved parameters), one
//! `history` row per logged step (transformers' names: `train/loss`, ..., `eval/loss` merged into
//! the row of its step, plus `_step`, `_runtime`, `_timestamp`), `summary` (last values and the
//! run totals), `files` (the loss chart, metrics and manifest copied into `files/`) and `exit`.
//!
//! Resume: the same offline run continues; its log is rewritten without rows after the step the
//! run resumes from (and without the summary, files and exit of the interrupted attempt).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use lora_api::{EvalMetrics, RunSummary, StepMetrics};
use lora_params::ResolvedParams;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::proto::{self, Msg};
use super::{Env, Have, OutputFile, Start, Tracker, TrackerError};

const NAME: &str = "wandb";

const BLOCK: usize = 32 * 1024;
const CHUNK_HEADER: usize = 7;
const FULL: u8 = 1;
const FIRST: u8 = 2;
const MIDDLE: u8 = 3;
const LAST: u8 = 4;
/// `:W&B`, magic 0xBEE1 (little-endian), version 0.
pub const FILE_HEADER: [u8; 7] = [b':', b'W', b'&', b'B', 0xE1, 0xBE, 0];

/// `Record` field numbers of the record kinds written here.
mod field {
    pub const NUM: u32 = 1;
    pub const HISTORY: u32 = 2;
    pub const SUMMARY: u32 = 3;
    pub const CONFIG: u32 = 5;
    pub const FILES: u32 = 6;
    pub const RUN: u32 = 17;
    pub const EXIT: u32 = 18;
    pub const HEADER: u32 = 21;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Offline,
    /// `WANDB_MODE=disabled`: nothing is written.
    Disabled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    /// `$WANDB_DIR` (default `pvc_path`); runs go to `<dir>/wandb/`.
    pub dir: PathBuf,
    pub project: String,
    pub entity: Option<String>,
    pub run_name: Option<String>,
    /// `WANDB_RUN_ID`, when set: the W&B run id to use.
    pub run_id: Option<String>,
    pub group: Option<String>,
    pub job_type: Option<String>,
    pub tags: Vec<String>,
    pub notes: Option<String>,
}

impl Settings {
    /// Enabled by any of the `training_wandb_*` parameters; the rest from the `wandb` SDK's
    /// variables (`WANDB_MODE`, `WANDB_DIR`, `WANDB_PROJECT`, `WANDB_ENTITY`, `WANDB_NAME`,
    /// `WANDB_RUN_ID`, `WANDB_RUN_GROUP`, `WANDB_JOB_TYPE`, `WANDB_TAGS`, `WANDB_NOTES`).
    pub fn resolve(p: &ResolvedParams, pvc_path: &Path, env: Env) -> Result<Option<Settings>, TrackerError> {
        let params = &p.params;
        if params.training_wandb_project.is_none() && params.training_wandb_entity.is_none() && params.training_wandb_run_name.is_none() {
            return Ok(None);
        }
        let mode = match env("WANDB_MODE").map(|m| m.to_ascii_lowercase()).as_deref() {
            None | Some("offline") | Some("dryrun") => Mode::Offline,
            Some("disabled") => Mode::Disabled,
            Some(online @ ("online" | "run" | "shared")) => {
                let key = if env("WANDB_API_KEY").is_none() { " (and WANDB_API_KEY is not set, which online mode would need)" } else { "" };
                return Err(TrackerError::setting(
                    NAME,
                    format!("WANDB_MODE={online}"),
                    format!("lora writes W&B runs offline only (streaming to W&B is not built){key}; unset WANDB_MODE or set it to offline, then upload the run folder with `wandb sync` (see the README)"),
                ));
            }
            Some(other) => {
                return Err(TrackerError::setting(NAME, format!("WANDB_MODE={other}"), "expected offline (the default here), dryrun or disabled"));
            }
        };
        let dir = env("WANDB_DIR").map(PathBuf::from).unwrap_or_else(|| pvc_path.to_path_buf());
        let dir = if dir.is_absolute() { dir } else { std::env::current_dir().map(|c| c.join(&dir)).unwrap_or(dir) };
        let run_id = env("WANDB_RUN_ID");
        if let Some(id) = &run_id
            && (id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(TrackerError::setting(NAME, format!("WANDB_RUN_ID={id}"), "a W&B run id is 1 to 64 letters, digits, - or _"));
        }
        Ok(Some(Settings {
            mode,
            dir,
            // transformers' WandbCallback default project.
            project: params.training_wandb_project.clone().or_else(|| env("WANDB_PROJECT")).unwrap_or_else(|| "huggingface".into()),
            entity: params.training_wandb_entity.clone().or_else(|| env("WANDB_ENTITY")),
            run_name: params.training_wandb_run_name.clone().or_else(|| env("WANDB_NAME")),
            run_id,
            group: env("WANDB_RUN_GROUP"),
            job_type: env("WANDB_JOB_TYPE"),
            tags: env("WANDB_TAGS").map(|t| t.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect()).unwrap_or_default(),
            notes: env("WANDB_NOTES"),
        }))
    }

    pub fn describe(&self) -> Value {
        match self.mode {
            Mode::Disabled => json!({"mode": "disabled", "note": "WANDB_MODE=disabled: no W&B run is written"}),
            Mode::Offline => {
                let runs = self.dir.join("wandb");
                json!({
                    "mode": "offline",
                    "project": self.project,
                    "entity": self.entity,
                    "run_name": self.run_name,
                    "run_dir": format!("{}/offline-run-<YYYYmmdd_HHMMSS>-<id>/", runs.display()),
                    "sync": format!("WANDB_API_KEY=... wandb sync {}/offline-run-<YYYYmmdd_HHMMSS>-<id>", runs.display()),
                })
            }
        }
    }
}

/// The chunks of one record in LevelDB-log framing, starting at file offset `offset`.
fn frame(offset: usize, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 2 * CHUNK_HEADER);
    let mut pos = offset;
    let mut rest = data;
    let mut first = true;
    loop {
        let left = BLOCK - pos % BLOCK;
        if left < CHUNK_HEADER {
            out.extend(std::iter::repeat_n(0u8, left));
            pos += left;
            continue;
        }
        let room = left - CHUNK_HEADER;
        let (chunk, more) = if rest.len() <= room { (rest, false) } else { (&rest[..room], true) };
        let kind = match (first, more) {
            (true, false) => FULL,
            (true, true) => FIRST,
            (false, true) => MIDDLE,
            (false, false) => LAST,
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        crc.update(chunk);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        out.push(kind);
        out.extend_from_slice(chunk);
        pos += CHUNK_HEADER + chunk.len();
        rest = &rest[chunk.len()..];
        first = false;
        if !more {
            return out;
        }
    }
}

/// The records of a `.wandb` file, up to the first torn or corrupt chunk; `None` when the file
/// does not start with the W&B header.
pub fn read_records(bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    if bytes.get(..FILE_HEADER.len())? != FILE_HEADER {
        return None;
    }
    let mut out = Vec::new();
    let mut pos = FILE_HEADER.len();
    let mut partial: Option<Vec<u8>> = None;
    while pos < bytes.len() {
        let left = BLOCK - pos % BLOCK;
        if left < CHUNK_HEADER {
            pos += left;
            continue;
        }
        let Some(head) = bytes.get(pos..pos + CHUNK_HEADER) else { break };
        let crc = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = usize::from(u16::from_le_bytes([head[4], head[5]]));
        let kind = head[6];
        if crc == 0 && len == 0 && kind == 0 {
            pos += left; // zero padding to the block's end
            continue;
        }
        let Some(chunk) = bytes.get(pos + CHUNK_HEADER..pos + CHUNK_HEADER + len) else { break };
        let mut h = crc32fast::Hasher::new();
        h.update(&[kind]);
        h.update(chunk);
        if h.finalize() != crc {
            break;
        }
        pos += CHUNK_HEADER + len;
        match (kind, partial.as_mut()) {
            (FULL, _) => out.push(chunk.to_vec()),
            (FIRST, _) => partial = Some(chunk.to_vec()),
            (MIDDLE, Some(p)) => p.extend_from_slice(chunk),
            (LAST, Some(_)) => {
                let mut p = partial.take().unwrap_or_default();
                p.extend_from_slice(chunk);
                out.push(p);
            }
            _ => break,
        }
    }
    Some(out)
}

/// The history rows of an offline run folder's log, as JSON objects (`_step`, `train/loss`, ...).
/// For tests and inspection (`wandb leet inspect` is the reference reader).
pub fn history(run_dir: &Path) -> Vec<Value> {
    let Some(log) = fs::read_dir(run_dir).ok().and_then(|d| {
        d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "wandb"))
    }) else {
        return Vec::new();
    };
    let bytes = fs::read(log).unwrap_or_default();
    rows_of(&read_records(&bytes).unwrap_or_default())
}

/// The history rows among `records`, as JSON objects.
fn rows_of(records: &[Vec<u8>]) -> Vec<Value> {
    records
        .iter()
        .filter_map(|r| proto::bytes_of(r, field::HISTORY))
        .map(|h| {
            let mut row = Map::new();
            for f in proto::fields(h).unwrap_or_default() {
                if let proto::Field::Bytes(1, item) = f {
                    let key = proto::bytes_of(item, 1).map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                    let value = proto::bytes_of(item, 16).and_then(|v| serde_json::from_slice(v).ok()).unwrap_or(Value::Null);
                    row.insert(key, value);
                }
            }
            Value::Object(row)
        })
        .collect()
}

fn json_number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        serde_json::to_string(&v).unwrap_or_else(|_| "null".into())
    }
}

/// `{key, value_json}` items (ConfigItem, SummaryItem, HistoryItem share the layout).
fn items(values: &[(String, String)]) -> Msg {
    values.iter().fold(Msg::new(), |m, (k, v)| m.msg(1, &Msg::new().string(1, k).string(16, v)))
}

fn timestamp(unix: f64) -> Msg {
    Msg::new().varint(1, unix.floor() as i64).varint(2, ((unix.fract()) * 1e9) as i64)
}

/// The record kind (its `Record` field number) and `_step` of a history row.
fn kind_of(record: &[u8]) -> Option<(u32, Option<u64>)> {
    let fields = proto::fields(record)?;
    let kind = fields.iter().map(|f| f.number()).find(|n| *n != field::NUM && *n != 16 && *n != 19 && *n != 200)?;
    let step = (kind == field::HISTORY)
        .then(|| proto::bytes_of(record, field::HISTORY).and_then(|h| proto::bytes_of(h, 2)).and_then(|s| proto::varint_of(s, 1)))
        .flatten();
    Some((kind, step))
}

/// One history row being filled (a step and the evaluation at the same step).
struct Row {
    step: u64,
    values: Vec<(String, String)>,
}

/// The W&B offline run of one lora run.
pub struct Wandb {
    settings: Settings,
    run_dir: Option<PathBuf>,
    log: Option<(PathBuf, File)>,
    /// Bytes in the log file (block positions depend on it).
    offset: usize,
    num: i64,
    row: Option<Row>,
    /// The last value of every logged key, and the run totals: the summary.
    summary: Map<String, Value>,
    started_unix: f64,
    closed: bool,
}

impl Wandb {
    pub fn connect(s: &Settings) -> Result<Wandb, TrackerError> {
        let runs = s.dir.join("wandb");
        fs::create_dir_all(&runs).map_err(TrackerError::io(NAME, "creating the W&B folder (WANDB_DIR)", &runs))?;
        Ok(Wandb {
            settings: s.clone(),
            run_dir: None,
            log: None,
            offset: 0,
            num: 0,
            row: None,
            summary: Map::new(),
            started_unix: 0.0,
            closed: false,
        })
    }

    fn append(&mut self, kind: u32, body: &Msg) -> Result<(), TrackerError> {
        let Some((path, file)) = self.log.as_mut() else { return Ok(()) };
        self.num += 1;
        let record = Msg::new().varint(field::NUM, self.num).msg(kind, body).into_bytes();
        let bytes = frame(self.offset, &record);
        file.write_all(&bytes).and_then(|_| file.flush()).map_err(TrackerError::io(NAME, "writing", path))?;
        self.offset += bytes.len();
        Ok(())
    }

    fn flush_row(&mut self) -> Result<(), TrackerError> {
        let Some(row) = self.row.take() else { return Ok(()) };
        let body = items(&row.values).msg(2, &Msg::new().varint(1, row.step as i64));
        self.append(field::HISTORY, &body)
    }

    /// Adds values to the row of `step` (a new row flushes the previous one).
    fn log(&mut self, step: u64, elapsed_s: f64, values: Vec<(String, f64)>) -> Result<(), TrackerError> {
        if self.row.as_ref().is_some_and(|r| r.step != step) {
            self.flush_row()?;
        }
        let now = super::now_unix();
        let row = self.row.get_or_insert_with(|| Row { step, values: vec![("_step".into(), step.to_string())] });
        row.values.retain(|(k, _)| k != "_runtime" && k != "_timestamp");
        row.values.push(("_runtime".into(), json_number(elapsed_s)));
        row.values.push(("_timestamp".into(), json_number(now)));
        for (k, v) in values {
            self.summary.insert(k.clone(), json!(v));
            row.values.push((k, json_number(v)));
        }
        Ok(())
    }

    fn config(params: &Map<String, Value>) -> Msg {
        let values: Vec<(String, String)> = params.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
        items(&values)
    }

    /// The run's log rewritten without what a resumed attempt redoes (rows after `start_step`)
    /// or writes again (summary, files, exit); returns the records kept and the last `num`.
    fn trimmed(path: &Path, start_step: u64) -> Result<(Vec<Vec<u8>>, i64), TrackerError> {
        let bytes = fs::read(path).map_err(TrackerError::io(NAME, "reading", path))?;
        let records = read_records(&bytes).ok_or_else(|| TrackerError::Io {
            tracker: NAME,
            what: "reading",
            path: path.to_path_buf(),
            source: std::io::Error::other("not a W&B transaction log (no :W&B header)"),
        })?;
        let kept: Vec<Vec<u8>> = records
            .into_iter()
            .filter(|r| match kind_of(r) {
                Some((field::SUMMARY | field::FILES | field::EXIT, _)) => false,
                Some((field::HISTORY, step)) => step.is_some_and(|s| s <= start_step),
                _ => true,
            })
            .collect();
        let last = kept.iter().filter_map(|r| proto::varint_of(r, field::NUM)).max().unwrap_or(0) as i64;
        Ok((kept, last))
    }

    fn open_new(&mut self, s: &Start) -> Result<(), TrackerError> {
        let id = self.settings.run_id.clone().unwrap_or_else(|| {
            let h = Sha256::digest(format!("{}:{}", s.state.run_id, s.state.started_unix).as_bytes());
            crate::hub::hex(&h)[..8].to_string()
        });
        let dir = self.settings.dir.join("wandb").join(format!("offline-run-{}-{id}", s.state.started));
        fs::create_dir_all(dir.join("files")).map_err(TrackerError::io(NAME, "creating", &dir))?;
        let path = dir.join(format!("run-{id}.wandb"));
        let file = File::create(&path).map_err(TrackerError::io(NAME, "creating", &path))?;
        self.log = Some((path.clone(), file));
        self.offset = 0;
        self.num = 0;
        if let Some((_, f)) = self.log.as_mut() {
            f.write_all(&FILE_HEADER).map_err(TrackerError::io(NAME, "writing", &path))?;
        }
        self.offset = FILE_HEADER.len();
        let version = Msg::new().string(1, &format!("lora {}", env!("CARGO_PKG_VERSION"))).string(2, "0.70.0");
        self.append(field::HEADER, &Msg::new().msg(1, &version))?;
        let st = &self.settings;
        let mut run = Msg::new().string(1, &id).string(3, &st.project).msg(4, &Self::config(s.params));
        if let Some(e) = &st.entity {
            run = run.string(2, e);
        }
        for (n, v) in [(6, &st.group), (7, &st.job_type), (8, &st.run_name), (9, &st.notes)] {
            if let Some(v) = v {
                run = run.string(n, v);
            }
        }
        for t in &st.tags {
            run = run.string(10, t);
        }
        let run = run.string(13, &super::hostname()).msg(17, &timestamp(s.state.started_unix));
        self.append(field::RUN, &run)?;
        self.run_dir = Some(dir);
        Ok(())
    }

    fn close(&mut self, exit_code: i64, files: &[OutputFile]) -> Vec<String> {
        if self.closed || self.log.is_none() {
            return Vec::new();
        }
        self.closed = true;
        let mut warnings = Vec::new();
        let mut result = self.flush_row();
        if result.is_ok() {
            let values: Vec<(String, String)> = self.summary.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
            result = self.append(field::SUMMARY, &items(&values));
        }
        let mut copied = Msg::new();
        if let Some(dir) = self.run_dir.clone() {
            for f in files.iter().filter(|f| f.path.is_file()) {
                let dest = dir.join("files").join(f.name);
                match fs::copy(&f.path, &dest) {
                    Ok(_) => copied = copied.msg(1, &Msg::new().string(1, f.name).varint(2, 1)),
                    Err(e) => warnings.push(format!("copying {} into {}: {e}", f.path.display(), dest.display())),
                }
            }
        }
        if result.is_ok() && !copied.0.is_empty() {
            result = self.append(field::FILES, &copied);
        }
        if result.is_ok() {
            let runtime = (super::now_unix() - self.started_unix).max(0.0) as i64;
            result = self.append(field::EXIT, &Msg::new().varint(1, exit_code).varint(2, runtime));
        }
        if let Err(e) = result {
            warnings.push(e.to_string());
        } else if let Some(dir) = &self.run_dir {
            eprintln!("lora: wandb: offline run complete in {}; upload it with `wandb sync {}`", dir.display(), dir.display());
        }
        self.log = None;
        warnings
    }
}

impl Tracker for Wandb {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&mut self, s: Start) -> Result<Have, TrackerError> {
        let start_step = s.info.start_step;
        self.started_unix = s.state.started_unix;
        let runs = self.settings.dir.join("wandb");
        let mut have = Have::default();
        let earlier = s.state.wandb_run_dir.clone().filter(|d| s.resumed && d.parent() == Some(runs.as_path()) && d.is_dir());
        let log = earlier.as_ref().and_then(|d| {
            fs::read_dir(d).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "wandb"))
        });
        match (earlier, log) {
            (Some(dir), Some(path)) => {
                let (kept, last) = Self::trimmed(&path, start_step)?;
                for row in rows_of(&kept) {
                    let step = row["_step"].as_u64().unwrap_or(0);
                    if row.get("train/loss").is_some() {
                        have.step = have.step.max(step);
                    }
                    if row.get("eval/loss").is_some() {
                        have.eval = have.eval.max(step);
                    }
                    for (k, v) in row.as_object().into_iter().flatten().filter(|(k, _)| !k.starts_with('_')) {
                        self.summary.insert(k.clone(), v.clone());
                    }
                }
                let mut bytes = FILE_HEADER.to_vec();
                for r in &kept {
                    bytes.extend(frame(bytes.len(), r));
                }
                crate::fs::write_atomic(&path, &bytes).map_err(TrackerError::io(NAME, "rewriting", &path))?;
                let file = fs::OpenOptions::new().append(true).open(&path).map_err(TrackerError::io(NAME, "opening", &path))?;
                self.offset = bytes.len();
                self.num = last;
                self.log = Some((path, file));
                // The parameters as this attempt uses them (logging settings may differ).
                self.append(field::CONFIG, &Self::config(s.params))?;
                self.run_dir = Some(dir);
            }
            _ => {
                if s.resumed {
                    eprintln!("lora: wandb: resuming after step {start_step} into a new offline run (the earlier one is not in {})", runs.display());
                }
                self.open_new(&s)?;
            }
        }
        if let Some(dir) = &self.run_dir {
            eprintln!("lora: wandb: writing the offline run {}", dir.display());
        }
        s.state.wandb_run_dir = self.run_dir.clone();
        Ok(have)
    }

    fn step(&mut self, m: &StepMetrics) -> Result<(), TrackerError> {
        let values = super::step_values(m).iter().map(|(k, v)| (super::hf_name(k), *v)).collect();
        self.log(m.step, m.elapsed_s, values)
    }

    fn eval(&mut self, m: &EvalMetrics) -> Result<(), TrackerError> {
        let elapsed = super::now_unix() - self.started_unix;
        let values = super::eval_values(m).iter().map(|(k, v)| (super::hf_name(k), *v)).collect();
        self.log(m.step, elapsed, values)
    }

    fn checkpoint(&mut self) -> Result<(), TrackerError> {
        self.flush_row()
    }

    fn finish(&mut self, s: &RunSummary) -> Result<(), TrackerError> {
        self.flush_row()?;
        for (k, v) in super::summary_values(s) {
            self.summary.insert(super::hf_name(k), json!(v));
        }
        Ok(())
    }

    fn outputs(&mut self, files: &[OutputFile]) -> Vec<String> {
        self.close(0, files)
    }

    fn abort(&mut self) {
        for w in self.close(1, &[]) {
            eprintln!("lora: warning: wandb: {w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cross_blocks_and_read_back() {
        // Sizes that end exactly at a block edge, leave less than a chunk header, and span blocks.
        let records: Vec<Vec<u8>> = [10usize, BLOCK - FILE_HEADER.len() - 2 * CHUNK_HEADER - 10, 3, 70_000, 5]
            .iter()
            .enumerate()
            .map(|(i, n)| (0..*n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let mut file = FILE_HEADER.to_vec();
        for r in &records {
            file.extend(frame(file.len(), r));
        }
        assert_eq!(read_records(&file).unwrap(), records);
        // A torn tail loses only the last record.
        file.truncate(file.len() - 2);
        assert_eq!(read_records(&file).unwrap(), records[..4].to_vec());
        assert!(read_records(b"not a log").is_none());
    }

    #[test]
    fn framing_is_byte_for_byte_the_sdks() {
        // The start of a `run-*.wandb` that wandb 0.31 wrote (`wandb.init(mode="offline")`):
        // the file header and its first record (the `header` record, 77 bytes).
        let sdk = "3a572642e1be008a45d6974d00010801c20c0a0a08616c363678673973aa013b0a390a2f302e33312e302b313566386362633538316431633563666336653331663638623438626464313363656332646432631206302e37302e30";
        let sdk: Vec<u8> = (0..sdk.len()).step_by(2).map(|i| u8::from_str_radix(&sdk[i..i + 2], 16).unwrap()).collect();
        let record = &sdk[14..];
        let mut ours = FILE_HEADER.to_vec();
        ours.extend(frame(ours.len(), record));
        assert_eq!(ours, sdk);
        assert_eq!(read_records(&sdk).unwrap(), vec![record.to_vec()]);
        assert_eq!(kind_of(record), Some((field::HEADER, None)));
    }
}
