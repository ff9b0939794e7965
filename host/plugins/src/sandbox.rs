//! The sandbox around one plugin instance: what it is granted (nothing by default), its limits,
//! and the wrapper that turns every failure of a call into an [`ExtError`] of the right kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora_api::{ErrorKind, ExtError, TextTools};
use rand::SeedableRng;
use rand::rngs::StdRng;
use wasmtime::component::{Component, ResourceTable, ResourceTableError};
use wasmtime::{Store, Trap};
use wasmtime_wasi::{
    FsPerms, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::cache::{self, EPOCH_TICK, Loaded};
use crate::fsguard::DirQuota;
use crate::host::{LogBudget, StderrTail, escape_controls};
use crate::http::{HttpPolicy, parse_allow_list};
use crate::limits::{FIELDS_BYTES, Limiter, max_host_resources};
use crate::{GUEST_OUTPUT_DIR, PluginError, PluginKind, SUPPORTED_API_VERSIONS};

/// What a plugin may touch beyond its own memory. Everything is off by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grants {
    /// One host directory, read-write, seen by the plugin as `/out`. Reporters only.
    pub dir: Option<PathBuf>,
    /// Grant `dir` read-only (what [`crate::PluginSet::check`] does: a check writes nothing).
    pub dir_read_only: bool,
    /// Host environment variables passed through by name (each must be set).
    pub env: Vec<String>,
    /// The real wall and monotonic clocks; without this grant both read 0.
    pub clocks: bool,
    /// Hosts a reporter may send `wasi:http` requests to: `[http://|https://]host[:port]`, a
    /// leading `*.` for subdomains (see [`crate::http`]). Empty: no requests at all.
    pub http: Vec<String>,
    /// Models a preprocessor may run through `wasi:nn` `load-by-name`: name → a directory
    /// holding `model.onnx` (feature `wasi-nn`).
    pub models: BTreeMap<String, PathBuf>,
}

/// Per-plugin limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// All linear memories and tables of the instance together; live host resources (streams,
    /// header maps, ...) are capped in number so they stay within about as much again.
    pub memory_bytes: u64,
    /// Wall time of one call, whatever it waits on: guest code, host functions, sleeps, polls,
    /// blocking reads.
    pub deadline: Duration,
    /// Bytes one call may hand the host in one value: its result, or the arguments of one host
    /// call (as the host holds them: strings, token ids, and the records and samples around them).
    pub max_output_bytes: u64,
    /// Bytes of input one text-tools call (`encode`, `decode`, `count-tokens`,
    /// `apply-chat-template`) may pass; the host's work grows with it.
    pub max_text_input_bytes: u64,
    /// Disk space the plugin's writes may add to its granted directory over the run.
    pub max_dir_bytes: u64,
    /// Bytes of all input tensors of one `wasi:nn` compute, and of all its outputs.
    pub max_tensor_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            deadline: Duration::from_secs(30),
            max_output_bytes: 64 << 20,
            max_text_input_bytes: 1 << 20,
            max_dir_bytes: 1 << 30,
            max_tensor_bytes: 64 << 20,
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

/// The default sink: one line per message on stderr, `[plugin:name] level: message`. Messages
/// from guests reach a sink with control characters already escaped, so each is one line.
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
    /// Values `grants.env` reads before the process environment: what a run will set (from
    /// `training_envs`) when the plugins are checked before it starts.
    pub env_overlay: Vec<(String, String)>,
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
            env_overlay: Vec::new(),
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

/// The store's data: WASI state (with no grants unless configured), limits and host services.
pub(crate) struct State {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    http: WasiHttpCtx,
    pub(crate) http_policy: HttpPolicy,
    pub(crate) limiter: Limiter,
    pub(crate) text_tools: Option<Arc<dyn TextTools>>,
    pub(crate) name: String,
    pub(crate) log: LogSink,
    pub(crate) log_budget: LogBudget,
    stderr: StderrTail,
    pub(crate) limits: Limits,
    /// When the current call started (host functions check the deadline against it).
    call_started: Instant,
    /// Why a host-side limit ended the current call (memory and tables: `limiter.hit`).
    hit: Option<String>,
    /// The granted directory's quota, when a directory is granted.
    pub(crate) quota: Option<Arc<DirQuota>>,
    #[cfg(feature = "wasi-nn")]
    pub(crate) nn: wasmtime_wasi_nn::wit::WasiNnCtx,
    #[cfg(feature = "wasi-nn")]
    pub(crate) nn_watch: Arc<crate::nn::CallWatch>,
    /// The granted models, loaded (name, file, sha256).
    #[cfg(feature = "wasi-nn")]
    pub(crate) models: Vec<crate::nn::ModelInfo>,
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

impl State {
    /// Records why a host-side limit ends the current call; the returned error traps the guest.
    pub(crate) fn limit_hit(&mut self, message: String) -> wasmtime::Error {
        self.hit = Some(message.clone());
        wasmtime::Error::msg(message)
    }

    /// The deadline message if the current call is past its deadline.
    pub(crate) fn deadline_passed(&self) -> Option<String> {
        (self.call_started.elapsed() > self.limits.deadline).then(|| deadline_message(&self.limits, ""))
    }

    /// A line in the run's log under this plugin's name, from the host.
    pub(crate) fn log_line(&self, level: LogLevel, message: &str) {
        (self.log)(&self.name, level, message)
    }
}

fn deadline_message(limits: &Limits, waiting: &str) -> String {
    format!(
        "did not finish within the per-call deadline of {} ms (`deadline_ms`){waiting}",
        limits.deadline.as_millis()
    )
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

/// The WASI 0.2 interfaces lora links for every plugin (wasmtime-wasi's `p2` set); `wasi:http`
/// is added for reporters granted `grants.http`.
const WASI_INTERFACES: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/exit",
    "wasi:cli/environment",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/ip-name-lookup",
];
const WASI_HTTP_INTERFACES: &[&str] = &["wasi:http/types", "wasi:http/outgoing-handler"];

/// Refuses imports lora does not provide to this kind, with a message naming them: everything
/// but `lora:plugin/*` as the kind gets it and the WASI 0.2 interfaces lora links.
pub(crate) fn check_imports(
    path: &Path,
    kind: PluginKind,
    component: &Component,
    grants: &Grants,
) -> Result<(), PluginError> {
    for import in imports(component)? {
        let (iface, version) = import.split_once('@').unwrap_or((&import, ""));
        let wasi_02 = version.starts_with("0.2.");
        let hint = match iface {
            "lora:plugin/types" | "lora:plugin/host" => None,
            "lora:plugin/text-tools" if kind == PluginKind::Preprocessor => None,
            "lora:plugin/text-tools" => Some("only preprocessors get the tokenizer"),
            i if WASI_HTTP_INTERFACES.contains(&i) && wasi_02 => match kind {
                PluginKind::Reporter if !grants.http.is_empty() => None,
                PluginKind::Reporter => Some(
                    "the reporter sends HTTP requests: list the hosts it may reach in `grants.http` of training_plugin_config",
                ),
                _ => Some("only reporters may use wasi:http"),
            },
            #[cfg(feature = "wasi-nn")]
            i if crate::nn::WASI_NN_INTERFACES.contains(&i) && version == crate::nn::WASI_NN_VERSION => match kind {
                PluginKind::Preprocessor => None,
                _ => Some("only preprocessors may use wasi:nn"),
            },
            #[cfg(feature = "wasi-nn")]
            i if i.starts_with("wasi:nn/") => Some(
                "lora offers wasi:nn@0.2.0-rc-2024-10-28 (wasmtime-wasi-nn 48); rebuild the plugin against that WIT",
            ),
            #[cfg(not(feature = "wasi-nn"))]
            i if i.starts_with("wasi:nn/") => Some(
                "this lora was built without wasi:nn (cargo feature `wasi-nn`)",
            ),
            i if WASI_INTERFACES.contains(&i) && wasi_02 => None,
            i if WASI_INTERFACES.contains(&i) || WASI_HTTP_INTERFACES.contains(&i) => Some(
                "lora offers WASI 0.2 (wasmtime-wasi 48, `@0.2.x`); rebuild the plugin for wasm32-wasip2",
            ),
            i if i.starts_with("wasi:") => Some(
                "lora offers these WASI 0.2 interfaces only: wasi:io, wasi:clocks, wasi:filesystem, wasi:random, wasi:cli, wasi:sockets (all denied unless granted), and wasi:http to reporters granted `grants.http`",
            ),
            _ => Some(
                "a plugin may import lora:plugin/host, the preprocessor's lora:plugin/text-tools and WASI 0.2",
            ),
        };
        if let Some(hint) = hint {
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
        if !g.models.is_empty() && kind != PluginKind::Preprocessor {
            return Err(grant_err(
                "models",
                format!("only preprocessors may be granted models, not a {kind}"),
            ));
        }
        #[cfg(not(feature = "wasi-nn"))]
        if !g.models.is_empty() {
            return Err(grant_err(
                "models",
                "this lora was built without wasi:nn (cargo feature `wasi-nn`)".into(),
            ));
        }
        #[cfg(feature = "wasi-nn")]
        let nn_watch = crate::nn::CallWatch::new(options.limits.deadline, options.log.clone());
        #[cfg(feature = "wasi-nn")]
        let (nn, models) = crate::nn::granted_context(
            name,
            &g.models,
            options.limits.max_tensor_bytes,
            &nn_watch,
        )?;
        let mut b = WasiCtxBuilder::new();
        let stderr = StderrTail::default();
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
            let overlay = options.env_overlay.iter().rev().find(|(k, _)| k == var);
            let value = overlay.map(|(_, v)| Ok(v.clone())).unwrap_or_else(|| std::env::var(var)).map_err(|_| {
                grant_err(
                    "env",
                    format!(
                        "`{var}` is granted but not set (or not UTF-8) in the host environment"
                    ),
                )
            })?;
            b.env(var, value);
        }
        // A granted model's directory is also readable by the plugin, read-only, at
        // `/models/<name>`: what the model needs beside its graph (a vocabulary, labels).
        #[cfg(feature = "wasi-nn")]
        for (model, dir) in &g.models {
            b.preopened_dir(dir, format!("{}/{model}", crate::nn::GUEST_MODELS_DIR), FsPerms::ReadOnly)
                .map_err(|e| grant_err("models", format!("`{model}`: cannot open {}: {e:#}", dir.display())))?;
        }
        let mut quota = None;
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
            let perms = if g.dir_read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            b.preopened_dir(dir, GUEST_OUTPUT_DIR, perms)
                .map_err(|e| grant_err("dir", format!("cannot open {}: {e:#}", dir.display())))?;
            quota = Some(Arc::new(DirQuota::new(dir, options.limits.max_dir_bytes)));
        }
        let mut table = ResourceTable::new();
        table.set_max_capacity(max_host_resources(options.limits.memory_bytes));
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(FIELDS_BYTES);
        let state = State {
            wasi: b.build(),
            table,
            http,
            http_policy: HttpPolicy::new(
                allowed,
                &g.http,
                options.limits.deadline,
                name,
                options.log.clone(),
            ),
            limiter: Limiter::new(options.limits.memory_bytes),
            text_tools,
            name: name.to_string(),
            log: options.log.clone(),
            log_budget: LogBudget::default(),
            stderr,
            limits: options.limits.clone(),
            call_started: Instant::now(),
            hit: None,
            quota,
            #[cfg(feature = "wasi-nn")]
            nn,
            #[cfg(feature = "wasi-nn")]
            nn_watch,
            #[cfg(feature = "wasi-nn")]
            models,
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

    /// Runs `f` (one call into the guest) under the plugin's limits and turns a host-side failure
    /// into an [`ExtError`] naming the plugin, the call and the batch.
    ///
    /// The deadline holds whatever the guest does: running code is interrupted by the epoch,
    /// and a call waiting in a host future (a sleep, a `wasi:io/poll` on a far instant, a blocking
    /// read) is abandoned by the timeout around the whole call. Either way the instance is not
    /// entered again.
    pub(crate) fn call<R>(
        &mut self,
        call: &str,
        batch: Option<u64>,
        f: impl AsyncFnOnce(&mut Store<State>) -> wasmtime::Result<R>,
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
        let state = self.store.data_mut();
        state.limiter.hit = None;
        state.hit = None;
        state.call_started = Instant::now();
        state.log_budget.begin_call();
        state.stderr.clear();
        #[cfg(feature = "wasi-nn")]
        state.nn_watch.begin_call();
        if let Some(q) = &state.quota {
            q.take_hit();
        }
        let ticks = self.deadline_ticks();
        self.store.set_epoch_deadline(ticks);
        // What the guest hands the host in one value (a result, a host call's arguments) is
        // bounded while wasmtime lifts it, before the host holds it whole.
        self.store
            .set_hostcall_fuel(self.limits.max_output_bytes.min(usize::MAX as u64 / 2) as usize);
        let deadline = self.limits.deadline;
        let store = &mut self.store;
        let outcome = wasmtime_wasi::runtime::in_tokio(async move {
            tokio::time::timeout(deadline, f(store)).await
        });
        let suppressed = self.store.data().log_budget.suppressed;
        if suppressed > 0 {
            self.store.data().log_line(
                LogLevel::Warn,
                &format!("{suppressed} log lines of `{call}` were suppressed (log limit)"),
            );
        }
        let (kind, message) = match outcome {
            // A model that ran past the deadline fails the call whatever the guest made of it.
            Ok(Ok(_)) if self.nn_hit().is_some() => {
                (ErrorKind::Limit, self.nn_hit().unwrap_or_default())
            }
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(err)) => self.classify(&err),
            Err(_elapsed) if self.nn_hit().is_some() => {
                (ErrorKind::Limit, self.nn_hit().unwrap_or_default())
            }
            Err(_elapsed) => (
                ErrorKind::Limit,
                deadline_message(
                    &self.limits,
                    "; it was waiting on the host (sleeping, polling or blocked on a read or write)",
                ),
            ),
        };
        self.poisoned = Some(message.clone());
        Err(with_batch(ExtError::new(&self.name, call, kind, message)))
    }

    /// Why a model ended the current call, if one did.
    fn nn_hit(&self) -> Option<String> {
        #[cfg(feature = "wasi-nn")]
        {
            self.store.data().nn_watch.hit.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
        #[cfg(not(feature = "wasi-nn"))]
        None
    }

    /// The last wasi-nn error of the current call (naming plugin and graph), if any.
    pub(crate) fn nn_last_error(&self) -> Option<String> {
        #[cfg(feature = "wasi-nn")]
        {
            self.store.data().nn_watch.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
        #[cfg(not(feature = "wasi-nn"))]
        None
    }

    /// The models granted to this plugin, loaded: name, file and sha256.
    #[cfg(feature = "wasi-nn")]
    pub(crate) fn models(&self) -> &[crate::nn::ModelInfo] {
        &self.store.data().models
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

    /// The kind and message of a failed call: a limit the host recorded, or the trap.
    fn classify(&self, err: &wasmtime::Error) -> (ErrorKind, String) {
        if let Some(hit) = self.nn_hit() {
            return (ErrorKind::Limit, hit);
        }
        let data = self.store.data();
        let quota_hit = data.quota.as_ref().and_then(|q| q.take_hit());
        if let Some(hit) = data.limiter.hit.clone().or(data.hit.clone()).or(quota_hit) {
            return (ErrorKind::Limit, hit);
        }
        if let Some(ResourceTableError::Full) = err.downcast_ref::<ResourceTableError>() {
            return (
                ErrorKind::Limit,
                format!(
                    "holds more than {} host resources at once (streams, pollables, wasi:http header maps, ...); the limit follows `memory_mib`",
                    data.table.max_capacity()
                ),
            );
        }
        if let Some(wasmtime_wasi_http::FieldMapError::TotalSizeTooBig) =
            err.downcast_ref::<wasmtime_wasi_http::FieldMapError>()
        {
            return (
                ErrorKind::Limit,
                format!(
                    "filled a wasi:http header map past {} KiB, the host's limit per header map",
                    FIELDS_BYTES >> 10
                ),
            );
        }
        let text = error_text(err);
        if text.contains("fuel allocated for hostcalls has been exhausted") {
            return (
                ErrorKind::Limit,
                format!(
                    "handed the host more than the output limit of {} MiB (`max_output_mib`) in one value (a call's result, or the arguments of one host call)",
                    self.limits.max_output_bytes >> 20
                ),
            );
        }
        let stderr = self.stderr_tail();
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => (ErrorKind::Limit, deadline_message(&self.limits, "")),
            Some(Trap::StackOverflow) => (
                ErrorKind::Trap,
                format!("stack overflow (unbounded recursion?){stderr}"),
            ),
            Some(t) => (ErrorKind::Trap, format!("{t}{stderr}")),
            None => (ErrorKind::Trap, format!("{}{stderr}", escape_controls(&text))),
        }
    }

    /// The end of what the guest wrote to stderr in this call (a Rust panic message lands
    /// there), escaped so it reads as part of one error line.
    fn stderr_tail(&self) -> String {
        let text = self.store.data().stderr.text();
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
        format!("; the plugin wrote to stderr: {}", escape_controls(&text[start..]))
    }

    /// Instantiation errors as a [`PluginError`]: a trap or limit in the component's start code,
    /// or exported functions whose types do not match the contract (checked as the exports are
    /// bound; their names were checked before, by [`link`]).
    pub(crate) fn instantiate<T>(
        &mut self,
        path: &Path,
        kind: PluginKind,
        f: impl AsyncFnOnce(&mut Store<State>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let mut mismatch = None;
        let r = self.call("instantiate", None, async |store| {
            let r = f(store).await;
            if let Err(e) = &r
                && e.downcast_ref::<Trap>().is_none()
                && format!("{e:#}").contains("type mismatch")
            {
                mismatch = Some(format!("{e:#}"));
            }
            r
        });
        r.map_err(|e| match mismatch {
            Some(m) => PluginError::Mismatch {
                plugin: self.name.clone(),
                path: path.to_path_buf(),
                message: contract_mismatch("exports", kind, &m),
            },
            None => PluginError::Instantiate {
                plugin: self.name.clone(),
                path: path.to_path_buf(),
                message: format!("{} ({})", e.message, e.kind),
            },
        })
    }
}

/// An error's chain as one line, without wasmtime's wasm backtrace (guest addresses and mangled
/// names say nothing to the person running lora; the plugin's author can run `lora plugin check`).
fn error_text(err: &wasmtime::Error) -> String {
    err.chain()
        .map(|c| c.to_string())
        .filter(|c| !c.starts_with("error while executing at wasm backtrace"))
        .collect::<Vec<_>>()
        .join(": ")
}

fn contract_mismatch(side: &str, kind: PluginKind, error: &str) -> String {
    format!(
        "its {side} do not match what lora expects of a {kind} at API {}: {}",
        SUPPORTED_API_VERSIONS.join(", "),
        escape_controls(error)
    )
}

/// Type-checks the component against `linker` before anything runs: its imports must match
/// what lora links for the kind, then `exports` (bindgen's `*Pre::new`) checks its exports
/// against the contract. Each mismatch says which side and what, not "trapped".
pub(crate) fn link<P>(
    prepared: &Prepared,
    path: &Path,
    kind: PluginKind,
    linker: &wasmtime::component::Linker<State>,
    exports: impl FnOnce(wasmtime::component::InstancePre<State>) -> wasmtime::Result<P>,
) -> Result<P, PluginError> {
    let mismatch = |side: &str, e: wasmtime::Error| PluginError::Mismatch {
        plugin: prepared.name.clone(),
        path: path.to_path_buf(),
        message: contract_mismatch(side, kind, &format!("{e:#}")),
    };
    let pre = linker
        .instantiate_pre(&prepared.loaded.component)
        .map_err(|e| mismatch("imports", e))?;
    exports(pre).map_err(|e| mismatch("exports", e))
}

/// A linker with WASI 0.2 (async, so calls can be abandoned at their deadline; the granted
/// directory guarded by [`crate::fsguard`]), and `wasi:http` for a reporter (whose requests the
/// [`HttpPolicy`] allows only to granted hosts; a component importing it without a grant is
/// refused before it gets here).
pub(crate) fn base_linker(kind: PluginKind) -> Result<wasmtime::component::Linker<State>, PluginError> {
    let engine_err = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
    let mut linker = wasmtime::component::Linker::new(cache::engine()?);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_err)?;
    crate::fsguard::add_to_linker(&mut linker).map_err(engine_err)?;
    if kind == PluginKind::Reporter {
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(engine_err)?;
    }
    #[cfg(feature = "wasi-nn")]
    if kind == PluginKind::Preprocessor {
        wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut State| {
            wasmtime_wasi_nn::wit::WasiNnView::new(&mut s.table, &mut s.nn)
        })
        .map_err(engine_err)?;
        crate::nn::refuse_load(&mut linker, |s: &State| s.name.as_str()).map_err(engine_err)?;
    }
    Ok(linker)
}
