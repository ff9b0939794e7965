//! MLflow: the run as an MLflow run, over the tracking server's REST API (`/api/2.0/mlflow/...`,
//! what `mlflow.MlflowClient` itself calls).
//!
//! Enabled by `MLFLOW_TRACKING_URI` (an `http(s)://` tracking server, from the pod or
//! `training_envs`; `DISABLE_MLFLOW_INTEGRATION=true` turns it off, as in transformers), with
//! `MLFLOW_EXPERIMENT_NAME` (created when missing) or `MLFLOW_EXPERIMENT_ID` (default: the
//! server's `Default` experiment), `MLFLOW_TRACKING_TOKEN` (bearer) or
//! `MLFLOW_TRACKING_USERNAME` + `MLFLOW_TRACKING_PASSWORD` (basic), `MLFLOW_RUN_ID` (log into
//! that existing run) and `MLFLOW_TAGS` (a JSON object of extra tags).
//!
//! What is logged: every resolved parameter (secrets hidden) as params; tags `lora.version`,
//! `lora.run_id`, `lora.base_model`, `lora.device`, `lora.host` and MLflow's
//! `mlflow.source.name` / `mlflow.source.type`; per logged step the `training_metrics.jsonl`
//! keys (`loss`, `learning_rate`, `grad_norm`, `tokens_per_second`, `epoch`, `tokens`,
//! `trained_tokens`), per evaluation `eval_loss`, `perplexity`, `eval_tokens`, at the end the
//! totals (`train_loss`, `train_runtime`, ...); once the outputs are written, the loss chart,
//! `training_metrics.jsonl`, the metrics file and the run manifest as artifacts (through the
//! server's artifact proxy, `mlflow-artifacts:` URIs, which `mlflow server` serves by default),
//! and the run ends `FINISHED` (`FAILED` when the lora run fails).
//!
//! Metrics go through a background thread that sends whatever has queued as one `log-batch`
//! (at most 1000 values), so a slow server never slows a step; a server failing mid-run is a
//! warning (once per outage), the values stay queued and are retried, and the run goes on. At the
//! end the queue is drained for up to [`DRAIN_SECS`]; what could not be delivered is named in a
//! warning. An unreachable or refusing server at start stops the run before training.
//!
//! Resume: the same MLflow run continues (its id is in `trackers.json`); values for steps it
//! already has are not logged again, parameters it already has are kept.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lora_api::{EvalMetrics, RunSummary, StepMetrics};
use serde_json::{Map, Value, json};

use super::{Env, Have, OutputFile, Start, Tracker, TrackerError};

const NAME: &str = "mlflow";
/// MLflow's limits: values per `log-batch`, params per request, param value length.
const MAX_METRICS: usize = 1000;
const MAX_PARAMS: usize = 100;
const MAX_PARAM_LEN: usize = 6000;
/// How long the end of a run waits for queued metrics to reach a failing server.
pub const DRAIN_SECS: u64 = 60;
/// Values kept queued while the server is down; older ones are dropped past this (and counted).
const MAX_QUEUED: usize = 1_000_000;

/// A credential: shown as `<hidden>` in debug output.
#[derive(Clone, PartialEq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    None,
    Bearer(Secret),
    Basic { user: String, password: Secret },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `MLFLOW_TRACKING_URI` without a trailing `/`.
    pub uri: String,
    pub experiment_name: Option<String>,
    pub experiment_id: Option<String>,
    pub run_id: Option<String>,
    pub auth: Auth,
    pub tags: Vec<(String, String)>,
    /// How long the end of a run waits for queued metrics (`LORA_MLFLOW_DRAIN_SECS`, default
    /// [`DRAIN_SECS`]).
    pub drain_secs: u64,
}

fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

impl Settings {
    pub fn resolve(env: Env) -> Result<Option<Settings>, TrackerError> {
        let Some(uri) = env("MLFLOW_TRACKING_URI") else { return Ok(None) };
        if env("DISABLE_MLFLOW_INTEGRATION").is_some_and(|v| truthy(&v)) {
            return Ok(None);
        }
        let setting = |name: &str, value: &str| format!("{name}={value}");
        let uri = uri.trim().trim_end_matches('/').to_string();
        if !(uri.starts_with("http://") || uri.starts_with("https://")) || uri.split("://").nth(1).is_none_or(str::is_empty) {
            return Err(TrackerError::setting(
                NAME,
                setting("MLFLOW_TRACKING_URI", &uri),
                "lora logs to an MLflow tracking server over http:// or https:// (`mlflow server`); a file or database store (file:, sqlite:, a path) or databricks needs the mlflow package: serve it with `mlflow server --backend-store-uri <store>` and set MLFLOW_TRACKING_URI to the server",
            ));
        }
        for unsupported in ["MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH"] {
            if let Some(v) = env(unsupported).filter(|v| unsupported != "MLFLOW_TRACKING_INSECURE_TLS" || truthy(v)) {
                return Err(TrackerError::setting(
                    NAME,
                    setting(unsupported, &v),
                    "custom TLS settings are not supported: lora verifies the server against the public web PKI roots; unset it",
                ));
            }
        }
        let auth = match (env("MLFLOW_TRACKING_TOKEN"), env("MLFLOW_TRACKING_USERNAME"), env("MLFLOW_TRACKING_PASSWORD")) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(TrackerError::setting(
                    NAME,
                    "MLFLOW_TRACKING_TOKEN",
                    "set either MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD, not both",
                ));
            }
            (Some(t), None, None) => Auth::Bearer(Secret(t)),
            (None, Some(user), Some(password)) => Auth::Basic { user, password: Secret(password) },
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(TrackerError::setting(
                    NAME,
                    "MLFLOW_TRACKING_USERNAME",
                    "basic authentication needs both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
                ));
            }
            (None, None, None) => Auth::None,
        };
        let tags = match env("MLFLOW_TAGS") {
            None => Vec::new(),
            Some(text) => match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => m.into_iter().map(|(k, v)| (k, super::param_text(&v))).collect(),
                _ => return Err(TrackerError::setting(NAME, setting("MLFLOW_TAGS", &text), "must be a JSON object of tags, e.g. {\"team\": \"nlp\"}")),
            },
        };
        let drain_secs = match env("LORA_MLFLOW_DRAIN_SECS") {
            None => DRAIN_SECS,
            Some(v) => v.trim().parse().map_err(|_| TrackerError::setting(NAME, setting("LORA_MLFLOW_DRAIN_SECS", &v), "must be a whole number of seconds"))?,
        };
        Ok(Some(Settings {
            drain_secs,
            uri,
            experiment_name: env("MLFLOW_EXPERIMENT_NAME"),
            experiment_id: env("MLFLOW_EXPERIMENT_ID"),
            run_id: env("MLFLOW_RUN_ID"),
            auth,
            tags,
        }))
    }

    pub fn describe(&self) -> Value {
        json!({
            "tracking_uri": self.uri,
            "experiment": self.experiment_name.clone().or_else(|| self.experiment_id.clone().map(|id| format!("id {id}"))).unwrap_or_else(|| "Default".into()),
            "run_id": self.run_id,
            "auth": match self.auth { Auth::None => "none", Auth::Bearer(_) => "bearer token (MLFLOW_TRACKING_TOKEN)", Auth::Basic { .. } => "basic (MLFLOW_TRACKING_USERNAME/PASSWORD)" },
        })
    }
}

/// A REST call's failure.
#[derive(Debug)]
enum ApiError {
    /// No answer (connection refused, timeout, TLS).
    Transport(String),
    /// An answer other than 200: status, MLflow's `error_code` (or the body).
    Status(u16, String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Transport(e) => write!(f, "{e}"),
            ApiError::Status(s, e) => write!(f, "HTTP {s}: {e}"),
        }
    }
}

/// The tracking server's REST API.
#[derive(Clone)]
struct Client {
    uri: String,
    authorization: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn new(s: &Settings, timeout: Duration) -> Client {
        use base64::Engine;
        let authorization = match &s.auth {
            Auth::None => None,
            Auth::Bearer(t) => Some(format!("Bearer {}", t.0)),
            Auth::Basic { user, password } => {
                Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.0))))
            }
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(timeout))
            .user_agent(concat!("lora/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client { uri: s.uri.clone(), authorization, agent }
    }

    fn answer(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value, ApiError> {
        let mut resp = resp.map_err(|e| ApiError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if status != 200 {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| Some(format!("{} ({})", v.get("error_code")?.as_str()?, v.get("message").and_then(Value::as_str).unwrap_or(""))))
                .unwrap_or_else(|| text.chars().take(300).collect());
            return Err(ApiError::Status(status, detail));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, ApiError> {
        let mut req = self.agent.get(format!("{}/api/2.0/mlflow/{path}", self.uri));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        Self::answer(req.call())
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        let mut req = self.agent.post(format!("{}/api/2.0/mlflow/{path}", self.uri)).header("Content-Type", "application/json");
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        Self::answer(req.send(body.to_string()))
    }

    /// `PUT` a file to the artifact proxy (`mlflow-artifacts:/<path>` → `/api/2.0/mlflow-artifacts/artifacts/<path>`).
    fn put_artifact(&self, base: &str, path: &str, bytes: &[u8]) -> Result<(), ApiError> {
        let mut req = self.agent.put(format!("{base}/api/2.0/mlflow-artifacts/artifacts/{path}"));
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        Self::answer(req.send(bytes)).map(|_| ())
    }

    /// Why a call at startup failed, as the user fixes it.
    fn startup_error(&self, what: &str, e: ApiError) -> TrackerError {
        let hint = match &e {
            ApiError::Transport(_) => "is the server running and MLFLOW_TRACKING_URI right?",
            ApiError::Status(401 | 403, _) => "the server refused the credentials: set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
            ApiError::Status(404, _) => "not found (is MLFLOW_TRACKING_URI an MLflow tracking server?)",
            ApiError::Status(..) => "the server refused the request",
        };
        TrackerError::Server { tracker: NAME, why: format!("{what} at {} (MLFLOW_TRACKING_URI): {e}; {hint}", self.uri) }
    }
}

fn now_ms() -> i64 {
    (super::now_unix() * 1000.0) as i64
}

fn metric(key: &str, value: f64, step: u64, timestamp: i64) -> Value {
    json!({"key": key, "value": value, "timestamp": timestamp, "step": step})
}

/// What the metrics thread is told.
enum Job {
    Metrics(Vec<Value>),
    /// Deliver everything queued within the duration, then answer how many values were left.
    Drain(Duration, Sender<usize>),
}

/// The metrics thread's state: what is queued and whether the server is failing.
struct Worker {
    client: Client,
    run_id: String,
    queue: VecDeque<Value>,
    /// Since when the server fails, and when to try again.
    failing: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Values dropped because the queue was full.
    dropped: usize,
}

impl Worker {
    fn enqueue(&mut self, values: Vec<Value>) {
        self.queue.extend(values);
        while self.queue.len() > MAX_QUEUED {
            self.queue.pop_front();
            self.dropped += 1;
        }
    }

    /// Sends up to [`MAX_METRICS`] queued values as one `log-batch`; false when it failed.
    fn send(&mut self) -> bool {
        let n = self.queue.len().min(MAX_METRICS);
        let batch: Vec<&Value> = self.queue.iter().take(n).collect();
        match self.client.post("runs/log-batch", &json!({"run_id": self.run_id, "metrics": batch})) {
            Ok(_) => {
                self.queue.drain(..n);
                if let Some(since) = self.failing.take() {
                    eprintln!(
                        "lora: mlflow: the tracking server answers again after {:.0}s; queued metrics are being delivered",
                        since.elapsed().as_secs_f64()
                    );
                }
                self.backoff = Duration::from_millis(250);
                self.retry_at = None;
                true
            }
            Err(e) => {
                if self.failing.is_none() {
                    eprintln!(
                        "lora: warning: mlflow: logging metrics to {} failed ({e}); training goes on, metrics stay queued and are retried",
                        self.client.uri
                    );
                    self.failing = Some(Instant::now());
                }
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
                false
            }
        }
    }

    /// Delivers everything queued within `within`; how many values are left (or were dropped).
    fn drain(&mut self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        while !self.queue.is_empty() && Instant::now() < deadline {
            if !self.send() {
                std::thread::sleep(self.backoff.min(deadline.saturating_duration_since(Instant::now())));
            }
        }
        self.queue.len() + std::mem::take(&mut self.dropped)
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Metrics(values) => self.enqueue(values),
            Job::Drain(within, reply) => {
                let left = self.drain(within);
                let _ = reply.send(left);
            }
        }
    }

    /// The thread's loop: whatever queued while a request was out goes in the next one; while
    /// the server fails, retries wait with backoff (up to 30 s).
    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            let wait = match (self.queue.is_empty(), self.retry_at) {
                (true, _) => Duration::from_secs(3600),
                (false, Some(at)) => at.saturating_duration_since(Instant::now()),
                (false, None) => Duration::ZERO,
            };
            match jobs.recv_timeout(wait) {
                Ok(job) => {
                    self.handle(job);
                    while let Ok(job) = jobs.try_recv() {
                        self.handle(job);
                    }
                    if self.retry_at.is_none() && !self.queue.is_empty() {
                        self.send();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if !self.queue.is_empty() {
                        self.send();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

/// The MLflow tracker of one run.
pub struct Mlflow {
    settings: Settings,
    client: Client,
    experiment_id: String,
    run_id: Option<String>,
    artifact_uri: Option<String>,
    /// The latest step the run already has, per metric key (when continuing a run).
    logged: HashMap<String, u64>,
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    closed: bool,
}

impl Mlflow {
    /// Checks that the server answers and resolves (or creates) the experiment.
    pub fn connect(s: &Settings) -> Result<Mlflow, TrackerError> {
        let client = Client::new(s, Duration::from_secs(30));
        let experiment_id = if let Some(run_id) = &s.run_id {
            let run = client.get("runs/get", &[("run_id", run_id)]).map_err(|e| client.startup_error(&format!("MLFLOW_RUN_ID={run_id}: looking the run up"), e))?;
            run["run"]["info"]["experiment_id"].as_str().unwrap_or("0").to_string()
        } else if let Some(id) = &s.experiment_id {
            client.get("experiments/get", &[("experiment_id", id)]).map_err(|e| client.startup_error(&format!("MLFLOW_EXPERIMENT_ID={id}: looking the experiment up"), e))?;
            id.clone()
        } else {
            let name = s.experiment_name.clone().unwrap_or_else(|| "Default".into());
            match client.get("experiments/get-by-name", &[("experiment_name", &name)]) {
                Ok(v) => v["experiment"]["experiment_id"].as_str().unwrap_or_default().to_string(),
                Err(ApiError::Status(404, _)) => match client.post("experiments/create", &json!({"name": name})) {
                    Ok(v) => {
                        eprintln!("lora: mlflow: created experiment {name:?} on {}", s.uri);
                        v["experiment_id"].as_str().unwrap_or_default().to_string()
                    }
                    // Created by someone else in between.
                    Err(ApiError::Status(400, e)) if e.contains("RESOURCE_ALREADY_EXISTS") => client
                        .get("experiments/get-by-name", &[("experiment_name", &name)])
                        .map_err(|e| client.startup_error("looking the experiment up", e))?["experiment"]["experiment_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    Err(e) => return Err(client.startup_error(&format!("creating experiment {name:?}"), e)),
                },
                Err(e) => return Err(client.startup_error(&format!("looking up experiment {name:?}"), e)),
            }
        };
        if experiment_id.is_empty() {
            return Err(TrackerError::Server { tracker: NAME, why: format!("{} answered without an experiment id: is it an MLflow tracking server?", s.uri) });
        }
        Ok(Mlflow {
            settings: s.clone(),
            client,
            experiment_id,
            run_id: None,
            artifact_uri: None,
            logged: HashMap::new(),
            jobs: None,
            worker: None,
            closed: false,
        })
    }

    fn start_error(&self, what: &str, e: ApiError) -> TrackerError {
        TrackerError::Server { tracker: NAME, why: format!("{what} on {}: {e}", self.client.uri) }
    }

    /// Values for steps the run does not have yet go to the metrics thread.
    fn queue(&mut self, step: u64, values: impl IntoIterator<Item = (&'static str, f64)>) {
        let ts = now_ms();
        let batch: Vec<Value> = values
            .into_iter()
            .filter(|(k, v)| v.is_finite() && self.logged.get(*k).is_none_or(|&last| step > last))
            .map(|(k, v)| metric(k, v, step, ts))
            .collect();
        if let (false, Some(tx)) = (batch.is_empty(), &self.jobs) {
            let _ = tx.send(Job::Metrics(batch));
        }
    }

    /// Waits up to `within` for queued metrics to be delivered; the number left undelivered.
    fn drain(&mut self, within: Duration) -> usize {
        let Some(tx) = &self.jobs else { return 0 };
        let (reply, answer) = mpsc::channel();
        if tx.send(Job::Drain(within, reply)).is_err() {
            return 0;
        }
        answer.recv_timeout(within + Duration::from_secs(35)).unwrap_or(usize::MAX)
    }

    fn end(&mut self, status: &str, drain: Duration) -> Vec<String> {
        let mut warnings = Vec::new();
        let left = self.drain(drain);
        if left > 0 {
            warnings.push(if left == usize::MAX {
                "the metrics thread did not answer; some metric values may not have been delivered".to_string()
            } else {
                format!("{left} metric value(s) could not be delivered to {} within {}s", self.client.uri, drain.as_secs())
            });
        }
        self.jobs = None;
        if let Some(w) = self.worker.take()
            && left == 0
        {
            let _ = w.join();
        }
        if let Some(run_id) = &self.run_id
            && let Err(e) = self.client.post("runs/update", &json!({"run_id": run_id, "status": status, "end_time": now_ms()}))
        {
            warnings.push(format!("marking the run {status}: {e}"));
        }
        self.closed = true;
        warnings
    }

    fn upload(&self, files: &[OutputFile]) -> Vec<String> {
        let Some(uri) = &self.artifact_uri else { return Vec::new() };
        // `mlflow-artifacts:/<path>` (this server) or `mlflow-artifacts://host:port/<path>`.
        let Some(rest) = uri.strip_prefix("mlflow-artifacts:") else {
            return vec![format!(
                "the run's artifact location is {uri}, which lora cannot write to: artifacts go through the server's artifact proxy (`mlflow server` serves mlflow-artifacts: by default; do not start it with --no-serve-artifacts); the loss chart and metrics were not uploaded"
            )];
        };
        let (base, path) = match rest.strip_prefix("//") {
            Some(hostpath) => {
                let (host, path) = hostpath.split_once('/').unwrap_or((hostpath, ""));
                let scheme = if self.client.uri.starts_with("https://") { "https" } else { "http" };
                (format!("{scheme}://{host}"), path.to_string())
            }
            None => (self.client.uri.clone(), rest.trim_start_matches('/').to_string()),
        };
        let mut warnings = Vec::new();
        for f in files {
            let bytes = match std::fs::read(&f.path) {
                Ok(b) => b,
                Err(_) if !f.path.exists() => continue,
                Err(e) => {
                    warnings.push(format!("reading {}: {e}", f.path.display()));
                    continue;
                }
            };
            if let Err(e) = self.client.put_artifact(&base, &format!("{path}/{}", f.name), &bytes) {
                warnings.push(format!("uploading artifact {}: {e}", f.name));
            }
        }
        warnings
    }
}

impl Tracker for Mlflow {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&mut self, s: Start) -> Result<Have, TrackerError> {
        let continuing = s.state.mlflow_run_id.clone().filter(|_| s.resumed).or_else(|| self.settings.run_id.clone());
        let mut existing_params: Map<String, Value> = Map::new();
        let run = match &continuing {
            Some(id) => {
                let run = self.client.get("runs/get", &[("run_id", id)]).map_err(|e| self.start_error(&format!("looking up run {id} to continue"), e))?;
                for m in run["run"]["data"]["metrics"].as_array().into_iter().flatten() {
                    if let (Some(k), Some(step)) = (m["key"].as_str(), m["step"].as_u64()) {
                        self.logged.insert(k.to_string(), step);
                    }
                }
                for p in run["run"]["data"]["params"].as_array().into_iter().flatten() {
                    if let (Some(k), Some(v)) = (p["key"].as_str(), p.get("value")) {
                        existing_params.insert(k.to_string(), v.clone());
                    }
                }
                self.client
                    .post("runs/update", &json!({"run_id": id, "status": "RUNNING"}))
                    .map_err(|e| self.start_error(&format!("reopening run {id}"), e))?;
                run
            }
            None => {
                let mut tags = vec![
                    ("mlflow.source.name", "lora".to_string()),
                    ("mlflow.source.type", "JOB".to_string()),
                    ("lora.version", env!("CARGO_PKG_VERSION").to_string()),
                    ("lora.run_id", s.info.run_id.clone()),
                    ("lora.base_model", s.model.to_string()),
                    ("lora.device", s.device.to_string()),
                    ("lora.host", super::hostname()),
                ]
                .into_iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect::<Vec<_>>();
                tags.extend(self.settings.tags.iter().map(|(k, v)| json!({"key": k, "value": v})));
                let body = json!({
                    "experiment_id": self.experiment_id,
                    "start_time": (s.state.started_unix * 1000.0) as i64,
                    "tags": tags,
                });
                self.client.post("runs/create", &body).map_err(|e| self.start_error("creating the run", e))?
            }
        };
        let run_id = run["run"]["info"]["run_id"].as_str().unwrap_or_default().to_string();
        if run_id.is_empty() {
            return Err(TrackerError::Server { tracker: NAME, why: format!("{} answered runs/create without a run id", self.client.uri) });
        }
        self.artifact_uri = run["run"]["info"]["artifact_uri"].as_str().map(String::from);

        // Parameters the run does not have yet (MLflow refuses changing a logged one).
        let mut params = Vec::new();
        let mut changed = Vec::new();
        for (k, v) in s.params {
            let mut text = super::param_text(v);
            if text.chars().count() > MAX_PARAM_LEN {
                text = text.chars().take(MAX_PARAM_LEN - 1).collect::<String>() + "…";
            }
            match existing_params.get(k) {
                Some(old) if old.as_str() == Some(text.as_str()) => {}
                Some(_) => changed.push(k.clone()),
                None => params.push(json!({"key": k, "value": text})),
            }
        }
        for chunk in params.chunks(MAX_PARAMS) {
            self.client
                .post("runs/log-batch", &json!({"run_id": run_id, "params": chunk}))
                .map_err(|e| self.start_error("logging the parameters", e))?;
        }
        if !changed.is_empty() {
            eprintln!("lora: mlflow: run {run_id} keeps its first values of {} (MLflow params cannot change)", changed.join(", "));
        }
        let (tx, rx) = mpsc::channel();
        let (client, id) = (self.client.clone(), run_id.clone());
        self.worker = Some(
            std::thread::Builder::new()
                .name("lora-mlflow".into())
                .spawn(move || {
                    let worker = Worker { client, run_id: id, queue: VecDeque::new(), failing: None, retry_at: None, backoff: Duration::from_millis(250), dropped: 0 };
                    worker.run(rx)
                })
                .map_err(|e| TrackerError::Server { tracker: NAME, why: format!("starting the metrics thread: {e}") })?,
        );
        self.jobs = Some(tx);
        eprintln!(
            "lora: mlflow: {} run {run_id} in experiment {} on {}",
            if continuing.is_some() { "continuing" } else { "logging to" },
            self.experiment_id,
            self.client.uri
        );
        s.state.mlflow_run_id = Some(run_id.clone());
        self.run_id = Some(run_id);
        // Values for steps the run has are filtered per key in `queue`.
        Ok(Have { step: self.logged.get("loss").copied().unwrap_or(0), eval: self.logged.get("eval_loss").copied().unwrap_or(0) })
    }

    fn step(&mut self, m: &StepMetrics) -> Result<(), TrackerError> {
        self.queue(m.step, super::step_values(m));
        Ok(())
    }

    fn eval(&mut self, m: &EvalMetrics) -> Result<(), TrackerError> {
        self.queue(m.step, super::eval_values(m));
        Ok(())
    }

    fn finish(&mut self, s: &RunSummary) -> Result<(), TrackerError> {
        self.queue(s.total_steps, super::summary_values(s));
        Ok(())
    }

    fn outputs(&mut self, files: &[OutputFile]) -> Vec<String> {
        if self.closed || self.run_id.is_none() {
            return Vec::new();
        }
        let mut warnings = self.upload(files);
        warnings.extend(self.end("FINISHED", Duration::from_secs(self.settings.drain_secs)));
        warnings
    }

    fn abort(&mut self) {
        if self.closed || self.run_id.is_none() {
            return;
        }
        for w in self.end("FAILED", Duration::from_secs(self.settings.drain_secs.min(10))) {
            eprintln!("lora: warning: mlflow: {w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn settings_come_from_mlflows_own_variables() {
        assert_eq!(Settings::resolve(&env(&[])).unwrap(), None);
        let s = Settings::resolve(&env(&[
            ("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000/"),
            ("MLFLOW_EXPERIMENT_NAME", "lora-exp"),
            ("MLFLOW_TRACKING_TOKEN", "s3cr3t-value"),
            ("MLFLOW_TAGS", r#"{"team": "nlp", "n": 3}"#),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.uri, "http://127.0.0.1:5000");
        assert_eq!(s.experiment_name.as_deref(), Some("lora-exp"));
        assert_eq!(s.tags, vec![("team".to_string(), "nlp".to_string()), ("n".to_string(), "3".to_string())]);
        assert!(!format!("{s:?}").contains("s3cr3t"), "the token is not in debug output");
        assert!(!s.describe().to_string().contains("s3cr3t"), "nor in the description");
        let off = Settings::resolve(&env(&[("MLFLOW_TRACKING_URI", "http://h"), ("DISABLE_MLFLOW_INTEGRATION", "TRUE")])).unwrap();
        assert_eq!(off, None);
    }

    #[test]
    fn unusable_settings_are_refused_by_name() {
        for (vars, needle) in [
            (vec![("MLFLOW_TRACKING_URI", "file:./mlruns")], "MLFLOW_TRACKING_URI=file:./mlruns"),
            (vec![("MLFLOW_TRACKING_URI", "databricks")], "mlflow server"),
            (vec![("MLFLOW_TRACKING_URI", "http://h"), ("MLFLOW_TRACKING_USERNAME", "u")], "MLFLOW_TRACKING_PASSWORD"),
            (vec![("MLFLOW_TRACKING_URI", "http://h"), ("MLFLOW_TRACKING_TOKEN", "t"), ("MLFLOW_TRACKING_PASSWORD", "p")], "not both"),
            (vec![("MLFLOW_TRACKING_URI", "http://h"), ("MLFLOW_TAGS", "[1]")], "MLFLOW_TAGS"),
            (vec![("MLFLOW_TRACKING_URI", "https://h"), ("MLFLOW_TRACKING_INSECURE_TLS", "true")], "MLFLOW_TRACKING_INSECURE_TLS"),
        ] {
            let e = Settings::resolve(&env(&vars)).unwrap_err().to_string();
            assert!(e.starts_with("mlflow: ") && e.contains(needle), "{vars:?}: {e}");
        }
    }

    /// A server that fails for a while (three 503s) gets every value once, in order, once it
    /// answers again; nothing is lost or sent twice.
    #[cfg(feature = "plugins")]
    #[test]
    fn metrics_queued_while_the_server_fails_are_delivered_once_in_order() {
        let server = lora_plugins::testing::HttpEndpoint::start(503).unwrap();
        server.answer_from(3, 200);
        let s = Settings::resolve(&env(&[("MLFLOW_TRACKING_URI", &server.origin())])).unwrap().unwrap();
        let worker = Worker {
            client: Client::new(&s, Duration::from_secs(5)),
            run_id: "r".into(),
            queue: VecDeque::new(),
            failing: None,
            retry_at: None,
            backoff: Duration::from_millis(50),
            dropped: 0,
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || worker.run(rx));
        for step in 1..=5u64 {
            tx.send(Job::Metrics(vec![metric("loss", step as f64, step, 0)])).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let (reply, answer) = mpsc::channel();
        tx.send(Job::Drain(Duration::from_secs(20), reply)).unwrap();
        assert_eq!(answer.recv().unwrap(), 0, "everything delivered");
        drop(tx);
        thread.join().unwrap();
        let requests = server.requests();
        assert!(requests.len() >= 4 && requests.iter().all(|r| r.path == "/api/2.0/mlflow/runs/log-batch"), "{requests:?}");
        let delivered: Vec<u64> = requests[3..]
            .iter()
            .flat_map(|r| r.json()["metrics"].as_array().cloned().unwrap_or_default())
            .map(|m| m["step"].as_u64().unwrap())
            .collect();
        assert_eq!(delivered, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn an_unreachable_server_is_a_clear_error_at_connect() {
        // A port nothing listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let uri = format!("http://127.0.0.1:{port}");
        let s = Settings::resolve(&env(&[("MLFLOW_TRACKING_URI", &uri)])).unwrap().unwrap();
        let e = Mlflow::connect(&s).err().expect("no server").to_string();
        assert!(e.starts_with("mlflow: ") && e.contains(&uri) && e.contains("MLFLOW_TRACKING_URI") && e.contains("is the server running"), "{e}");
    }
}
