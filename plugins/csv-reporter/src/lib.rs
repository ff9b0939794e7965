//! Example reporter: one CSV row per logged optimizer step, written into the directory the run
//! grants it (seen inside the sandbox as `/out`). Each row is flushed as it is written, so the
//! file is complete up to the last step even if the run dies.
//!
//! Settings: `file` (default `metrics.csv`; a plain file name).

use std::fs::File;
use std::io::{BufWriter, Write};

use lora_plugin::Settings;
use lora_plugin::reporter::{OUTPUT_DIR, Reporter, RunInfo, RunSummary, StepMetrics};

struct CsvReporter {
    file: String,
    out: Option<BufWriter<File>>,
}

const HEADER: &str =
    "step,epoch,loss,grad_norm,learning_rate,tokens,trained_tokens,tokens_per_second,elapsed_s";

impl CsvReporter {
    fn out(&mut self) -> Result<&mut BufWriter<File>, String> {
        self.out
            .as_mut()
            .ok_or_else(|| "on-start was not called".to_string())
    }
}

impl Reporter for CsvReporter {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["file"])?;
        let file = settings.get("file").unwrap_or("metrics.csv").to_string();
        if file.is_empty() || file.contains('/') || file == ".." || file == "." {
            return Err(format!(
                "setting `file` = `{file}` must be a plain file name"
            ));
        }
        Ok(CsvReporter { file, out: None })
    }

    fn on_start(&mut self, _info: RunInfo) -> Result<(), String> {
        let path = format!("{OUTPUT_DIR}/{}", self.file);
        let file = File::create(&path).map_err(|e| {
            format!("cannot create {path} (was the reporter granted a directory?): {e}")
        })?;
        let mut out = BufWriter::new(file);
        writeln!(out, "{HEADER}")
            .and_then(|_| out.flush())
            .map_err(|e| format!("writing {path}: {e}"))?;
        self.out = Some(out);
        Ok(())
    }

    fn on_step(&mut self, m: StepMetrics) -> Result<(), String> {
        let out = self.out()?;
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            m.step,
            m.epoch,
            m.loss,
            m.grad_norm,
            m.learning_rate,
            m.tokens,
            m.trained_tokens,
            m.tokens_per_second,
            m.elapsed_s
        )
        .and_then(|_| out.flush())
        .map_err(|e| format!("writing step {}: {e}", m.step))
    }

    fn on_finish(&mut self, _summary: RunSummary) -> Result<(), String> {
        self.out()?.flush().map_err(|e| format!("flushing: {e}"))
    }
}

lora_plugin::export_reporter!(CsvReporter);
