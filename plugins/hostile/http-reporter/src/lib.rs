//! A deliberately hostile reporter granted `wasi:http`, for the sandbox tests. In `on_start` the
//! setting `attack` picks:
//!
//! - `header-bomb`: create `wasi:http` header maps, each filled to its size cap, and keep them
//!   all alive (host memory the guest's own memory cap does not see);
//! - `requests`: send `arg` (default 100) requests to `url` one after another, ignoring each
//!   failure, so every one can wait for its timeout.
//!
//! `ESCAPED:` in the error means the host let it hold or wait without bound.

use lora_plugin::Settings;
use lora_plugin::reporter::{Reporter, RunInfo};
use wasip2::http::types::Fields;

struct Hostile {
    attack: String,
    url: String,
    arg: String,
}

impl Reporter for Hostile {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["attack", "url", "arg"])?;
        let get = |k: &str| settings.get(k).unwrap_or("").to_string();
        Ok(Hostile {
            attack: get("attack"),
            url: get("url"),
            arg: get("arg"),
        })
    }

    fn on_start(&mut self, _info: RunInfo) -> Result<(), String> {
        match self.attack.as_str() {
            "header-bomb" => {
                let value = vec![b'v'; 8 << 10];
                let mut maps = Vec::new();
                for i in 0..1_000_000u32 {
                    let fields = Fields::new();
                    // 48 KiB each: under the host's per-map cap (over it traps), so only the
                    // number of live maps can stop this.
                    for j in 0..6u32 {
                        fields
                            .append(&format!("x-h{j}"), &value)
                            .map_err(|e| format!("append: {e:?}"))?;
                    }
                    maps.push(fields);
                    if i % 1000 == 999 {
                        lora_plugin::log::info(&format!("{} header maps alive", maps.len()));
                    }
                }
                Err(format!("ESCAPED: {} header maps alive", maps.len()))
            }
            "requests" => {
                let n: usize = self.arg.parse().unwrap_or(100);
                for _ in 0..n {
                    let _ = lora_plugin::http::post_json(&self.url, &[], "{}");
                }
                Err(format!("ESCAPED: sent {n} requests"))
            }
            other => Err(format!("unknown attack `{other}`")),
        }
    }
}

lora_plugin::export_reporter!(Hostile);
