//! The sandbox around one plugin instance: what it is granted (nothing by default), its limits,
//! and the wrapper that turns every failure of a call into an [`ExtError`] of the right kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lora_api::{ErrorKind, ExtError, TextTools};
use rand::SeedableRng;
use rand::rngs::StdRng;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{
    FsPerms, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::bindings::v0_1_0 as wit;
use crate::cache::{self, EPOCH_TICK, Loaded};
use crate::http::{HttpPolicy, parse_allow_list};
use crate::{GUEST_OUTPUT_DIR, PluginError, PluginKind, SUPPORTED_API_VERSIONS};

/// What a plugin may touch beyond its own memory. Everything is off by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grants {
    /// One host directory, read-write, seen by the plugin as `/out`. Reporters only.
    pub dir: Option<PathBuf>,
    /// Host environment variables passed through by name (each must be set).
    pub env: Vec<String>,
    /// The real wall and monotonic clocks; without this grant both read 0.
    pub clocks: bool,
    /// Hosts a reporter may send `wasi:http` requests to: `[http://|https://]host[:port]`, a
    /// leading `*.` for subdomains (see [`crate::http`]). Empty: no requests at all.
    pub http: Vec<String>,
}

/// Per-plugin limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// All linear memories of the instance together.
    pub memory_bytes: u64,
    /// Wall time of one call (including the host functions it calls).
    pub deadline: Duration,
    /// Bytes of data one call may return (strings, token ids, …).
    pub max_output_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            deadline: Duration::from_secs(30),
            max_output_bytes: 64 << 20,
        }
    }
}

/// Severity of a plugin's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// Where plugin log lines go: `(plugin name, level, message)`.
pub type LogSink = Arc<dyn Fn(&str, LogLevel, &str) + Send + Sync>;

/// The default sink: one line per message on stderr, `[plugin:name] level: message`.
pub fn stderr_log_sink() -> LogSink {
    Arc::new(|plugin, level, msg| {
        eprintln!("[{plugin}] {}: {msg}", format!("{level:?}").to_lowercase())
    })
}

/// How to run one plugin.
#[derive(Clone)]
pub struct PluginOptions {
    /// The name in messages; default `plugin:<file stem>`.
    pub name: Option<String>,
    /// Passed to the plugin's `configure` / `create`.
    pub settings: BTreeMap<String, String>,
    pub grants: Grants,
    pub limits: Limits,
    /// Seeds the plugin's `wasi:random` (both the secure and insecure generators), so a run with
    /// plugins is reproducible. Derive it from the run seed ([`crate::PluginSet`] does).
    pub seed: u64,
    /// The on-disk cache of compiled components; `None` disables it.
    pub cache_dir: Option<PathBuf>,
    pub log: LogSink,
}

impl Default for PluginOptions {
    fn default() -> Self {
        PluginOptions {
            name: None,
            settings: BTreeMap::new(),
            grants: Grants::default(),
            limits: Limits::default(),
            seed: 0,
            cache_dir: cache::default_cache_dir(),
            log: stderr_log_sink(),
        }
    }
}

impl std::fmt::Debug for PluginOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginOptions")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("grants", &self.grants)
            .field("limits", &self.limits)
            .field("seed", &self.seed)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

impl PluginOptions {
    pub(crate) fn plugin_name(&self, path: &Path) -> String {
        self.name.clone().unwrap_or_else(|| {
            format!(
                "plugin:{}",
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )
        })
    }

    pub(crate) fn settings_list(&self) -> Vec<(String, String)> {
        self.settings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Caps the instance's memories (together) and counts what happened.
pub(crate) struct Limiter {
    cap: usize,
    used: usize,
    /// Set when a growth was refused; turns the resulting trap into a `Limit` error.
    pub(crate) hit: Option<String>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used - current.min(self.used) + desired;
        if total > self.cap {
            let msg = format!(
                "memory limit of {} MiB exceeded (growing to {} MiB); raise `memory_mib` in training_plugin_config if this is expected",
                self.cap >> 20,
                total >> 20
            );
            self.hit = Some(msg.clone());
            return Err(wasmtime::Error::msg(msg));
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }

    fn instances(&self) -> usize {
        100
    }
    fn tables(&self) -> usize {
        1000
    }
    fn memories(&self) -> usize {
        100
    }
}

/// The store's data: WASI state (with no grants unless configured), limits and host services.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    pub(crate) http_policy: HttpPolicy,
    pub(crate) limiter: Limiter,
    pub(crate) text_tools: Option<Arc<dyn TextTools>>,
    name: String,
    log: LogSink,
    stderr: MemoryOutputPipe,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_policy,
        }
    }
}

impl wit::types::Host for State {}

impl wit::host::Host for State {
    fn log(&mut self, level: wit::types::LogLevel, message: String) {
        let level = match level {
            wit::types::LogLevel::Debug => LogLevel::Debug,
            wit::types::LogLevel::Info => LogLevel::Info,
            wit::types::LogLevel::Warn => LogLevel::Warn,
            wit::types::LogLevel::Error => LogLevel::Error,
        };
        let mut end = message.len().min(4096);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        (self.log)(&self.name, level, &message[..end]);
    }
}

impl wit::text_tools::Host for State {
    fn encode(&mut self, text: String, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.tools()?.encode(&text, add_special_tokens)
    }
    fn decode(&mut self, ids: Vec<u32>, skip_special_tokens: bool) -> Result<String, String> {
        self.tools()?.decode(&ids, skip_special_tokens)
    }
    fn count_tokens(&mut self, text: String) -> Result<u32, String> {
        Ok(self.tools()?.encode(&text, false)?.len() as u32)
    }
    fn apply_chat_template(
        &mut self,
        messages: Vec<wit::types::Message>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<lora_api::Message> = messages
            .into_iter()
            .map(|m| lora_api::Message {
                role: m.role,
                content: m.content,
            })
            .collect();
        self.tools()?
            .apply_chat_template(&messages, add_generation_prompt)
    }
}

impl State {
    fn tools(&self) -> Result<&Arc<dyn TextTools>, String> {
        self.text_tools
            .as_ref()
            .ok_or_else(|| "the run offers no tokenizer to this plugin".to_string())
    }
}

/// Wall and monotonic clocks frozen at 0: a plugin without the `clocks` grant cannot tell time.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The API version a component was built against, and its kind, from its export names
/// (`lora:plugin/preprocess@0.1.0`).
pub(crate) fn identify(
    path: &Path,
    component: &Component,
) -> Result<(PluginKind, String), PluginError> {
    let engine = cache::engine()?;
    let ty = component.component_type();
    let mut exports = Vec::new();
    let mut found = None;
    for (name, _) in ty.exports(engine) {
        exports.push(name.to_string());
        let Some(rest) = name.strip_prefix("lora:plugin/") else {
            continue;
        };
        let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
        let kind = [
            PluginKind::Preprocessor,
            PluginKind::Scheduler,
            PluginKind::Reporter,
        ]
        .into_iter()
        .find(|k| k.export_interface() == iface);
        if let Some(kind) = kind {
            found = Some((kind, version.to_string()));
        }
    }
    let (kind, version) = found.ok_or_else(|| PluginError::NotAPlugin {
        path: path.to_path_buf(),
        exports: if exports.is_empty() {
            "none".into()
        } else {
            exports.join(", ")
        },
    })?;
    if !SUPPORTED_API_VERSIONS.contains(&version.as_str()) {
        let newest = SUPPORTED_API_VERSIONS.last().copied().unwrap_or("0.0.0");
        let newer = version_key(&version) > version_key(newest);
        return Err(PluginError::ApiVersion {
            path: path.to_path_buf(),
            found: if version.is_empty() {
                "(no version)".into()
            } else {
                version
            },
            relation: if newer {
                "newer than what"
            } else {
                "which is not among the versions"
            },
            supported: SUPPORTED_API_VERSIONS.join(", "),
            hint: if newer {
                "upgrade lora, or rebuild the plugin against an SDK for a supported version"
            } else {
                "rebuild the plugin against the current lora-plugin SDK"
            },
        });
    }
    Ok((kind, version))
}

fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// The component's import names.
pub(crate) fn imports(component: &Component) -> Result<Vec<String>, PluginError> {
    let engine = cache::engine()?;
    Ok(component
        .component_type()
        .imports(engine)
        .map(|(n, _)| n.to_string())
        .collect())
}

/// Refuses imports lora does not provide to this kind, with a message naming them.
fn check_imports(
    path: &Path,
    kind: PluginKind,
    component: &Component,
    grants: &Grants,
) -> Result<(), PluginError> {
    for import in imports(component)? {
        let iface = import.split('@').next().unwrap_or(&import);
        let ok = match iface {
            "lora:plugin/types" | "lora:plugin/host" => true,
            "lora:plugin/text-tools" => kind == PluginKind::Preprocessor,
            i if i.starts_with("wasi:http/") => {
                kind == PluginKind::Reporter && !grants.http.is_empty()
            }
            i if i.starts_with("wasi:") => true,
            _ => false,
        };
        if !ok {
            let hint = if iface == "lora:plugin/text-tools" {
                "only preprocessors get the tokenizer"
            } else if iface.starts_with("wasi:http/") && kind == PluginKind::Reporter {
                "the reporter sends HTTP requests: list the hosts it may reach in `grants.http` of training_plugin_config"
            } else if iface.starts_with("wasi:http/") {
                "only reporters may use wasi:http"
            } else {
                "a plugin may import lora:plugin/host, the preprocessor's lora:plugin/text-tools and WASI 0.2"
            };
            return Err(PluginError::UnsupportedImport {
                path: path.to_path_buf(),
                import,
                kind: kind.as_str(),
                hint,
            });
        }
    }
    Ok(())
}

/// One running plugin instance: its store, and whether an earlier failure left it unusable.
pub(crate) struct Sandbox {
    pub(crate) store: Store<State>,
    pub(crate) name: String,
    limits: Limits,
    /// Set after a trap or limit: a trapped instance must not be entered again.
    poisoned: Option<String>,
}

/// A loaded, identified and checked component ready to instantiate.
pub(crate) struct Prepared {
    pub loaded: Loaded,
    pub name: String,
}

pub(crate) fn prepare(
    path: &Path,
    expected: PluginKind,
    options: &PluginOptions,
) -> Result<Prepared, PluginError> {
    let loaded = cache::load(path, options.cache_dir.as_deref(), true)?;
    let (kind, _version) = identify(path, &loaded.component)?;
    if kind != expected {
        return Err(PluginError::WrongKind {
            path: path.to_path_buf(),
            expected: expected.as_str(),
            found: kind.as_str(),
        });
    }
    check_imports(path, kind, &loaded.component, &options.grants)?;
    Ok(Prepared {
        loaded,
        name: options.plugin_name(path),
    })
}

/// The per-plugin random seed: the run seed mixed with the plugin's name, so two plugins in one
/// run get different streams and the same run gets the same ones.
pub(crate) fn plugin_seed(run_seed: u64, name: &str) -> u64 {
    let mut x = run_seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in name.bytes() {
        x = (x ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Sandbox {
    pub(crate) fn new(
        name: &str,
        kind: PluginKind,
        options: &PluginOptions,
        text_tools: Option<Arc<dyn TextTools>>,
    ) -> Result<Sandbox, PluginError> {
        let grant_err = |grant, message: String| PluginError::Grant {
            plugin: name.to_string(),
            grant,
            message,
        };
        let g = &options.grants;
        if !g.http.is_empty() && kind != PluginKind::Reporter {
            return Err(grant_err(
                "http",
                format!("only reporters may be granted wasi:http, not a {kind}"),
            ));
        }
        let allowed = parse_allow_list(&g.http).map_err(|m| grant_err("http", m))?;
        let mut b = WasiCtxBuilder::new();
        let stderr = MemoryOutputPipe::new(1 << 20);
        b.stderr(stderr.clone());
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        b.socket_addr_check(|_, _| Box::pin(async { false }));
        b.secure_random(StdRng::seed_from_u64(options.seed));
        b.insecure_random(StdRng::seed_from_u64(options.seed.rotate_left(17) ^ 0x5eed));
        b.insecure_random_seed(
            ((options.seed as u128) << 64) | options.seed.rotate_left(31) as u128,
        );
        if !g.clocks {
            b.wall_clock(FrozenClock);
            b.monotonic_clock(FrozenClock);
        }
        for var in &g.env {
            let value = std::env::var(var).map_err(|_| {
                grant_err(
                    "env",
                    format!(
                        "`{var}` is granted but not set (or not UTF-8) in the host environment"
                    ),
                )
            })?;
            b.env(var, value);
        }
        if let Some(dir) = &g.dir {
            if kind != PluginKind::Reporter {
                return Err(grant_err(
                    "dir",
                    format!("only reporters may be granted a directory, not a {kind}"),
                ));
            }
            if !dir.is_dir() {
                return Err(grant_err(
                    "dir",
                    format!("{} is not an existing directory", dir.display()),
                ));
            }
            b.preopened_dir(dir, GUEST_OUTPUT_DIR, FsPerms::ReadWrite)
                .map_err(|e| grant_err("dir", format!("cannot open {}: {e:#}", dir.display())))?;
        }
        let state = State {
            wasi: b.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            http_policy: HttpPolicy::new(
                allowed,
                &g.http,
                options.limits.deadline,
                name,
                options.log.clone(),
            ),
            limiter: Limiter {
                cap: options.limits.memory_bytes.min(usize::MAX as u64) as usize,
                used: 0,
                hit: None,
            },
            text_tools,
            name: name.to_string(),
            log: options.log.clone(),
            stderr,
        };
        let mut store = Store::new(cache::engine()?, state);
        store.limiter(|s| &mut s.limiter);
        Ok(Sandbox {
            store,
            name: name.to_string(),
            limits: options.limits.clone(),
            poisoned: None,
        })
    }

    fn deadline_ticks(&self) -> u64 {
        (self.limits.deadline.as_micros() / EPOCH_TICK.as_micros()) as u64 + 1
    }

    /// Runs `f` (one call into the guest) under the deadline and turns a host-side failure into an
    /// [`ExtError`] naming the plugin, the call and the batch.
    pub(crate) fn call<R>(
        &mut self,
        call: &str,
        batch: Option<u64>,
        f: impl FnOnce(&mut Store<State>) -> wasmtime::Result<R>,
    ) -> Result<R, ExtError> {
        let with_batch = |e: ExtError| match batch {
            Some(b) => e.with_batch(b),
            None => e,
        };
        if let Some(why) = &self.poisoned {
            return Err(with_batch(ExtError::new(
                &self.name,
                call,
                ErrorKind::Trap,
                format!("the plugin cannot be called again after an earlier failure ({why})"),
            )));
        }
        self.store.data_mut().limiter.hit = None;
        let ticks = self.deadline_ticks();
        self.store.set_epoch_deadline(ticks);
        match f(&mut self.store) {
            Ok(r) => Ok(r),
            Err(err) => {
                let (kind, message) = self.classify(&err);
                self.poisoned = Some(message.clone());
                Err(with_batch(ExtError::new(&self.name, call, kind, message)))
            }
        }
    }

    /// Fails a call whose result is larger than the output limit.
    pub(crate) fn check_output(
        &self,
        call: &str,
        batch: Option<u64>,
        bytes: u64,
    ) -> Result<(), ExtError> {
        if bytes <= self.limits.max_output_bytes {
            return Ok(());
        }
        let e = ExtError::new(
            &self.name,
            call,
            ErrorKind::Limit,
            format!(
                "returned {} MiB, more than the output limit of {} MiB (`max_output_mib`)",
                bytes >> 20,
                self.limits.max_output_bytes >> 20
            ),
        );
        Err(match batch {
            Some(b) => e.with_batch(b),
            None => e,
        })
    }

    fn classify(&self, err: &wasmtime::Error) -> (ErrorKind, String) {
        if let Some(hit) = &self.store.data().limiter.hit {
            return (ErrorKind::Limit, hit.clone());
        }
        let stderr = self.stderr_tail();
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => (
                ErrorKind::Limit,
                format!(
                    "did not finish within the per-call deadline of {} ms (`deadline_ms`)",
                    self.limits.deadline.as_millis()
                ),
            ),
            Some(Trap::StackOverflow) => (
                ErrorKind::Trap,
                format!("stack overflow (unbounded recursion?){stderr}"),
            ),
            Some(t) => (ErrorKind::Trap, format!("{t}{stderr}")),
            None => (ErrorKind::Trap, format!("{err:#}{stderr}")),
        }
    }

    /// The end of what the guest wrote to stderr (a Rust panic message lands there).
    fn stderr_tail(&self) -> String {
        let bytes = self.store.data().stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        if text.is_empty() {
            return String::new();
        }
        let start = text
            .char_indices()
            .rev()
            .nth(2000)
            .map(|(i, _)| i)
            .unwrap_or(0);
        format!("; the plugin wrote to stderr: {}", &text[start..])
    }

    /// Instantiation errors (a trap in start code, a missing import) as a [`PluginError`].
    pub(crate) fn instantiate<T>(
        &mut self,
        path: &Path,
        f: impl FnOnce(&mut Store<State>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        self.call("instantiate", None, f)
            .map_err(|e| PluginError::Instantiate {
                plugin: self.name.clone(),
                path: path.to_path_buf(),
                message: format!("{} ({})", e.message, e.kind),
            })
    }
}

/// A linker with WASI 0.2 (sync), and `wasi:http` for a reporter (whose requests the
/// [`HttpPolicy`] allows only to granted hosts; a component importing it without a grant is
/// refused before it gets here).
pub(crate) fn base_linker(kind: PluginKind) -> Result<wasmtime::component::Linker<State>, PluginError> {
    let mut linker = wasmtime::component::Linker::new(cache::engine()?);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
        .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
    if kind == PluginKind::Reporter {
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
    }
    Ok(linker)
}
