//! Built-in reporters (they implement `lora_api::Reporter`, so a WASM reporter plugin stands in
//! the same way): `training_metrics.jsonl`, the terminal / log progress, and the run history the
//! KFP metrics and the loss chart are made from.
//!
//! `training_metrics.jsonl` is written fresh per run (the reference appends, mixing runs); on
//! resume the rows up to the resumed step are kept and the run continues after them. Rows use the
//! reference's schema (`step`, `epoch`, `max_steps`, `loss`, `grad_norm`, `learning_rate`) plus
//! `tokens_per_second`, `tokens`, `trained_tokens`; eval rows carry `eval_loss` and `perplexity`;
//! the last row holds the run totals (`train_runtime`, `train_loss`, ...).

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use lora_api::{CheckpointInfo, EvalMetrics, ExtError, Reporter, RunInfo, RunSummary, StepMetrics};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Everything a run logged, kept in memory (and in each checkpoint, so a resumed run's chart and
/// metrics cover the whole run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Logged steps (every `logging_steps`).
    pub steps: Vec<StepMetrics>,
    pub evals: Vec<EvalMetrics>,
    /// The loss of every finished optimizer step, in order (replayed into the scheduler on resume).
    pub losses: Vec<f64>,
    pub tokens: u64,
    pub trained_tokens: u64,
    /// Seconds spent training in earlier (interrupted) attempts of this run.
    pub prior_runtime_s: f64,
    /// Steps since the last logged row: (loss sum, steps, tokens, trained tokens, seconds), so a resume in the
    /// middle of a logging interval logs the same averages as an uninterrupted run.
    #[serde(default)]
    pub pending_log: (f64, u64, u64, u64, f64),
}

impl History {
    /// The run's totals from what was logged; `runtime_s` is this attempt's training time.
    pub fn summary(&self, epochs: f64, runtime_s: f64, peak_memory_bytes: u64) -> RunSummary {
        let n = self.losses.len();
        let train_runtime = self.prior_runtime_s + runtime_s;
        let last_eval = self.evals.last();
        RunSummary {
            total_steps: n as u64,
            epochs,
            train_loss: if n == 0 { f64::NAN } else { self.losses.iter().sum::<f64>() / n as f64 },
            final_loss: self.losses.last().copied().unwrap_or(f64::NAN),
            min_loss: self.losses.iter().copied().fold(f64::NAN, f64::min),
            final_eval_loss: last_eval.map(|e| e.eval_loss),
            final_perplexity: last_eval.map(|e| e.perplexity),
            tokens: self.tokens,
            trained_tokens: self.trained_tokens,
            tokens_per_second: if train_runtime > 0.0 { self.tokens as f64 / train_runtime } else { 0.0 },
            peak_memory_bytes,
            train_runtime,
        }
    }
}

fn ext(reporter: &str, call: &str, e: impl std::fmt::Display) -> ExtError {
    ExtError::failed(reporter, call, e.to_string())
}

/// Writes `training_metrics.jsonl` one flushed line per event.
pub struct JsonlReporter {
    path: PathBuf,
    file: Option<fs::File>,
    max_steps: u64,
}

impl JsonlReporter {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JsonlReporter { path: path.into(), file: None, max_steps: 0 }
    }

    fn write(&mut self, call: &str, row: &Value) -> Result<(), ExtError> {
        let file = self.file.as_mut().ok_or_else(|| ext("training_metrics.jsonl", call, "on_start was not called"))?;
        let mut line = serde_json::to_string(row).map_err(|e| ext("training_metrics.jsonl", call, e))?;
        line.push('\n');
        file.write_all(line.as_bytes())
            .and_then(|_| file.flush())
            .map_err(|e| ext("training_metrics.jsonl", call, format!("writing {}: {e}", self.path.display())))
    }
}

/// The rows of an earlier attempt worth keeping when resuming at `start_step`: step and eval
/// rows up to that step; the totals row of a finished run and anything after the step are dropped.
fn rows_to_keep(text: &str, start_step: u64) -> String {
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(row) = serde_json::from_str::<Value>(line) else { continue };
        let step = row.get("step").and_then(Value::as_u64).unwrap_or(u64::MAX);
        if step <= start_step && row.get("train_runtime").is_none() {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

impl Reporter for JsonlReporter {
    fn name(&self) -> &str {
        "training_metrics.jsonl"
    }

    fn on_start(&mut self, info: &RunInfo) -> Result<(), ExtError> {
        self.max_steps = info.total_steps;
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| ext(self.name(), "on_start", format!("creating {}: {e}", dir.display())))?;
        }
        let kept = if info.start_step > 0 {
            let old = crate::fs::read_nofollow(&self.path)
                .map_err(|e| ext(self.name(), "on_start", format!("reading {}: {e}", self.path.display())))?;
            rows_to_keep(&String::from_utf8_lossy(&old.unwrap_or_default()), info.start_step)
        } else {
            String::new()
        };
        // Fresh (or trimmed) file written whole, then appended to; no write follows a link
        // planted in the folder (a plugin granted it, another process).
        crate::fs::write_atomic(&self.path, kept.as_bytes())
            .map_err(|e| ext(self.name(), "on_start", format!("writing {}: {e}", self.path.display())))?;
        let file = crate::fs::open_append_nofollow(&self.path)
            .map_err(|e| ext(self.name(), "on_start", format!("opening {}: {e}", self.path.display())))?;
        self.file = Some(file);
        Ok(())
    }

    fn on_step(&mut self, m: &StepMetrics) -> Result<(), ExtError> {
        let row = json!({
            "step": m.step, "epoch": m.epoch, "max_steps": m.max_steps, "loss": m.loss,
            "grad_norm": m.grad_norm, "learning_rate": m.learning_rate,
            "tokens_per_second": m.tokens_per_second, "tokens": m.tokens, "trained_tokens": m.trained_tokens,
            "elapsed_s": m.elapsed_s,
        });
        self.write("on_step", &row)
    }

    fn on_eval(&mut self, m: &EvalMetrics) -> Result<(), ExtError> {
        let row = json!({
            "step": m.step, "epoch": m.epoch, "max_steps": self.max_steps, "eval_loss": m.eval_loss,
            "perplexity": m.perplexity, "eval_tokens": m.eval_tokens,
        });
        self.write("on_eval", &row)
    }

    fn on_finish(&mut self, s: &RunSummary) -> Result<(), ExtError> {
        let steps_per_s = if s.train_runtime > 0.0 { s.total_steps as f64 / s.train_runtime } else { 0.0 };
        let row = json!({
            "step": s.total_steps, "epoch": s.epochs, "max_steps": self.max_steps,
            "train_runtime": s.train_runtime, "train_loss": s.train_loss,
            "train_steps_per_second": steps_per_s, "train_tokens_per_second": s.tokens_per_second,
            "total_tokens": s.tokens, "trained_tokens": s.trained_tokens,
            "final_loss": s.final_loss, "min_loss": s.min_loss,
            "eval_loss": s.final_eval_loss, "perplexity": s.final_perplexity,
        });
        self.write("on_finish", &row)
    }
}

/// The KFP metrics (the `system.Metrics` artifact's metadata and the `output_metrics` file): run
/// results under `training_*` names plus the hyperparameters the reference logs, all numbers.
pub fn kfp_metrics(summary: &RunSummary, params: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<f64>| {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            m.insert(k.to_string(), json!(v));
        }
    };
    // The hyperparameters the reference component logs, under its names.
    for (name, param) in [
        ("num_epochs", "training_num_epochs"),
        ("effective_batch_size", "training_effective_batch_size"),
        ("learning_rate", "training_learning_rate"),
        ("max_seq_len", "training_max_seq_len"),
        ("max_tokens_per_gpu", "training_max_tokens_per_gpu"),
        ("lora_r", "training_lora_r"),
        ("lora_alpha", "training_lora_alpha"),
        ("lora_dropout", "training_lora_dropout"),
        ("lr_warmup_steps", "training_lr_warmup_steps"),
        ("seed", "training_seed"),
    ] {
        put(name, params.get(param).and_then(Value::as_f64));
    }
    put("training_final_loss", Some(summary.final_loss));
    put("training_min_loss", Some(summary.min_loss));
    put("training_train_loss", Some(summary.train_loss));
    put("training_eval_loss", summary.final_eval_loss);
    put("training_perplexity", summary.final_perplexity);
    put("training_steps", Some(summary.total_steps as f64));
    put("training_epochs", Some(summary.epochs));
    put("training_tokens", Some(summary.tokens as f64));
    put("training_trained_tokens", Some(summary.trained_tokens as f64));
    put("training_tokens_per_second", Some(summary.tokens_per_second));
    put("training_peak_memory_gib", Some(summary.peak_memory_bytes as f64 / (1u64 << 30) as f64));
    put("training_runtime_seconds", Some(summary.train_runtime));
    m
}

/// Progress for people and for logs: a redrawn bar with ETA, loss and tokens/s on a terminal;
/// one plain line per logged step otherwise (what KFP shows).
pub struct ProgressReporter {
    tty: bool,
    /// The bar as last drawn (terminal only): redrawn below every line printed above it.
    bar: String,
    total: u64,
    start_step: u64,
    last_loss: f64,
    started: std::time::Instant,
    out: Box<dyn Write + Send>,
}

impl ProgressReporter {
    /// On stderr; a bar when stderr is a terminal.
    pub fn stderr() -> Self {
        Self::new(std::io::stderr().is_terminal(), Box::new(std::io::stderr()))
    }

    pub fn new(tty: bool, out: Box<dyn Write + Send>) -> Self {
        ProgressReporter { tty, bar: String::new(), total: 0, start_step: 0, last_loss: f64::NAN, started: std::time::Instant::now(), out }
    }

    fn eta(&self, step: u64) -> String {
        let done = step.saturating_sub(self.start_step);
        if done == 0 {
            return "?".into();
        }
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        duration(per_step * self.total.saturating_sub(step) as f64)
    }

    /// Redraws the bar after every optimizer step (terminal only; logs get `on_step` lines).
    pub fn tick(&mut self, step: u64, loss: f64, tokens_per_second: f64) {
        self.last_loss = loss;
        if !self.tty {
            return;
        }
        let width = 30usize;
        let frac = if self.total == 0 { 1.0 } else { step as f64 / self.total as f64 };
        let filled = ((frac * width as f64).round() as usize).min(width);
        self.bar = format!(
            "[{}{}] {step}/{} {:>3.0}% loss {loss:.4} {:.0} tok/s ETA {}",
            "█".repeat(filled),
            "·".repeat(width - filled),
            self.total,
            frac * 100.0,
            tokens_per_second,
            self.eta(step)
        );
        let _ = write!(self.out, "\r\x1b[2K{}", self.bar);
        let _ = self.out.flush();
    }

    /// A line of history: in a log, as it is; on a terminal, printed above the bar (which is
    /// redrawn below it), so the scrollback keeps every line after the run ends.
    fn line(&mut self, text: &str) {
        if self.tty {
            let _ = write!(self.out, "\r\x1b[2K{text}\n{}", self.bar);
        } else {
            let _ = writeln!(self.out, "{text}");
        }
        let _ = self.out.flush();
    }
}

/// Numbers as people write them: `0`, `0.0002`, `2e-5`, `1.5`.
pub fn number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    // Four significant digits, in the shortest spelling that reads them back.
    let r = significant(x, 4);
    if r.abs() >= 1e-4 && r.abs() < 1e6 {
        format!("{r}")
    } else {
        format!("{r:e}")
    }
}

/// `1 epoch`, `3 epochs`.
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `x` rounded to `digits` significant digits.
fn significant(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(digits - 1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// `1h02m`, `3m05s`, `12.3s`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{secs:.1}s")
    }
}

impl Reporter for ProgressReporter {
    fn name(&self) -> &str {
        "progress"
    }

    fn on_start(&mut self, info: &RunInfo) -> Result<(), ExtError> {
        self.total = info.total_steps;
        self.start_step = info.start_step;
        self.started = std::time::Instant::now();
        let resumed = if info.start_step > 0 { format!(", resuming after step {}", info.start_step) } else { String::new() };
        let _ = writeln!(
            self.out,
            "lora: training {} ({} x {}){resumed}",
            plural(info.total_steps, "step", "steps"),
            plural(info.num_epochs, "epoch", "epochs"),
            plural(info.steps_per_epoch, "step", "steps"),
        );
        Ok(())
    }

    fn on_step(&mut self, m: &StepMetrics) -> Result<(), ExtError> {
        let line = format!(
            "step {}/{} epoch {:.2} loss {:.4} grad_norm {:.4} lr {} tokens/s {:.0} elapsed {} eta {}",
            m.step,
            m.max_steps,
            m.epoch,
            m.loss,
            m.grad_norm,
            number(m.learning_rate),
            m.tokens_per_second,
            duration(m.elapsed_s),
            self.eta(m.step)
        );
        self.line(&line);
        Ok(())
    }

    fn on_eval(&mut self, m: &EvalMetrics) -> Result<(), ExtError> {
        let line = format!(
            "eval at step {} epoch {:.2}: eval_loss {:.4} perplexity {:.3} ({} tokens)",
            m.step, m.epoch, m.eval_loss, m.perplexity, m.eval_tokens
        );
        self.line(&line);
        Ok(())
    }

    fn on_checkpoint(&mut self, c: &CheckpointInfo) -> Result<(), ExtError> {
        let line = format!("checkpoint at step {}: {}", c.step, c.path.display());
        self.line(&line);
        Ok(())
    }

    fn on_finish(&mut self, s: &RunSummary) -> Result<(), ExtError> {
        // The bar's last state stays on screen; the summary goes below it.
        let cr = if self.tty { "\n" } else { "" };
        let _ = writeln!(
            self.out,
            "{cr}done: {} steps, {:.2} epochs, final loss {:.4}, min {:.4}, mean {:.4}, {:.0} tokens/s, {}",
            s.total_steps,
            s.epochs,
            s.final_loss,
            s.min_loss,
            s.train_loss,
            s.tokens_per_second,
            duration(s.train_runtime)
        );
        Ok(())
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn info(start_step: u64) -> RunInfo {
        RunInfo {
            run_id: "r".into(),
            params: json!({}),
            total_steps: 4,
            num_epochs: 1,
            steps_per_epoch: 4,
            start_step,
            world_size: 1,
        }
    }

    fn step(step: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: step as f64 / 4.0,
            max_steps: 4,
            loss,
            grad_norm: 0.5,
            learning_rate: 1e-4,
            tokens: 100,
            trained_tokens: 60,
            tokens_per_second: 1000.0,
            elapsed_s: step as f64,
        }
    }

    fn rows(path: &Path) -> Vec<Value> {
        fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn jsonl_is_fresh_per_run_and_trimmed_on_resume() {
        let dir = std::env::temp_dir().join(format!("lora-jsonl-{}", std::process::id()));
        let path = dir.join("training_metrics.jsonl");
        let _ = fs::remove_dir_all(&dir);
        let mut history = History::default();
        let mut r = JsonlReporter::new(&path);
        r.on_start(&info(0)).unwrap();
        for s in 1..=4 {
            r.on_step(&step(s, 2.0 - s as f64 * 0.1)).unwrap();
            history.losses.push(2.0 - s as f64 * 0.1);
        }
        r.on_eval(&EvalMetrics { step: 4, epoch: 1.0, eval_loss: 1.5, perplexity: 1.5f64.exp(), eval_tokens: 10 }).unwrap();
        r.on_finish(&history.summary(1.0, 4.0, 0)).unwrap();
        let all = rows(&path);
        assert_eq!(all.len(), 6);
        assert_eq!(all[0]["step"], 1);
        for key in ["step", "epoch", "max_steps", "loss", "grad_norm", "learning_rate", "tokens_per_second", "tokens", "trained_tokens"] {
            assert!(all[0].get(key).is_some(), "row lacks {key}: {}", all[0]);
        }
        assert_eq!(all[4]["eval_loss"], 1.5);
        assert_eq!(all[5]["train_runtime"], 4.0);
        assert!((all[5]["train_loss"].as_f64().unwrap() - 1.75).abs() < 1e-12);

        // A second run in the same folder starts a fresh file (the reference appends).
        let mut again = JsonlReporter::new(&path);
        again.on_start(&info(0)).unwrap();
        assert!(rows(&path).is_empty());

        // Resume after step 2 of a killed attempt: rows 1..=2 stay, later ones go.
        fs::write(&path, all.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
        let mut resumed = JsonlReporter::new(&path);
        resumed.on_start(&info(2)).unwrap();
        resumed.on_step(&step(3, 9.0)).unwrap();
        let kept: Vec<u64> = rows(&path).iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(kept, vec![1, 2, 3]);
        assert_eq!(rows(&path)[2]["loss"], 9.0);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Issue 11, item 2: links planted in the checkpoints folder (by a plugin granted it in an
    /// older lora, or by anything else) do not make the metrics writer touch a file outside it.
    #[test]
    fn the_metrics_writer_follows_no_planted_link() {
        let root = std::env::temp_dir().join(format!("lora-jsonl-links-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = root.join("pvc/checkpoints");
        fs::create_dir_all(&dir).unwrap();
        let victim = root.join("victim.txt");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink("../../victim.txt", dir.join("training_metrics.jsonl.tmp")).unwrap();
        let path = dir.join("training_metrics.jsonl");
        let mut r = JsonlReporter::new(&path);
        r.on_start(&info(0)).unwrap();
        r.on_step(&step(1, 1.0)).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(rows(&path).len(), 1);

        // A resume reading the file through a link refuses to, naming it.
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("../../victim.txt", &path).unwrap();
        let err = JsonlReporter::new(&path).on_start(&info(2)).unwrap_err();
        assert!(err.message.contains("is a symbolic link"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn kfp_metrics_hold_results_and_reference_hyperparameters() {
        let mut h = History { losses: vec![3.0, 2.0, 2.5], tokens: 300, trained_tokens: 200, ..Default::default() };
        h.evals.push(EvalMetrics { step: 3, epoch: 1.0, eval_loss: 2.2, perplexity: 2.2f64.exp(), eval_tokens: 5 });
        let params = json!({"training_num_epochs": 1, "training_learning_rate": 2e-4, "training_lora_r": 16, "training_base_model": "x"});
        let m = kfp_metrics(&h.summary(1.0, 3.0, 1 << 30), &params);
        assert_eq!(m["training_final_loss"], 2.5);
        assert_eq!(m["training_min_loss"], 2.0);
        assert_eq!(m["training_eval_loss"], 2.2);
        assert_eq!(m["training_steps"], 3.0);
        assert_eq!(m["training_tokens_per_second"], 100.0);
        assert_eq!(m["training_peak_memory_gib"], 1.0);
        assert_eq!(m["num_epochs"], 1.0);
        assert_eq!(m["lora_r"], 16.0);
        assert!(m.values().all(Value::is_number));
    }

    /// A writer whose bytes the test reads back after the reporter wrote them.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_logs_are_one_line_per_logged_step() {
        let buf = Buf::default();
        let mut p = ProgressReporter::new(false, Box::new(buf.clone()));
        p.on_start(&info(0)).unwrap();
        p.tick(1, 2.0, 10.0);
        p.on_step(&step(1, 1.9)).unwrap();
        p.on_step(&step(2, 1.8)).unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("step 1/4 ") && lines[1].contains("loss 1.9000"), "{text}");
        assert!(!text.contains('\r'), "no terminal control in logs");
    }

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(2e-4), "0.0002");
        assert_eq!(number(2e-5), "2e-5");
        assert_eq!(number(4.000000000000001e-5), "4e-5");
        assert_eq!(number(1.9999999e-4), "0.0002");
        assert_eq!(number(0.3), "0.3");
        assert_eq!(number(1234.5678), "1235");
        assert_eq!(plural(1, "epoch", "epochs"), "1 epoch");
        assert_eq!(plural(3, "epoch", "epochs"), "3 epochs");
    }

    #[test]
    fn on_a_terminal_each_logged_step_stays_above_the_bar() {
        let buf = Buf::default();
        let mut p = ProgressReporter::new(true, Box::new(buf.clone()));
        p.on_start(&info(0)).unwrap();
        for (s, loss) in [(1, 1.9), (2, 1.8)] {
            p.tick(s, loss, 10.0);
            p.on_step(&step(s, loss)).unwrap();
        }
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        // What stays on the screen: every `\r\x1b[2K` erases the line the cursor is on.
        let mut screen: Vec<String> = vec![String::new()];
        for (i, part) in text.split("\r\x1b[2K").enumerate() {
            if i > 0 {
                *screen.last_mut().unwrap() = String::new();
            }
            let mut lines = part.split('\n');
            screen.last_mut().unwrap().push_str(lines.next().unwrap());
            screen.extend(lines.map(String::from));
        }
        assert!(screen[0].starts_with("lora: training 4 steps (1 epoch x 4 steps)"), "{screen:?}");
        assert!(screen[1].starts_with("step 1/4 ") && screen[1].contains("loss 1.9000"), "{screen:?}");
        assert!(screen[2].starts_with("step 2/4 ") && screen[2].contains("lr 0.0001 "), "{screen:?}");
        assert!(screen[3].starts_with("[") && screen[3].contains("2/4"), "the bar stays last: {screen:?}");
    }
}
