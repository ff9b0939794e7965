//! Shared by the integration tests: builds the guest plugins from source (once per test binary)
//! and offers a small, real `TextTools` that records what reaches it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use lora_api::{Message, TextTools};
use lora_plugins::PluginOptions;

/// Packages of the guest workspace (`plugins/`) and their artifact names.
pub const PLUGINS: &[(&str, &str)] = &[
    ("ticket-redactor", "ticket_redactor"),
    ("schedules", "schedules"),
    ("csv-reporter", "csv_reporter"),
    ("webhook-reporter", "webhook_reporter"),
    ("hostile-preprocessor", "hostile_preprocessor"),
    ("hostile-reporter", "hostile_reporter"),
    ("hostile-newer-api", "hostile_newer_api"),
    ("hostile-scheduler", "hostile_scheduler"),
    ("hostile-http-reporter", "hostile_http_reporter"),
];

/// Builds every guest plugin for wasm32-wasip2 (one `cargo build -p` each: the SDK's kind
/// features must not unify) and returns the directory holding the `.wasm` files.
/// `LORA_PLUGINS_WASM_TARGET` overrides the guest target directory.
pub fn plugin_dir(profile: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = lora_plugins::testing::guest_target_dir(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    let release = profile == "release";
    if !built.iter().any(|p| p == profile) {
        let packages: Vec<&str> = PLUGINS.iter().map(|(package, _)| *package).collect();
        lora_plugins::testing::build_guest_plugins(&repo, &target, &packages, release).unwrap_or_else(|e| panic!("{e}"));
        built.push(profile.to_string());
    }
    target.join("wasm32-wasip2").join(profile)
}

/// The path of a built guest plugin (debug profile).
pub fn plugin(artifact: &str) -> PathBuf {
    plugin_dir("debug").join(format!("{artifact}.wasm"))
}

/// Options for tests: no disk cache (tests must not write to the home directory), log lines
/// collected in memory.
pub fn options() -> (PluginOptions, Arc<Mutex<Vec<String>>>) {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    let options = PluginOptions {
        cache_dir: None,
        log: Arc::new(move |plugin, level, msg| {
            sink.lock()
                .unwrap()
                .push(format!("[{plugin}] {level:?}: {msg}"))
        }),
        ..Default::default()
    };
    (options, logs)
}

/// A whitespace tokenizer with a fixed chat format, recording every text it is given. Small, but
/// a real implementation of the trait (the run's tokenizer lives in `lora-data`).
#[derive(Default)]
pub struct RecordingTools {
    pub seen: Mutex<Vec<String>>,
}

impl TextTools for RecordingTools {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.seen.lock().unwrap().push(text.to_string());
        let mut ids: Vec<u32> = text.split_whitespace().map(|w| w.len() as u32).collect();
        if add_special_tokens {
            ids.insert(0, 0);
        }
        Ok(ids)
    }
    fn decode(&self, ids: &[u32], _skip: bool) -> Result<String, String> {
        Ok(ids
            .iter()
            .map(|i| "x".repeat(*i as usize))
            .collect::<Vec<_>>()
            .join(" "))
    }
    fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let mut s: String = messages
            .iter()
            .map(|m| format!("<|{}|>\n{}\n", m.role, m.content))
            .collect();
        if add_generation_prompt {
            s.push_str("<|assistant|>\n");
        }
        self.seen.lock().unwrap().push(s.clone());
        Ok(s)
    }
}

/// A component built from a hand-written core module, `plugins/hostile/wat/<name>.wat`, and the
/// WIT world `preprocessor`: from `<name>.wit` next to it, or the real contract
/// (`wit/since_v0.1.0`) when there is none. For attacks a Rust guest cannot express (tables,
/// mismatched types).
pub fn wat_plugin(name: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = repo.join("plugins/hostile/wat");
    let mut resolve = wit_parser::Resolve::default();
    let wit = dir.join(format!("{name}.wit"));
    let package = if wit.is_file() {
        resolve.push_file(&wit).unwrap()
    } else {
        resolve.push_dir(repo.join("wit/since_v0.1.0")).unwrap().0
    };
    let world = resolve.select_world(&[package], Some("preprocessor")).unwrap();
    let mut module = wat::parse_file(dir.join(format!("{name}.wat"))).unwrap();
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8).unwrap();
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wat-plugins");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join(format!("{name}.wasm"));
    std::fs::write(&path, component).unwrap();
    path
}

/// Resident memory of this process now, and its peak since the last [`reset_peak_rss`] (Linux).
pub fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak resident memory (`VmHWM`) to the current value; false where the kernel does
/// not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
