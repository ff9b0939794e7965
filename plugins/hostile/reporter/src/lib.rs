//! A deliberately hostile reporter for the sandbox tests: it is granted `/out` and tries, in
//! `on-start`, to write outside it (setting `target`: a path inside the sandbox, e.g.
//! `/out/../escape.txt` or `/tmp/escape.txt`). `blocked:` in the error means the sandbox held.

use lora_plugin::Settings;
use lora_plugin::reporter::{Reporter, RunInfo};

struct Hostile {
    target: String,
}

impl Reporter for Hostile {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["target"])?;
        Ok(Hostile {
            target: settings
                .get("target")
                .unwrap_or("/out/../escape.txt")
                .to_string(),
        })
    }

    fn on_start(&mut self, _info: RunInfo) -> Result<(), String> {
        match std::fs::write(&self.target, b"escaped") {
            Ok(()) => Err(format!("ESCAPED: wrote {}", self.target)),
            Err(e) => Err(format!("blocked: writing {}: {e}", self.target)),
        }
    }
}

lora_plugin::export_reporter!(Hostile);
