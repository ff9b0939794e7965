//! `lora-plugins`: the wasmtime runtime that turns WebAssembly components into `lora-api` traits.
//!
//! It owns: the host side of the WIT contract (`wit/since_vX.Y.Z/`, one binding module per
//! supported version), the sandbox (deny by default; grants and limits per plugin), the
//! process-wide `Engine` and the on-disk cache of compiled components, the parsing of the run's
//! `training_plugins` / `training_plugin_config` parameters, and the library side of
//! `lora plugin inspect` / `lora plugin check`.
//!
//! It must not know about training: no engine, no data pipeline, no CLI. A plugin is only ever
//! seen through [`lora_api::Preprocessor`], [`lora_api::Scheduler`] and [`lora_api::Reporter`],
//! and every failure inside one comes back as a [`lora_api::ExtError`] naming the plugin, the
//! call, the batch or step, and the kind (trap, limit, contract, failed). Nothing here exits or
//! panics on bad input.
//!
//! Entry points: [`load_preprocessor`], [`load_scheduler`], [`load_reporter`] for one plugin;
//! [`PluginSet::from_params`] for the run's parameters; [`inspect`] and [`check`] for the CLI.

mod bindings;
mod cache;
mod check;
mod config;
mod error;
mod fsguard;
mod host;
pub mod http;
mod inspect;
mod limits;
#[cfg(feature = "wasi-nn")]
pub mod nn;
mod preprocessor;
mod reporter;
mod sandbox;
mod scheduler;
#[doc(hidden)]
pub mod testing;

pub use cache::{CacheOutcome, default_cache_dir};
pub use check::{CheckReport, NoTextTools, check};
pub use config::{PluginSet, PluginSpec};
pub use error::PluginError;
pub use host::escape_controls;
pub use inspect::{Inspection, inspect};
pub use preprocessor::{WasmPreprocessor, load_preprocessor};
pub use reporter::{WasmReporter, load_reporter};
pub use sandbox::{Grants, Limits, LogLevel, LogSink, PluginOptions, stderr_log_sink};
pub use scheduler::{WasmScheduler, load_scheduler};

/// The plugin API versions (WIT package `lora:plugin`) this host can run.
pub const SUPPORTED_API_VERSIONS: &[&str] = &["0.1.0"];

/// Where a reporter's granted directory appears inside its sandbox.
pub const GUEST_OUTPUT_DIR: &str = "/out";

/// Compiles `path` into the on-disk cache at `cache_dir` (or takes it from there), bypassing this
/// process's in-memory cache; says which happened. For warming a cache ahead of a run and for
/// measuring instantiation from the cache against a cold compile.
pub fn precompile(
    path: &std::path::Path,
    cache_dir: &std::path::Path,
) -> Result<CacheOutcome, PluginError> {
    let loaded = cache::load(path, Some(cache_dir), false)?;
    match loaded.cache_warning {
        Some(w) => Err(PluginError::Input(w)),
        None => Ok(loaded.outcome),
    }
}

/// The three kinds of plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginKind {
    Preprocessor,
    Scheduler,
    Reporter,
}

impl PluginKind {
    /// The name used in `training_plugins` and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Preprocessor => "preprocessor",
            PluginKind::Scheduler => "scheduler",
            PluginKind::Reporter => "reporter",
        }
    }

    /// The WIT interface a component of this kind exports.
    pub fn export_interface(self) -> &'static str {
        match self {
            PluginKind::Preprocessor => "preprocess",
            PluginKind::Scheduler => "schedule",
            PluginKind::Reporter => "report",
        }
    }

    pub fn parse(s: &str) -> Option<PluginKind> {
        match s {
            "preprocessor" => Some(PluginKind::Preprocessor),
            "scheduler" => Some(PluginKind::Scheduler),
            "reporter" => Some(PluginKind::Reporter),
            _ => None,
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
