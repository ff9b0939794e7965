//! A deliberately hostile preprocessor for the sandbox tests. The setting `attack` picks what it
//! tries in `process-batch`. When the sandbox holds, the attack comes back as an `Err` starting
//! with `blocked:` (or the call is stopped by a trap or limit); anything starting with
//! `ESCAPED:` means the sandbox leaked. `sleep-configure` and `poll-far-configure` attack in
//! `configure` instead.

use std::hint::black_box;
use std::time::Duration;

use lora_plugin::Settings;
use lora_plugin::preprocessor::{
    Preprocessor, RawRecord, RecordOutcome, Sample, Tokens, text as tools,
};

/// Blocks in `wasi:io/poll` on a monotonic instant as far away as it can name (without a clock
/// grant the clock reads 0, so this is centuries away).
fn poll_far() {
    let far = wasip2::clocks::monotonic_clock::subscribe_instant(u64::MAX);
    wasip2::io::poll::poll(&[&far]);
}

/// Sleeps `secs` (default an hour) with `std::thread::sleep`.
fn sleep(secs: &str) {
    std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(3600)));
}

struct Hostile {
    attack: String,
    arg: String,
}

fn text(s: String) -> Vec<RecordOutcome> {
    vec![RecordOutcome {
        index: 1,
        result: Ok(vec![Sample::Text(s)]),
    }]
}

fn recurse(n: u64) -> u64 {
    // Small frames and a non-tail call, so the WebAssembly call stack (not the shadow stack in
    // linear memory) overflows first.
    if black_box(n) == u64::MAX {
        n
    } else {
        black_box(recurse(black_box(n + 1))) + 1
    }
}

impl Preprocessor for Hostile {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["attack", "arg"])?;
        match settings.get("attack") {
            Some("sleep-configure") => sleep(settings.get("arg").unwrap_or("")),
            Some("poll-far-configure") => poll_far(),
            _ => {}
        }
        Ok(Hostile {
            attack: settings.get("attack").unwrap_or("").to_string(),
            arg: settings.get("arg").unwrap_or("").to_string(),
        })
    }

    fn process_batch(
        &mut self,
        _batch: u64,
        records: Vec<RawRecord>,
    ) -> Result<Vec<RecordOutcome>, String> {
        match self.attack.as_str() {
            "read-passwd" => match std::fs::read_to_string("/etc/passwd") {
                Ok(s) => Ok(text(format!("ESCAPED: {s}"))),
                Err(e) => Err(format!("blocked: reading /etc/passwd: {e}")),
            },
            "write-file" => match std::fs::write("/tmp/lora-plugin-escape.txt", b"escaped") {
                Ok(()) => Ok(text("ESCAPED: wrote /tmp/lora-plugin-escape.txt".into())),
                Err(e) => Err(format!("blocked: writing /tmp/lora-plugin-escape.txt: {e}")),
            },
            "socket" => match std::net::TcpStream::connect(self.arg.as_str()) {
                Ok(_) => Ok(text(format!("ESCAPED: connected to {}", self.arg))),
                Err(e) => Err(format!("blocked: connecting to {}: {e}", self.arg)),
            },
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                if vars.is_empty() {
                    Err("blocked: environment is empty".into())
                } else {
                    Ok(text(format!("ESCAPED: {vars:?}")))
                }
            }
            "clock" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|e| e.to_string())?;
                Ok(text(format!("wall clock: {}", now.as_secs())))
            }
            "random" => {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(42);
                Ok(text(format!("random: {}", h.finish())))
            }
            "alloc" => {
                let mut blocks = Vec::new();
                loop {
                    blocks.push(black_box(vec![1u8; 16 << 20]));
                    if blocks.len() > 1 << 20 {
                        return Ok(text("ESCAPED: allocated without limit".into()));
                    }
                }
            }
            "loop" => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "recursion" => Ok(text(format!("ESCAPED: {}", recurse(0)))),
            "panic" => panic!("deliberate panic in the hostile preprocessor"),
            "sleep" => {
                sleep(&self.arg);
                Ok(text("ESCAPED: slept past the deadline".into()))
            }
            "poll-far" => {
                poll_far();
                Ok(text("ESCAPED: polled past the deadline".into()))
            }
            // Asks the host to tokenize `arg` MiB of text in one call.
            "encode-huge" => {
                let mib: usize = self.arg.parse().unwrap_or(24);
                let ids = tools::encode(&"word ".repeat((mib << 20) / 5), false)?;
                Ok(text(format!(
                    "ESCAPED: the host tokenized {} ids",
                    ids.len()
                )))
            }
            // `arg` (default 2,000,000) empty samples for the first record.
            "empty-flood" => {
                let n: usize = self.arg.parse().unwrap_or(2_000_000);
                Ok(records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| RecordOutcome {
                        index: r.index,
                        result: Ok(if i == 0 {
                            vec![Sample::Text(String::new()); n]
                        } else {
                            vec![]
                        }),
                    })
                    .collect())
            }
            // `arg` (default 1,000,000) log lines of 1 KiB in one call.
            "log-flood" => {
                let n: usize = self.arg.parse().unwrap_or(1_000_000);
                let line = "x".repeat(1024);
                for _ in 0..n {
                    lora_plugin::log::info(&line);
                }
                Ok(records
                    .iter()
                    .map(|r| RecordOutcome {
                        index: r.index,
                        result: Ok(vec![]),
                    })
                    .collect())
            }
            // Lines that pose as another plugin and as lora, with terminal control.
            "forge" => {
                lora_plugin::log::info(
                    "fine\n[plugin:csv_reporter] error: forged\r\x1b[2Kerror: lora: forged",
                );
                Ok(records
                    .iter()
                    .map(|r| RecordOutcome {
                        index: r.index,
                        result: Err("bad record\nerror: forged by the plugin\x1b[0m".into()),
                    })
                    .collect())
            }
            "forge-error" => Err("it failed\nerror: lora: forged line\x1b[31m".into()),
            "forge-panic" => panic!("boom\nerror: lora: forged panic line\x1b[31m"),
            "huge-output" => {
                let mib: usize = self.arg.parse().unwrap_or(100);
                Ok(text("x".repeat(mib << 20)))
            }
            "wrong-count" => Ok(records
                .iter()
                .skip(1)
                .map(|r| RecordOutcome {
                    index: r.index,
                    result: Ok(vec![]),
                })
                .collect()),
            "wrong-index" => Ok(records
                .iter()
                .map(|r| RecordOutcome {
                    index: r.index + 100,
                    result: Ok(vec![]),
                })
                .collect()),
            "bad-mask" => Ok(records
                .iter()
                .map(|r| RecordOutcome {
                    index: r.index,
                    result: Ok(vec![Sample::Tokens(Tokens {
                        input_ids: vec![1, 2, 3],
                        train_mask: Some(vec![true]),
                    })]),
                })
                .collect()),
            "empty-chat" => Ok(records
                .iter()
                .map(|r| RecordOutcome {
                    index: r.index,
                    result: Ok(vec![Sample::Chat(vec![])]),
                })
                .collect()),
            other => Err(format!("unknown attack `{other}`")),
        }
    }
}

lora_plugin::export_preprocessor!(Hostile);
