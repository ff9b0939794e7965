//! A small Kubernetes API client for the TrainJob launcher, over the HTTPS client lora already
//! has (ureq with rustls): create, read and delete a TrainJob, list its pods, read their logs,
//! and wait for it to end while printing node 0's log. In a pod it uses the service account
//! (`KUBERNETES_SERVICE_HOST`/`_PORT`, its token, CA and namespace); `LORA_KUBE_API` names
//! another API server address (an `http://127.0.0.1:…` test server, `kubectl proxy`).
//! `lora kfp` calls it through [`crate::launcher`] when `training_resource_num_workers` > 1.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::trainjob::{self, Phase};

/// Where a pod's service account files are.
pub const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Overrides the API server address.
pub const API_ENV: &str = "LORA_KUBE_API";

pub struct Kube {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    pub namespace: String,
}

/// The reason a Kubernetes `Status` body gives, else the body itself (shortened).
fn status_message(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) if v["message"].is_string() => v["message"].as_str().unwrap_or_default().to_owned(),
        _ => body.chars().take(500).collect(),
    }
}

impl Kube {
    /// The API server of this pod's cluster (or `LORA_KUBE_API`), with the service account in
    /// `sa_dir`; `namespace` overrides the service account's namespace.
    pub fn from_env(var: impl Fn(&str) -> Option<String>, sa_dir: &Path, namespace: Option<String>) -> Result<Kube> {
        let read = |f: &str| std::fs::read_to_string(sa_dir.join(f)).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let base = match var(API_ENV) {
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => url.trim_end_matches('/').to_owned(),
            Some(url) => bail!("{API_ENV}={url:?}: must be an http:// or https:// URL of a Kubernetes API server"),
            None => {
                let host = var("KUBERNETES_SERVICE_HOST").context(
                    "the TrainJob launcher needs a Kubernetes API server: KUBERNETES_SERVICE_HOST is not set (is this a pod?), and LORA_KUBE_API is not set either",
                )?;
                let port = var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
                let host = if host.contains(':') { format!("[{host}]") } else { host };
                format!("https://{host}:{port}")
            }
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if base.starts_with("https://") {
            let ca_path = sa_dir.join("ca.crt");
            if let Ok(pem) = std::fs::read(&ca_path) {
                let cert = ureq::tls::Certificate::from_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", ca_path.display()))?
                    .to_owned();
                tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]));
            }
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("lora/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .into();
        let namespace = namespace.or_else(|| read("namespace")).context(
            "the TrainJob's namespace: the service account's namespace file is missing and none was given",
        )?;
        Ok(Kube { agent, base, token: read("token"), namespace })
    }

    fn trainjobs(&self) -> String {
        format!("/apis/trainer.kubeflow.org/v1alpha1/namespaces/{}/trainjobs", self.namespace)
    }

    /// One request; the status and body. Transport failures name the server.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let sent = match (method, body) {
            ("GET", _) => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            ("DELETE", _) => {
                let mut r = self.agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (_, body) => {
                let mut r = self.agent.post(&url).header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(body.map(Value::to_string).unwrap_or_default())
            }
        };
        let mut resp = sent.with_context(|| format!("{method} {url}: the Kubernetes API server could not be reached"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().with_context(|| format!("{method} {url}: reading the answer"))?;
        Ok((status, text))
    }

    fn refused(&self, what: &str, status: u16, body: &str) -> anyhow::Error {
        let why = status_message(body);
        match status {
            401 => anyhow::anyhow!("{what}: the API server refused the credentials (401): {why}"),
            403 => anyhow::anyhow!("{what}: the service account may not do this in namespace {} (403; it needs a Role on trainjobs.trainer.kubeflow.org and pods/log): {why}", self.namespace),
            404 => anyhow::anyhow!("{what}: not found (404; is Kubeflow Trainer installed, with its TrainJob CRD?): {why}"),
            409 => anyhow::anyhow!("{what}: it already exists (409): {why}"),
            422 => anyhow::anyhow!("{what}: the API server found the TrainJob invalid (422): {why}"),
            s => anyhow::anyhow!("{what}: the API server answered {s}: {why}"),
        }
    }

    /// Creates the TrainJob (true), or finds it already there for the same KFP pod (false): a
    /// launcher container restarted in its pod waits for the TrainJob it created before. One
    /// that exists for anything else is refused (409) as by [`Kube::create`].
    pub fn create_or_adopt(&self, manifest: &Value) -> Result<bool> {
        let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("creating TrainJob {name} in namespace {}", self.namespace);
        let (status, body) = self.call("POST", &self.trainjobs(), Some(manifest))?;
        if (200..300).contains(&status) {
            return Ok(true);
        }
        let ours = &manifest["metadata"]["annotations"][crate::launcher::KFP_POD_ANNOTATION];
        if status == 409 && ours.is_string() {
            let there = self.get(name).with_context(|| format!("{what}: it already exists"))?;
            if &there["metadata"]["annotations"][crate::launcher::KFP_POD_ANNOTATION] == ours {
                return Ok(false);
            }
        }
        Err(self.refused(&what, status, &body))
    }

    pub fn get(&self, name: &str) -> Result<Value> {
        let what = format!("reading TrainJob {name} in namespace {}", self.namespace);
        let (status, body) = self.call("GET", &format!("{}/{name}", self.trainjobs()), None)?;
        if status != 200 {
            return Err(self.refused(&what, status, &body));
        }
        serde_json::from_str(&body).with_context(|| format!("{what}: the answer is not JSON"))
    }

    /// Deletes the TrainJob (its JobSet and pods go with it); one already gone is fine.
    pub fn delete(&self, name: &str) -> Result<()> {
        let what = format!("deleting TrainJob {name} in namespace {}", self.namespace);
        let (status, body) = self.call("DELETE", &format!("{}/{name}?propagationPolicy=Background", self.trainjobs()), None)?;
        match status {
            200..=299 | 404 => Ok(()),
            s => Err(self.refused(&what, s, &body)),
        }
    }

    /// The pods of TrainJob `name` (a PodList).
    pub fn pods(&self, name: &str) -> Result<Value> {
        let what = format!("listing the pods of TrainJob {name}");
        let path = format!("/api/v1/namespaces/{}/pods?labelSelector={}", self.namespace, trainjob::pods_selector(name).replace('/', "%2F").replace('=', "%3D"));
        let (status, body) = self.call("GET", &path, None)?;
        if status != 200 {
            return Err(self.refused(&what, status, &body));
        }
        serde_json::from_str(&body).with_context(|| format!("{what}: the answer is not JSON"))
    }

    /// The trainer container's log of `pod`: all of it, or its last `tail` lines.
    pub fn log(&self, pod: &str, tail: Option<u32>) -> Result<String> {
        let mut path = format!("/api/v1/namespaces/{}/pods/{pod}/log?container={}", self.namespace, trainjob::NODE);
        if let Some(n) = tail {
            path.push_str(&format!("&tailLines={n}"));
        }
        let (status, body) = self.call("GET", &path, None)?;
        if status != 200 {
            return Err(self.refused(&format!("reading the log of pod {pod}"), status, &body));
        }
        Ok(body)
    }

    /// Waits for TrainJob `name` to end, polling every `poll`, copying node 0's log to `out` as
    /// it grows. Complete: Ok. Failed: an error with the Trainer's reason and, for every failed
    /// pod, its rank, how it ended and its last lines. `cancel` set (SIGTERM) or `deadline`
    /// passed: the TrainJob is deleted and the error says so.
    pub fn wait(&self, name: &str, poll: Duration, deadline: Duration, cancel: &AtomicBool, out: &mut dyn Write) -> Result<()> {
        let t0 = Instant::now();
        let mut printed = 0usize;
        loop {
            let job = self.get(name)?;
            let phase = trainjob::phase(&job);
            // The log so far (again each time: the API has no offset; only the new part is printed).
            if let Ok(pods) = self.pods(name)
                && let Some(pod) = trainjob::node0_pod(&pods)
                && let Ok(log) = self.log(&pod, None)
            {
                // Shorter than what was printed (or cut inside a character): a new pod of
                // node 0, whose log is printed from its start.
                let new = log.get(printed..).unwrap_or(&log);
                let _ = out.write_all(new.as_bytes());
                printed = log.len();
            }
            match phase {
                Phase::Complete => return Ok(()),
                Phase::Failed { reason, message } => {
                    let mut text = format!("TrainJob {name} failed ({reason}): {message}");
                    for (pod, rank, how) in self.pods(name).map(|p| trainjob::failed_pods(&p)).unwrap_or_default() {
                        text.push_str(&format!("\nnode rank {rank} (pod {pod}): {how}"));
                        if let Ok(tail) = self.log(&pod, Some(20)) {
                            text.push_str(", its last lines:\n");
                            text.push_str(tail.trim_end());
                        }
                    }
                    bail!(text);
                }
                Phase::Active | Phase::Suspended => {}
            }
            let stop = if cancel.load(Ordering::SeqCst) {
                Some("cancelled".to_owned())
            } else if t0.elapsed() >= deadline {
                Some(format!("no end within {} s", deadline.as_secs()))
            } else {
                None
            };
            if let Some(why) = stop {
                self.delete(name).with_context(|| format!("{why}: TrainJob {name} is left running"))?;
                bail!("{why}: deleted TrainJob {name} in namespace {}", self.namespace);
            }
            // In slices, so that a SIGTERM is acted on within 50 ms whatever the poll interval.
            let next = Instant::now() + poll;
            while !cancel.load(Ordering::SeqCst) && Instant::now() < next {
                std::thread::sleep(next.saturating_duration_since(Instant::now()).min(Duration::from_millis(50)));
            }
        }
    }
}

#[cfg(test)]
#[path = "kube_test.rs"]
mod tests;
