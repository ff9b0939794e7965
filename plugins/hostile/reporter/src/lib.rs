//! A deliberately hostile reporter for the sandbox tests. It is granted `/out`; the setting
//! `attack` picks what it tries and `call` in which call (default `on_start`; for `on_step`,
//! from step `at_step` on, default 0):
//!
//! - `write` (default): write to `target`, a path inside the sandbox meant to be outside `/out`
//!   (`/out/../escape.txt`, `/tmp/escape.txt`).
//! - `sleep`: `std::thread::sleep` for `arg` seconds (default an hour); `poll-far`: block in
//!   `wasi:io/poll` on a monotonic instant centuries away.
//! - `symlink`: create the link `link` (relative to `/out`) pointing at `to`.
//! - `fill`: write `arg` MiB (default 4096) into `/out/fill.bin`, 1 MiB at a time;
//!   `files`: create `arg` empty files.
//!
//! `blocked:` in the error means the sandbox held; `ESCAPED:` means it leaked.

use std::io::Write;
use std::time::Duration;

use lora_plugin::Settings;
use lora_plugin::reporter::{
    CheckpointInfo, EvalMetrics, Reporter, RunInfo, RunSummary, StepMetrics,
};

struct Hostile {
    attack: String,
    call: String,
    arg: String,
    target: String,
    link: String,
    to: String,
    at_step: u64,
}

/// The preopened `/out` directory.
fn out_dir() -> Result<wasip2::filesystem::types::Descriptor, String> {
    wasip2::filesystem::preopens::get_directories()
        .into_iter()
        .find(|(_, path)| path == "/out")
        .map(|(d, _)| d)
        .ok_or_else(|| "blocked: no /out directory is granted".to_string())
}

impl Hostile {
    fn attack(&self, call: &str, step: u64) -> Result<(), String> {
        if call != self.call || step < self.at_step {
            return Ok(());
        }
        match self.attack.as_str() {
            "write" => match std::fs::write(&self.target, b"escaped") {
                Ok(()) => Err(format!("ESCAPED: wrote {}", self.target)),
                Err(e) => Err(format!("blocked: writing {}: {e}", self.target)),
            },
            "sleep" => {
                std::thread::sleep(Duration::from_secs(self.arg.parse().unwrap_or(3600)));
                Err("ESCAPED: slept past the deadline".into())
            }
            "poll-far" => {
                let far = wasip2::clocks::monotonic_clock::subscribe_instant(u64::MAX);
                wasip2::io::poll::poll(&[&far]);
                Err("ESCAPED: polled past the deadline".into())
            }
            "symlink" => out_dir()?
                .symlink_at(&self.to, &self.link)
                .map_err(|e| format!("blocked: linking /out/{} -> {}: {e:?}", self.link, self.to)),
            "fill" => {
                let mib: usize = self.arg.parse().unwrap_or(4096);
                let mut f = std::fs::File::create("/out/fill.bin")
                    .map_err(|e| format!("cannot create /out/fill.bin: {e}"))?;
                let chunk = vec![7u8; 1 << 20];
                for i in 0..mib {
                    f.write_all(&chunk)
                        .map_err(|e| format!("blocked: writing MiB {i} of /out/fill.bin: {e}"))?;
                }
                Err(format!("ESCAPED: wrote {mib} MiB"))
            }
            "files" => {
                let n: usize = self.arg.parse().unwrap_or(1_000_000);
                for i in 0..n {
                    std::fs::File::create(format!("/out/f{i}"))
                        .map_err(|e| format!("blocked: creating file {i}: {e}"))?;
                }
                Err(format!("ESCAPED: created {n} files"))
            }
            other => Err(format!("unknown attack `{other}`")),
        }
    }
}

impl Reporter for Hostile {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["attack", "call", "arg", "target", "link", "to", "at_step"])?;
        let get = |k: &str, default: &str| settings.get(k).unwrap_or(default).to_string();
        Ok(Hostile {
            attack: get("attack", "write"),
            call: get("call", "on_start"),
            arg: get("arg", ""),
            target: get("target", "/out/../escape.txt"),
            link: get("link", "link"),
            to: get("to", "../escape.txt"),
            at_step: get("at_step", "0")
                .parse()
                .map_err(|e| format!("at_step: {e}"))?,
        })
    }

    fn on_start(&mut self, _info: RunInfo) -> Result<(), String> {
        self.attack("on_start", 0)
    }
    fn on_step(&mut self, m: StepMetrics) -> Result<(), String> {
        self.attack("on_step", m.step)
    }
    fn on_eval(&mut self, _m: EvalMetrics) -> Result<(), String> {
        self.attack("on_eval", 0)
    }
    fn on_checkpoint(&mut self, _c: CheckpointInfo) -> Result<(), String> {
        self.attack("on_checkpoint", 0)
    }
    fn on_finish(&mut self, _s: RunSummary) -> Result<(), String> {
        self.attack("on_finish", 0)
    }
}

lora_plugin::export_reporter!(Hostile);
