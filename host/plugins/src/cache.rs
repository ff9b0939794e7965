//! The process-wide engine (with its epoch ticker) and compiled components cached by content hash,
//! in memory for this process and on disk across runs.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

use crate::PluginError;

/// How often the epoch advances; per-call deadlines are counted in these ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
static COMPILED: OnceLock<Mutex<HashMap<String, Component>>> = OnceLock::new();

/// The one engine of this process. Its first use starts a thread that advances the epoch every
/// [`EPOCH_TICK`], which is what interrupts a plugin call past its deadline.
pub(crate) fn engine() -> Result<&'static Engine, PluginError> {
    let engine = ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.concurrency_support(false);
        let engine = Engine::new(&config).map_err(|e| format!("{e:#}"))?;
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("lora-plugin-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                }
            })
            .map_err(|e| format!("cannot start the epoch thread: {e}"))?;
        Ok(engine)
    });
    engine.as_ref().map_err(|e| PluginError::Engine(e.clone()))
}

/// The default on-disk cache: `$XDG_CACHE_HOME/lora/components`, else `~/.cache/lora/components`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("lora").join("components"))
}

/// How a component was obtained, for `inspect` and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Already compiled in this process.
    Memory,
    /// Deserialised from the on-disk cache.
    Disk,
    /// Compiled now (and written to the cache when there is one).
    Compiled,
}

/// A loaded plugin file: its bytes' hash and the compiled component.
pub(crate) struct Loaded {
    pub bytes: Vec<u8>,
    pub sha256: String,
    pub component: Component,
    pub outcome: CacheOutcome,
    /// A problem writing the on-disk cache (the component itself is fine).
    pub cache_warning: Option<String>,
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads and compiles `path`, using the in-process and on-disk caches. `use_memory` = false
/// skips the in-process cache (the benchmark measures the disk path with it).
pub(crate) fn load(
    path: &Path,
    cache_dir: Option<&Path>,
    use_memory: bool,
) -> Result<Loaded, PluginError> {
    let engine = engine()?;
    let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let sha256 = sha256_hex(&bytes);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let key = format!("{sha256}-{:016x}", h.finish());

    let memory = COMPILED.get_or_init(Default::default);
    if use_memory
        && let Some(c) = memory
            .lock()
            .map_err(|_| PluginError::Engine("component cache lock poisoned".into()))?
            .get(&key)
    {
        return Ok(Loaded {
            bytes,
            sha256,
            component: c.clone(),
            outcome: CacheOutcome::Memory,
            cache_warning: None,
        });
    }

    let cached = cache_dir.map(|d| d.join(format!("{key}.cwasm")));
    let mut outcome = CacheOutcome::Compiled;
    let mut cache_warning = None;
    // SAFETY: `deserialize_file` trusts that the file was written by `Component::serialize` of a
    // compatible engine. The cache directory is ours (files named by the hash of the source
    // component and of the engine's configuration, written atomically below); wasmtime itself
    // still checks the header and version and returns an error (we then recompile) on mismatch.
    let from_disk = cached
        .as_ref()
        .filter(|p| p.is_file())
        .and_then(|p| unsafe { Component::deserialize_file(engine, p) }.ok());
    let component = match from_disk {
        Some(c) => {
            outcome = CacheOutcome::Disk;
            c
        }
        None => {
            let c = Component::new(engine, &bytes).map_err(|e| PluginError::Compile {
                path: path.to_path_buf(),
                message: format!("{e:#}"),
            })?;
            if let Some(p) = &cached {
                cache_warning = write_cache(&c, p).err();
            }
            c
        }
    };
    if let Ok(mut m) = memory.lock() {
        m.insert(key, component.clone());
    }
    Ok(Loaded {
        bytes,
        sha256,
        component,
        outcome,
        cache_warning,
    })
}

fn write_cache(component: &Component, path: &Path) -> Result<(), String> {
    let dir = path.parent().ok_or("cache path has no parent")?;
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create component cache {}: {e}", dir.display()))?;
    let data = component
        .serialize()
        .map_err(|e| format!("cannot serialise component: {e:#}"))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot rename {} into place: {e}", tmp.display()))
}
