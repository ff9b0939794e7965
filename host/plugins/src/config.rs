//! The run's plugin parameters.
//!
//! `training_plugins`: comma-separated `kind=path` entries, `kind` one of `preprocessor`
//! (at most one), `scheduler` (at most one), `reporter` (any number):
//! `preprocessor=/p/tickets.wasm,scheduler=/p/schedules.wasm,reporter=/p/csv.wasm`.
//!
//! `training_plugin_config`: a JSON object (empty string = `{}`) whose keys are a kind
//! (applies to every plugin of that kind) or a plugin's file stem (`csv_reporter` for
//! `/p/csv_reporter.wasm`; overrides the kind's entry field by field, settings key by key):
//!
//! ```json
//! {
//!   "scheduler": {"settings": {"schedule": "one_cycle", "pct_start": 0.25}},
//!   "csv_reporter": {
//!     "settings": {"file": "steps.csv"},
//!     "grants": {"dir": "/pvc/metrics", "env": ["RUN_LABEL"], "clocks": true},
//!     "memory_mib": 256, "deadline_ms": 5000, "max_output_mib": 16
//!   }
//! }
//! ```
//! - `settings`: string, number or boolean values, given to the plugin as strings.
//! - `grants.dir` (reporters only): a host directory the plugin may read and write, seen as
//!   `/out`. `grants.env`: host variables passed by name. `grants.clocks`: real clocks
//!   (otherwise they read 0). `grants.http` (reporters only): the hosts it may send `wasi:http`
//!   requests to, `[http://|https://]host[:port]` or `*.domain` (see [`crate::http`]).
//! - `memory_mib` (default 512): linear memories and tables; live host resources (streams,
//!   header maps) are capped to about as much again. `deadline_ms` per call (default 30000),
//!   whatever the call waits on. `max_output_mib` (default 64): what one call may hand the host in
//!   one value (its result, or one host call's arguments), counting the records and samples
//!   around the text. `max_text_input_kib` (default 1024): the input of one text-tools call.
//!   `max_dir_mib` (default 1024): disk space the plugin's writes may add to its `grants.dir` over
//!   the run.
//! - `grants.models` (preprocessors only, feature `wasi-nn`): name → a directory holding
//!   `model.onnx`, which the guest opens with `wasi:nn` `load-by-name(name)`; `max_tensor_mib`
//!   (default 64): bytes of all inputs, and of all outputs, of one wasi-nn compute.
//! - A `grants.dir` may not be, or contain, a folder lora itself writes into (the run checks this
//!   with [`PluginSet::check_dir_grants`]).
//!
//! Unknown keys, unknown fields and keys that name no plugin are errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lora_api::{Preprocessor, Reporter, ScheduleContext, Scheduler, TextTools};
use serde::Deserialize;

use crate::sandbox::plugin_seed;
use crate::{
    PluginError, PluginKind, PluginOptions, load_preprocessor, load_reporter, load_scheduler,
};

const PLUGINS: &str = "training_plugins";
const CONFIG: &str = "training_plugin_config";

/// One plugin named by the run, with its resolved options.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    pub kind: PluginKind,
    pub path: PathBuf,
    pub options: PluginOptions,
}

/// The plugins of a run, parsed and checked but not yet loaded (a scheduler needs the run's
/// step counts, known only after the data is prepared; a preprocessor needs the tokenizer).
#[derive(Debug, Clone, Default)]
pub struct PluginSet {
    pub preprocessor: Option<PluginSpec>,
    pub scheduler: Option<PluginSpec>,
    pub reporters: Vec<PluginSpec>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    settings: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    grants: Option<GrantsEntry>,
    memory_mib: Option<u64>,
    deadline_ms: Option<u64>,
    max_output_mib: Option<u64>,
    max_text_input_kib: Option<u64>,
    max_dir_mib: Option<u64>,
    max_tensor_mib: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsEntry {
    dir: Option<PathBuf>,
    env: Option<Vec<String>>,
    clocks: Option<bool>,
    http: Option<Vec<String>>,
    models: Option<BTreeMap<String, PathBuf>>,
}

fn cfg_err(message: String) -> PluginError {
    PluginError::Config {
        parameter: CONFIG,
        message,
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl PluginSet {
    /// Parses and checks the two parameters. `seed` is the run seed; each plugin's random
    /// stream is derived from it and the plugin's name. Plugin files must exist; they are read
    /// and compiled only when loaded.
    pub fn from_params(
        plugins: &str,
        config_json: &str,
        seed: u64,
    ) -> Result<PluginSet, PluginError> {
        let mut set = PluginSet::default();
        let mut stems = BTreeMap::new();
        for (i, entry) in plugins
            .split(',')
            .map(str::trim)
            .enumerate()
            .filter(|(_, e)| !e.is_empty())
        {
            let err = |m: String| PluginError::Config {
                parameter: PLUGINS,
                message: format!("entry {} `{entry}`: {m}", i + 1),
            };
            let (kind, path) = entry.split_once('=').ok_or_else(|| {
                err("expected `kind=path`, e.g. `scheduler=/plugins/schedules.wasm`".into())
            })?;
            let kind = PluginKind::parse(kind.trim()).ok_or_else(|| {
                err(format!(
                    "unknown kind `{}`; expected preprocessor, scheduler or reporter",
                    kind.trim()
                ))
            })?;
            let path = PathBuf::from(path.trim());
            if path.as_os_str().is_empty() {
                return Err(err("the path is empty".into()));
            }
            if !path.is_file() {
                return Err(err(format!(
                    "{} does not exist or is not a file",
                    path.display()
                )));
            }
            let s = stem(&path);
            if let Some(prev) = stems.insert(s.clone(), path.clone()) {
                return Err(err(format!(
                    "two plugins share the file stem `{s}` ({} and {}); rename one so `{CONFIG}` can tell them apart",
                    prev.display(),
                    path.display()
                )));
            }
            let spec = PluginSpec {
                kind,
                path,
                options: PluginOptions {
                    name: Some(format!("plugin:{s}")),
                    ..Default::default()
                },
            };
            match kind {
                PluginKind::Preprocessor if set.preprocessor.is_some() => {
                    return Err(err("only one preprocessor may be named".into()));
                }
                PluginKind::Scheduler if set.scheduler.is_some() => {
                    return Err(err("only one scheduler may be named".into()));
                }
                PluginKind::Preprocessor => set.preprocessor = Some(spec),
                PluginKind::Scheduler => set.scheduler = Some(spec),
                PluginKind::Reporter => set.reporters.push(spec),
            }
        }

        let config: BTreeMap<String, serde_json::Value> = if config_json.trim().is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_str(config_json)
                .map_err(|e| cfg_err(format!("not a JSON object: {e}")))?
        };
        let mut entries = BTreeMap::new();
        for (key, value) in config {
            let by_kind = PluginKind::parse(&key);
            let used = match by_kind {
                Some(k) => set.specs().any(|s| s.kind == k),
                None => stems.contains_key(&key),
            };
            if !used {
                return Err(cfg_err(format!(
                    "key `{key}` names no plugin in {PLUGINS} (use a kind, or a plugin's file stem: {})",
                    if stems.is_empty() {
                        "none named".to_string()
                    } else {
                        stems.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                )));
            }
            let entry: Entry =
                serde_json::from_value(value).map_err(|e| cfg_err(format!("`{key}`: {e}")))?;
            entries.insert(key, entry);
        }
        for spec in set.specs_mut() {
            let by_kind = entries.get(spec.kind.as_str());
            let by_stem = entries.get(&stem(&spec.path));
            for (key, entry) in [
                (spec.kind.as_str().to_string(), by_kind),
                (stem(&spec.path), by_stem),
            ] {
                if let Some(entry) = entry {
                    apply(&key, entry, &mut spec.options)?;
                }
            }
            if spec.options.grants.dir.is_some() && spec.kind != PluginKind::Reporter {
                return Err(cfg_err(format!(
                    "{}: `grants.dir` is for reporters only",
                    spec.path.display()
                )));
            }
            if !spec.options.grants.http.is_empty() && spec.kind != PluginKind::Reporter {
                return Err(cfg_err(format!(
                    "{}: `grants.http` is for reporters only",
                    spec.path.display()
                )));
            }
            if !spec.options.grants.models.is_empty() && spec.kind != PluginKind::Preprocessor {
                return Err(cfg_err(format!(
                    "{}: `grants.models` is for preprocessors only",
                    spec.path.display()
                )));
            }
            spec.options.seed = plugin_seed(seed, spec.options.name.as_deref().unwrap_or_default());
        }
        Ok(set)
    }

    /// Every plugin named, in kind order.
    pub fn specs(&self) -> impl Iterator<Item = &PluginSpec> {
        self.preprocessor
            .iter()
            .chain(self.scheduler.iter())
            .chain(self.reporters.iter())
    }

    fn specs_mut(&mut self) -> impl Iterator<Item = &mut PluginSpec> {
        self.preprocessor
            .iter_mut()
            .chain(self.scheduler.iter_mut())
            .chain(self.reporters.iter_mut())
    }

    pub fn is_empty(&self) -> bool {
        self.specs().next().is_none()
    }

    /// Sets the compiled-component cache of every plugin (default: [`crate::default_cache_dir`]).
    pub fn set_cache_dir(&mut self, dir: Option<PathBuf>) {
        for s in self.specs_mut() {
            s.options.cache_dir = dir.clone();
        }
    }

    /// Sets where every plugin's log lines go (default: stderr).
    pub fn set_log_sink(&mut self, sink: crate::LogSink) {
        for s in self.specs_mut() {
            s.options.log = sink.clone();
        }
    }

    /// Refuses a `grants.dir` that is, or contains, one of `reserved`: the folders lora itself
    /// writes into (with what it writes there, for the message). A plugin that can write where lora
    /// writes could plant links there that lora's own writers would follow out of the workspace.
    /// A folder inside one of them, or next to them, is fine.
    pub fn check_dir_grants(&self, reserved: &[(PathBuf, String)]) -> Result<(), PluginError> {
        for spec in self.specs() {
            let Some(dir) = &spec.options.grants.dir else { continue };
            let granted = resolved(dir);
            for (folder, what) in reserved {
                let folder_resolved = resolved(folder);
                if folder_resolved.starts_with(&granted) {
                    let own = format!("{}-out", stem(&spec.path));
                    let (what_it_is, suggestion) = if folder_resolved == granted {
                        (format!("is where lora writes {what}"), granted.parent().unwrap_or(&granted).join(own))
                    } else {
                        (format!("contains {}, where lora writes {what}", folder.display()), granted.join(own))
                    };
                    return Err(PluginError::Grant {
                        plugin: spec.options.plugin_name(&spec.path),
                        grant: "dir",
                        message: format!(
                            "{} {what_it_is}; a plugin may not write where lora writes (it could plant links there that lora's writers would follow): grant it a folder of its own, such as {}",
                            dir.display(),
                            suggestion.display()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Loads every plugin as the run would, to find what is wrong before a run starts (what
    /// `--dry-run` does): each is compiled, identified, its imports and grants checked, linked,
    /// instantiated and configured (a preprocessor without a tokenizer: its text-tools calls return
    /// an error). A scheduler's `create` waits for the run's step counts, so it is instantiated
    /// only. Granted directories are read-only here: nothing is written. Returns one line per plugin.
    /// `env` holds the variables the run will set before it loads them (read by `grants.env`).
    pub fn check(&self, env: &[(String, String)]) -> Result<Vec<String>, PluginError> {
        let mut lines = Vec::new();
        for spec in self.specs() {
            let mut options = spec.options.clone();
            options.grants.dir_read_only = true;
            options.env_overlay = env.to_vec();
            match spec.kind {
                PluginKind::Preprocessor => {
                    crate::WasmPreprocessor::load(&spec.path, &options, Some(Arc::new(crate::NoTextTools)))?;
                }
                PluginKind::Scheduler => crate::WasmScheduler::instantiate_only(&spec.path, &options)?,
                PluginKind::Reporter => {
                    crate::WasmReporter::load(&spec.path, &options)?;
                }
            }
            let what = match spec.kind {
                PluginKind::Scheduler => "loaded and instantiated (`create` runs once the step counts are known)",
                _ => "loaded, instantiated and configured",
            };
            lines.push(format!("{} {} ({}): {what}", spec.kind, options.plugin_name(&spec.path), spec.path.display()));
        }
        Ok(lines)
    }

    pub fn load_preprocessor(
        &self,
        text_tools: Arc<dyn TextTools>,
    ) -> Result<Option<Box<dyn Preprocessor>>, PluginError> {
        self.preprocessor
            .as_ref()
            .map(|s| load_preprocessor(&s.path, &s.options, text_tools))
            .transpose()
    }

    pub fn load_scheduler(
        &self,
        context: ScheduleContext,
    ) -> Result<Option<Box<dyn Scheduler>>, PluginError> {
        self.scheduler
            .as_ref()
            .map(|s| load_scheduler(&s.path, &s.options, context))
            .transpose()
    }

    pub fn load_reporters(&self) -> Result<Vec<Box<dyn Reporter>>, PluginError> {
        self.reporters
            .iter()
            .map(|s| load_reporter(&s.path, &s.options))
            .collect()
    }
}

fn apply(key: &str, e: &Entry, o: &mut PluginOptions) -> Result<(), PluginError> {
    for (k, v) in &e.settings {
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                return Err(cfg_err(format!(
                    "`{key}.settings.{k}` is {other}; use a string, number or boolean"
                )));
            }
        };
        o.settings.insert(k.clone(), v);
    }
    if let Some(g) = &e.grants {
        if let Some(dir) = &g.dir {
            o.grants.dir = Some(dir.clone());
        }
        if let Some(env) = &g.env {
            o.grants.env = env.clone();
        }
        if let Some(c) = g.clocks {
            o.grants.clocks = c;
        }
        if let Some(http) = &g.http {
            crate::http::parse_allow_list(http)
                .map_err(|m| cfg_err(format!("`{key}.grants.http`: {m}")))?;
            o.grants.http = http.clone();
        }
        if let Some(models) = &g.models {
            for name in models.keys() {
                if name.is_empty() || name.chars().any(|c| c.is_control()) {
                    return Err(cfg_err(format!(
                        "`{key}.grants.models`: model name {name:?} is empty or has control characters"
                    )));
                }
            }
            o.grants.models = models.clone();
        }
    }
    let positive = |field: &str, v: Option<u64>| -> Result<Option<u64>, PluginError> {
        match v {
            Some(0) => Err(cfg_err(format!("`{key}.{field}` must be greater than 0"))),
            v => Ok(v),
        }
    };
    for (field, v, bits) in [
        ("memory_mib", e.memory_mib, 20),
        ("max_output_mib", e.max_output_mib, 20),
        ("max_text_input_kib", e.max_text_input_kib, 10),
        ("max_dir_mib", e.max_dir_mib, 20),
        ("max_tensor_mib", e.max_tensor_mib, 20),
    ] {
        if v.is_some_and(|v| v.checked_shl(bits).is_none_or(|b| b >> bits != v)) {
            return Err(cfg_err(format!("`{key}.{field}` is too large")));
        }
    }
    if let Some(m) = positive("memory_mib", e.memory_mib)? {
        o.limits.memory_bytes = m << 20;
    }
    if let Some(d) = positive("deadline_ms", e.deadline_ms)? {
        o.limits.deadline = Duration::from_millis(d);
    }
    if let Some(m) = positive("max_output_mib", e.max_output_mib)? {
        o.limits.max_output_bytes = m << 20;
    }
    if let Some(k) = positive("max_text_input_kib", e.max_text_input_kib)? {
        o.limits.max_text_input_bytes = k << 10;
    }
    if let Some(m) = positive("max_dir_mib", e.max_dir_mib)? {
        o.limits.max_dir_bytes = m << 20;
    }
    if let Some(m) = positive("max_tensor_mib", e.max_tensor_mib)? {
        o.limits.max_tensor_bytes = m << 20;
    }
    Ok(())
}

/// `path` made absolute with its longest existing ancestor's symlinks resolved, so two spellings
/// of one folder compare equal (the rest need not exist yet).
fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p: PathBuf, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return abs,
        }
    }
}
