//! TensorBoard: event files in `<training_tensorboard_log_dir>/<YYYYmmdd_HHMMSS>_<run id>/`,
//! one folder per run (TensorBoard shows each as a run, the HParams tab as a session), one
//! `events.out.tfevents.*` file per attempt.
//!
//! Records are TFRecords (`u64 length, masked CRC-32C, data, masked CRC-32C`) holding
//! `tensorboard.Event` protobufs ([`super::proto`]):
//! - the first event of each file: `file_version = "brain.Event:2"`;
//! - scalars as `Summary.Value.simple_value` (float32, what `torch.utils.tensorboard` writes)
//!   under transformers' names: `train/loss`, `train/learning_rate`, `train/grad_norm`,
//!   `train/tokens_per_second`, `train/epoch`, `train/tokens`, `train/trained_tokens` per logged
//!   step; `eval/loss`, `eval/perplexity`, `eval/tokens` per evaluation; the run totals
//!   (`train/train_loss`, `train/train_runtime`, ...) at the last step;
//! - the HParams plugin's summaries (`_hparams_/experiment`, `_hparams_/session_start_info` with
//!   every resolved parameter, `_hparams_/session_end_info` with success or failure).
//!
//! Resume: before a resumed attempt writes, the earlier attempts' files are rewritten without
//! what comes after the step it resumes from (and without their totals and session end), applying
//! to the files what TensorBoard itself does in memory when it meets a restart marker
//! (`SessionLog.START` at step N drops every earlier event at step >= N); the new file starts
//! with such a marker too, so a TensorBoard already showing the run drops the stale points.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use lora_api::{EvalMetrics, RunSummary, StepMetrics};
use lora_params::ResolvedParams;
use serde_json::{Map, Value, json};

use super::proto::{self, Field, Msg};
use super::{Have, OutputFile, Start, Tracker, TrackerError};

const NAME: &str = "tensorboard";

pub const EXPERIMENT_TAG: &str = "_hparams_/experiment";
pub const SESSION_START_TAG: &str = "_hparams_/session_start_info";
pub const SESSION_END_TAG: &str = "_hparams_/session_end_info";

/// The metrics the HParams table shows for each run.
const HPARAMS_METRICS: [&str; 8] = [
    "train/loss",
    "train/learning_rate",
    "train/grad_norm",
    "train/tokens_per_second",
    "eval/loss",
    "eval/perplexity",
    "train/train_loss",
    "train/train_runtime",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `training_tensorboard_log_dir`, absolute.
    pub log_dir: PathBuf,
}

impl Settings {
    pub fn resolve(p: &ResolvedParams) -> Result<Option<Settings>, TrackerError> {
        let Some(dir) = p.params.training_tensorboard_log_dir.as_deref() else { return Ok(None) };
        let dir = PathBuf::from(dir.trim());
        let log_dir = if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir()
                .map_err(|e| TrackerError::setting(NAME, "training_tensorboard_log_dir", format!("relative path and no current directory: {e}")))?
                .join(dir)
        };
        Ok(Some(Settings { log_dir }))
    }

    pub fn describe(&self) -> Value {
        json!({
            "log_dir": self.log_dir,
            "run_dir": format!("{}/<YYYYmmdd_HHMMSS>_<run id>/", self.log_dir.display()),
            "view": format!("tensorboard --logdir {}", self.log_dir.display()),
        })
    }
}

/// The TensorBoard tracker of one run.
pub struct TensorBoard {
    log_dir: PathBuf,
    file: Option<(PathBuf, File)>,
    last_step: u64,
}

/// `Event { wall_time, step, <what> }`.
fn event(wall_time: f64, step: u64, what: impl FnOnce(Msg) -> Msg) -> Vec<u8> {
    what(Msg::new().double(1, wall_time).varint(2, step as i64)).into_bytes()
}

/// `Summary { value: [{tag, simple_value}] }`.
fn scalar_summary(values: &[(String, f64)]) -> Msg {
    values.iter().fold(Msg::new(), |m, (tag, v)| m.msg(1, &Msg::new().string(1, tag).float(2, *v as f32)))
}

/// A `Summary` holding one HParams plugin summary: the plugin data in the metadata, the null
/// tensor as value (as `tensorboard.plugins.hparams.summary` writes them).
fn hparams_summary(tag: &str, plugin_data: &Msg) -> Msg {
    let metadata = Msg::new().msg(1, &Msg::new().string(1, "hparams").msg(2, plugin_data));
    let null_tensor = Msg::new().varint(1, 1).msg(2, &Msg::new().msg(2, &Msg::new()));
    Msg::new().msg(1, &Msg::new().string(1, tag).msg(9, &metadata).msg(8, &null_tensor))
}

/// `google.protobuf.Value` of a parameter; `None` for unset (null) values.
fn hparam_value(v: &Value) -> Option<(Msg, i64)> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => (Msg::new().boolean(4, *b), 2),
        Value::Number(n) => (Msg::new().double(2, n.as_f64()?), 3),
        Value::String(s) => (Msg::new().string(3, s), 1),
        other => (Msg::new().string(3, &other.to_string()), 1),
    })
}

/// The experiment (which hyperparameters and metrics the HParams tab lists) and this run's
/// session start (its hyperparameter values).
fn hparams_events(params: &Map<String, Value>, wall_time: f64) -> Vec<Vec<u8>> {
    let mut infos = Msg::new();
    let mut session = Msg::new();
    for (name, v) in params {
        let Some((value, data_type)) = hparam_value(v) else { continue };
        infos = infos.msg(4, &Msg::new().string(1, name).varint(4, data_type));
        session = session.msg(1, &Msg::new().string(1, name).msg(2, &value));
    }
    let experiment = HPARAMS_METRICS.iter().fold(infos.string(6, "lora").double(3, wall_time), |m, tag| {
        m.msg(5, &Msg::new().msg(1, &Msg::new().string(2, tag)))
    });
    let session = session.double(5, wall_time);
    vec![
        event(wall_time, 0, |e| e.msg(5, &hparams_summary(EXPERIMENT_TAG, &Msg::new().msg(2, &experiment)))),
        event(wall_time, 0, |e| e.msg(5, &hparams_summary(SESSION_START_TAG, &Msg::new().msg(3, &session)))),
    ]
}

/// What [`trim`] needs to know of a record.
struct Parsed {
    step: u64,
    /// A restart marker (`SessionLog.START`).
    restart: bool,
    /// Run totals or a session end: written again by the attempt that finishes.
    end_of_run: bool,
}

fn totals_tags() -> Vec<String> {
    let s = RunSummary {
        total_steps: 1,
        epochs: 1.0,
        train_loss: 1.0,
        final_loss: 1.0,
        min_loss: 1.0,
        final_eval_loss: Some(1.0),
        final_perplexity: Some(1.0),
        tokens: 1,
        trained_tokens: 1,
        tokens_per_second: 1.0,
        peak_memory_bytes: 1,
        train_runtime: 1.0,
    };
    super::summary_values(&s).into_iter().map(|(k, _)| super::hf_name(k)).collect()
}

fn parse(record: &[u8], totals: &[String]) -> Option<Parsed> {
    let fields = proto::fields(record)?;
    let step = fields.iter().find_map(|f| match f {
        Field::Varint(2, v) => Some(*v),
        _ => None,
    })?;
    let restart = proto::bytes_of(record, 7).and_then(|log| proto::varint_of(log, 1)) == Some(1);
    let tags: Vec<&[u8]> = proto::bytes_of(record, 5)
        .and_then(proto::fields)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| match f {
            Field::Bytes(1, value) => proto::bytes_of(value, 1),
            _ => None,
        })
        .collect();
    let end_of_run = tags.iter().any(|t| *t == SESSION_END_TAG.as_bytes() || totals.iter().any(|x| x.as_bytes() == *t));
    Some(Parsed { step, restart, end_of_run })
}

/// The event files of a run folder, in the order TensorBoard reads them (by name).
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("tfevents") && !n.contains(".tmp-")))
        .collect();
    files.sort();
    files
}

/// Rewrites the earlier attempts' event files of a run resuming after `start_step` so that each
/// step is there once: what a later attempt's restart marker supersedes, what comes after
/// `start_step`, totals and session ends go; a torn last record (a killed write) goes too.
/// Files whose records all stay are not touched. Returns how many records were dropped.
pub fn trim(dir: &Path, start_step: u64) -> Result<usize, TrackerError> {
    let totals = totals_tags();
    let files = event_files(dir);
    let mut contents = Vec::new();
    for path in &files {
        contents.push(fs::read(path).map_err(TrackerError::io(NAME, "reading", path))?);
    }
    // (file, records, keep flags)
    let mut all: Vec<(Vec<&[u8]>, Vec<bool>)> = contents
        .iter()
        .map(|bytes| {
            let records = proto::read_tfrecords(bytes);
            let keep = vec![true; records.len()];
            (records, keep)
        })
        .collect();
    for k in 0..all.len() {
        for i in 0..all[k].0.len() {
            let Some(p) = parse(all[k].0[i], &totals) else { continue };
            if p.step > start_step || p.end_of_run {
                all[k].1[i] = false;
                continue;
            }
            if p.restart {
                // As TensorBoard does: earlier files' events at or after the restart step go.
                for (records, keep) in all.iter_mut().take(k) {
                    for (r, flag) in records.iter().zip(keep.iter_mut()) {
                        if parse(r, &totals).is_some_and(|q| q.step >= p.step && !q.restart) {
                            *flag = false;
                        }
                    }
                }
            }
        }
    }
    let mut dropped = 0;
    for ((path, bytes), (records, keep)) in files.iter().zip(&contents).zip(&all) {
        let kept: Vec<u8> = records.iter().zip(keep).filter(|(_, k)| **k).flat_map(|(r, _)| proto::tfrecord(r)).collect();
        if kept.len() != bytes.len() {
            dropped += keep.iter().filter(|k| !**k).count();
            crate::fs::write_atomic(path, &kept).map_err(TrackerError::io(NAME, "rewriting", path))?;
        }
    }
    Ok(dropped)
}

/// Every scalar in the event files of a run folder, in file order: (tag, step, value). For
/// tests and inspection (TensorBoard's own reader is the reference).
pub fn scalars(run_dir: &Path) -> Vec<(String, u64, f32)> {
    let mut out = Vec::new();
    for path in event_files(run_dir) {
        let Ok(bytes) = fs::read(&path) else { continue };
        for record in proto::read_tfrecords(&bytes) {
            let Some(step) = proto::varint_of(record, 2) else { continue };
            let Some(summary) = proto::bytes_of(record, 5) else { continue };
            for f in proto::fields(summary).unwrap_or_default() {
                let Field::Bytes(1, value) = f else { continue };
                let tag = proto::bytes_of(value, 1).map(|t| String::from_utf8_lossy(t).into_owned());
                let v = proto::fields(value).unwrap_or_default().into_iter().find_map(|f| match f {
                    Field::Fixed32(2, bits) => Some(f32::from_bits(bits)),
                    _ => None,
                });
                if let (Some(tag), Some(v)) = (tag, v) {
                    out.push((tag, step, v));
                }
            }
        }
    }
    out
}

impl TensorBoard {
    pub fn connect(s: &Settings) -> Result<TensorBoard, TrackerError> {
        fs::create_dir_all(&s.log_dir).map_err(TrackerError::io(NAME, "creating training_tensorboard_log_dir", &s.log_dir))?;
        Ok(TensorBoard { log_dir: s.log_dir.clone(), file: None, last_step: 0 })
    }

    fn write(&mut self, records: &[Vec<u8>]) -> Result<(), TrackerError> {
        let Some((path, file)) = self.file.as_mut() else { return Ok(()) };
        let bytes: Vec<u8> = records.iter().flat_map(|r| proto::tfrecord(r)).collect();
        file.write_all(&bytes).and_then(|_| file.flush()).map_err(TrackerError::io(NAME, "writing", path))
    }

    fn end_session(&mut self, status: i64) -> Result<(), TrackerError> {
        let now = super::now_unix();
        let end = Msg::new().varint(1, status).double(2, now);
        let rec = event(now, self.last_step, |e| e.msg(5, &hparams_summary(SESSION_END_TAG, &Msg::new().msg(4, &end))));
        let r = self.write(&[rec]);
        self.file = None;
        r
    }
}

impl Tracker for TensorBoard {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&mut self, s: Start) -> Result<Have, TrackerError> {
        let start_step = s.info.start_step;
        let earlier = s.state.tensorboard_dir.clone().filter(|d| s.resumed && d.parent() == Some(self.log_dir.as_path()) && d.is_dir());
        let continuing = earlier.is_some();
        let dir = earlier.unwrap_or_else(|| self.log_dir.join(format!("{}_{}", s.state.started, s.info.run_id)));
        let mut have = Have::default();
        if continuing {
            let dropped = trim(&dir, start_step)?;
            for (tag, step, _) in scalars(&dir) {
                match tag.as_str() {
                    "train/loss" => have.step = have.step.max(step),
                    "eval/loss" => have.eval = have.eval.max(step),
                    _ => {}
                }
            }
            if dropped > 0 {
                eprintln!("lora: tensorboard: resuming after step {start_step}: removed {dropped} later event(s) an interrupted attempt wrote in {}", dir.display());
            }
        } else if s.resumed {
            eprintln!(
                "lora: tensorboard: steps up to {start_step} of this run were logged before training_tensorboard_log_dir pointed at {}; they are in the earlier folder{}",
                self.log_dir.display(),
                s.state.tensorboard_dir.as_ref().map(|d| format!(" {}", d.display())).unwrap_or_default()
            );
        }
        fs::create_dir_all(&dir).map_err(TrackerError::io(NAME, "creating", &dir))?;
        let now = super::now_unix();
        let base = format!("events.out.tfevents.{}.{}.{}", now as u64, super::hostname(), std::process::id());
        let (path, file) = (0..100)
            .find_map(|n| {
                let name = if n == 0 { base.clone() } else { format!("{base}.{n}") };
                let path = dir.join(name);
                fs::OpenOptions::new().write(true).create_new(true).open(&path).ok().map(|f| (path, f))
            })
            .ok_or_else(|| TrackerError::Io {
                tracker: NAME,
                what: "creating an event file in",
                path: dir.clone(),
                source: std::io::Error::other("no free file name"),
            })?;
        self.file = Some((path, file));
        self.last_step = start_step;
        let mut records = vec![event(now, start_step, |e| e.string(3, "brain.Event:2"))];
        if continuing {
            records.push(event(now, start_step + 1, |e| e.msg(7, &Msg::new().varint(1, 1))));
        } else {
            records.extend(hparams_events(s.params, now));
        }
        self.write(&records)?;
        eprintln!("lora: tensorboard: writing {}", dir.display());
        s.state.tensorboard_dir = Some(dir);
        Ok(have)
    }

    fn step(&mut self, m: &StepMetrics) -> Result<(), TrackerError> {
        self.last_step = m.step;
        let values: Vec<(String, f64)> = super::step_values(m).iter().map(|(k, v)| (super::hf_name(k), *v)).collect();
        self.write(&[event(super::now_unix(), m.step, |e| e.msg(5, &scalar_summary(&values)))])
    }

    fn eval(&mut self, m: &EvalMetrics) -> Result<(), TrackerError> {
        let values: Vec<(String, f64)> = super::eval_values(m).iter().map(|(k, v)| (super::hf_name(k), *v)).collect();
        self.write(&[event(super::now_unix(), m.step, |e| e.msg(5, &scalar_summary(&values)))])
    }

    fn finish(&mut self, s: &RunSummary) -> Result<(), TrackerError> {
        self.last_step = s.total_steps;
        let values: Vec<(String, f64)> = super::summary_values(s).into_iter().map(|(k, v)| (super::hf_name(k), v)).collect();
        self.write(&[event(super::now_unix(), s.total_steps, |e| e.msg(5, &scalar_summary(&values)))])
    }

    fn outputs(&mut self, _: &[OutputFile]) -> Vec<String> {
        self.end_session(1).err().map(|e| e.to_string()).into_iter().collect()
    }

    fn abort(&mut self) {
        let _ = self.end_session(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_event(step: u64) -> Vec<u8> {
        event(1.0, step, |e| e.msg(5, &scalar_summary(&[("train/loss".into(), step as f64)])))
    }

    fn steps_in(path: &Path) -> Vec<u64> {
        let bytes = fs::read(path).unwrap();
        proto::read_tfrecords(&bytes).iter().filter_map(|r| parse(r, &[]).map(|p| p.step)).collect()
    }

    #[test]
    fn trimming_keeps_each_step_once_across_attempts() {
        let dir = std::env::temp_dir().join(format!("lora-tb-trim-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // Attempt a: steps 1..=8 (killed after 8, mid-write of 9); attempt b resumed from 5,
        // wrote 6 and 7 and a summary; now attempt c resumes from checkpoint 7.
        let mut a: Vec<u8> = (1..=8).flat_map(|s| proto::tfrecord(&scalar_event(s))).collect();
        a.extend(&proto::tfrecord(&scalar_event(9))[..20]);
        let mut b = proto::tfrecord(&event(1.0, 5, |e| e.string(3, "brain.Event:2")));
        b.extend(proto::tfrecord(&event(1.0, 6, |e| e.msg(7, &Msg::new().varint(1, 1)))));
        b.extend((6..=7).flat_map(|s| proto::tfrecord(&scalar_event(s))));
        b.extend(proto::tfrecord(&event(1.0, 7, |e| e.msg(5, &scalar_summary(&[("train/train_loss".into(), 1.0)])))));
        fs::write(dir.join("events.out.tfevents.1.h.1"), &a).unwrap();
        fs::write(dir.join("events.out.tfevents.2.h.2"), &b).unwrap();
        let dropped = trim(&dir, 7).unwrap();
        assert_eq!(steps_in(&dir.join("events.out.tfevents.1.h.1")), vec![1, 2, 3, 4, 5]);
        assert_eq!(steps_in(&dir.join("events.out.tfevents.2.h.2")), vec![5, 6, 6, 7], "version, restart marker, steps 6 and 7");
        assert_eq!(dropped, 4, "a's 6, 7, 8 and b's totals (the torn record is not a record)");
        // Nothing more to drop: files stay as they are.
        let before = fs::read(dir.join("events.out.tfevents.2.h.2")).unwrap();
        assert_eq!(trim(&dir, 7).unwrap(), 0);
        assert_eq!(fs::read(dir.join("events.out.tfevents.2.h.2")).unwrap(), before);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn hparams_carry_each_set_parameter_with_its_type() {
        let mut p = Map::new();
        p.insert("training_lora_r".into(), json!(16));
        p.insert("training_lr_scheduler".into(), json!("cosine"));
        p.insert("training_bf16".into(), json!(true));
        p.insert("training_max_steps".into(), Value::Null);
        let events = hparams_events(&p, 5.0);
        let session = proto::bytes_of(&events[1], 5).and_then(|s| proto::bytes_of(s, 1)).unwrap();
        assert_eq!(proto::bytes_of(session, 1), Some(SESSION_START_TAG.as_bytes()));
        let content = proto::bytes_of(proto::bytes_of(proto::bytes_of(session, 9).unwrap(), 1).unwrap(), 2).unwrap();
        let start_info = proto::bytes_of(content, 3).unwrap();
        let names: Vec<&[u8]> = proto::fields(start_info)
            .unwrap()
            .into_iter()
            .filter_map(|f| match f {
                Field::Bytes(1, entry) => proto::bytes_of(entry, 1),
                _ => None,
            })
            .collect();
        assert_eq!(names, vec![b"training_lora_r".as_slice(), b"training_lr_scheduler", b"training_bf16"], "unset values are left out");
    }
}
