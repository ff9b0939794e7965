//! Model resolution: `training_base_model` as a local folder, a Hugging Face hub id downloaded
//! into the standard cache, or an `oci://` model image (pulled and unpacked by [`crate::oci`]).
//!
//! The cache is the one `huggingface_hub` writes and reads (`file_download.py`), so Python tools
//! and `lora` share downloads: `$HF_HUB_CACHE` or `$HF_HOME/hub` (default
//! `~/.cache/huggingface/hub`), `models--<org>--<name>/{blobs/<etag>, refs/<revision>,
//! snapshots/<commit>/<file> -> ../../blobs/<etag>}`. The endpoint is `$HF_ENDPOINT`
//! (default `https://huggingface.co`), the token `$HF_TOKEN` or `$HF_HOME/token`, and
//! `HF_HUB_OFFLINE=1` resolves from the cache only. URLs are the hub's own:
//! `/api/models/<id>/revision/<rev>` (commit + file list) and `/<id>/resolve/<commit>/<file>`.

use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Where the hub client talks to and caches into; read from the environment by [`HubOptions::from_env`].
#[derive(Debug, Clone, PartialEq)]
pub struct HubOptions {
    pub endpoint: String,
    pub token: Option<String>,
    /// The hub cache root (`.../huggingface/hub`).
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub revision: String,
    /// Draw a progress line on stderr (a redrawn line on a terminal, a line per 10% otherwise).
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
    #[error(
        "training_base_model `{0}` is neither an existing folder nor a Hugging Face model id \
         (`name` or `org/name`, letters, digits, `-`, `_`, `.`)"
    )]
    NotAModel(String),
    #[error("training_base_model folder {0} has no config.json: is it a Hugging Face model folder?")]
    NoConfig(PathBuf),
    #[error(
        "training_base_model `{id}`: HF_HUB_OFFLINE is set and the model is not in the cache at {cache}. \
         Run once with network (unset HF_HUB_OFFLINE), or pass a local model folder"
    )]
    OfflineNotCached { id: String, cache: PathBuf },
    #[error(
        "training_base_model `{id}`: cannot reach the Hugging Face hub at {endpoint} ({why}) and the model \
         is not cached in {cache}. Check the network or HF_ENDPOINT, or pass a local model folder"
    )]
    Unreachable { id: String, endpoint: String, why: String, cache: PathBuf },
    #[error(
        "training_base_model `{id}`: the hub answered {status} for {url}: {hint}"
    )]
    Http { id: String, url: String, status: u16, hint: String },
    #[error("training_base_model `{id}`: the hub's answer for {url} is not what a Hugging Face hub sends: {why}")]
    Protocol { id: String, url: String, why: String },
    #[error(
        "training_base_model `{id}` has no safetensors weights on the hub (files: {files}); \
         lora loads safetensors only"
    )]
    NoSafetensors { id: String, files: String },
    #[error("downloading {file} of `{id}`: {why}")]
    Download { id: String, file: String, why: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HubError + 'a {
    move |source| HubError::Io { what, path: path.to_path_buf(), source }
}

/// A model folder ready to load.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    /// The folder holding config.json, the weights and the tokenizer files.
    pub dir: PathBuf,
    /// The hub id for `base_model_name_or_path` (or the folder as given).
    pub name: String,
    /// The hub commit the snapshot is at, or for an `oci://` image the manifest digest
    /// (`sha256:...`) its reference resolved to (None for a local folder).
    pub commit: Option<String>,
}

impl HubOptions {
    /// Reads `HF_ENDPOINT`, `HF_TOKEN` (or `HF_TOKEN_PATH` / `$HF_HOME/token`), `HF_HUB_CACHE` /
    /// `HF_HOME` / `XDG_CACHE_HOME`, `HF_HUB_OFFLINE`, as `huggingface_hub` does.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let hf_home = hf_home();
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
            fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let truthy = |k: &str| var(k).is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"));
        HubOptions {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string(),
            token,
            cache_dir,
            offline: truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE"),
            revision: "main".into(),
            progress: true,
        }
    }
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub(crate) fn hf_home() -> PathBuf {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let home_cache = var("HOME").map(|h| PathBuf::from(h).join(".cache")).unwrap_or_else(|| PathBuf::from(".cache"));
    var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or(home_cache).join("huggingface"))
}

/// Is `spec` shaped like a hub repo id (`name` or `org/name`)?
pub fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (parts.len() == 1 || parts.len() == 2) && parts.iter().all(|p| ok_part(p))
}

/// Resolves `training_base_model` to a folder: an existing folder as it is; a hub id from the
/// cache or downloaded into it; an `oci://` image from the OCI cache or pulled into it.
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<ResolvedModel, HubError> {
    if spec.starts_with("oci://") {
        return Ok(crate::oci::resolve(spec, &crate::oci::OciOptions::from_env(opts))?);
    }
    let local = Path::new(spec);
    if local.is_dir() {
        if !local.join("config.json").is_file() {
            return Err(HubError::NoConfig(local.to_path_buf()));
        }
        return Ok(ResolvedModel { dir: local.to_path_buf(), name: spec.to_string(), commit: None });
    }
    if !is_hub_id(spec) {
        return Err(HubError::NotAModel(spec.to_string()));
    }
    Hub { id: spec, opts, repo_dir: opts.cache_dir.join(format!("models--{}", spec.replace('/', "--"))) }.resolve()
}

/// What `--dry-run` reads of `training_base_model`: a folder as it is; a hub id from the cache,
/// or (not cached, online) its config, tokenizer and template files only, fetched into the cache
/// (the weights are not: the run downloads them, reusing these); an `oci://` image from the OCI
/// cache only (`None` when it is not there: the run pulls it). A hub that cannot be reached, or
/// an offline cache without the model, is the run's own error.
/// Returns the folder and whether it holds the weights.
pub fn resolve_model_for_plan(spec: &str, opts: &HubOptions) -> Result<Option<(ResolvedModel, bool)>, HubError> {
    if spec.starts_with("oci://") {
        let offline = HubOptions { offline: true, ..opts.clone() };
        return Ok(crate::oci::resolve(spec, &crate::oci::OciOptions::from_env(&offline)).ok().map(|m| (m, true)));
    }
    let local = Path::new(spec);
    if local.is_dir() || !is_hub_id(spec) {
        return resolve_model(spec, opts).map(|m| Some((m, true)));
    }
    let hub = Hub { id: spec, opts, repo_dir: opts.cache_dir.join(format!("models--{}", spec.replace('/', "--"))) };
    if let Some((dir, commit)) = hub.cached_snapshot() {
        return Ok(Some((hub.done(dir, commit), true)));
    }
    if opts.offline {
        return Err(HubError::OfflineNotCached { id: spec.into(), cache: hub.repo_dir.clone() });
    }
    hub.fetch_files(|f| wanted(f) && !f.ends_with(".safetensors"), false).map(|m| Some((m, false)))
}

struct Hub<'a> {
    id: &'a str,
    opts: &'a HubOptions,
    repo_dir: PathBuf,
}

/// Files a training run needs from a model repo: config, safetensors weights (+ index),
/// tokenizer and generation files, chat templates. Other weights formats and subfolders are skipped.
fn wanted(file: &str) -> bool {
    !file.contains('/')
        && (file.ends_with(".json")
            || file.ends_with(".safetensors")
            || file.ends_with(".jinja")
            || file == "tokenizer.model"
            || file == "merges.txt"
            || file == "vocab.txt")
}

impl Hub<'_> {
    fn cached_snapshot(&self) -> Option<(PathBuf, String)> {
        let commit = fs::read_to_string(self.repo_dir.join("refs").join(&self.opts.revision)).ok()?;
        let commit = commit.trim().to_string();
        let dir = self.repo_dir.join("snapshots").join(&commit);
        dir.join("config.json").is_file().then_some((dir, commit))
    }

    fn done(&self, dir: PathBuf, commit: String) -> ResolvedModel {
        ResolvedModel { dir, name: self.id.to_string(), commit: Some(commit) }
    }

    fn agent(&self, redirects: u32) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(redirects)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("lora/", env!("CARGO_PKG_VERSION"), "; hf_hub-compatible"))
            .build()
            .into()
    }

    fn get(&self, agent: &ureq::Agent, url: &str, head: bool) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut req = if head { agent.head(url) } else { agent.get(url) };
        if let Some(token) = &self.opts.token {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        req.call()
    }

    fn status_error(&self, url: &str, status: u16) -> HubError {
        let hint = match status {
            401 | 403 => "the model is gated or private: accept its licence on the hub and set HF_TOKEN to a token that can read it",
            404 => "no such model or file (check the id; a private model needs HF_TOKEN)",
            429 => "rate limited: wait and retry, or set HF_TOKEN",
            _ => "unexpected answer",
        };
        HubError::Http { id: self.id.to_string(), url: url.to_string(), status, hint: hint.to_string() }
    }

    fn resolve(&self) -> Result<ResolvedModel, HubError> {
        if self.opts.offline {
            return match self.cached_snapshot() {
                Some((dir, commit)) => Ok(self.done(dir, commit)),
                None => Err(HubError::OfflineNotCached { id: self.id.into(), cache: self.repo_dir.clone() }),
            };
        }
        self.fetch_files(wanted, true)
    }

    /// Asks the hub for the revision's files and fetches those `take` wants into the snapshot;
    /// `complete`: also records the revision's ref (only once every file a run needs is there,
    /// so a partial snapshot is never taken for a cached model).
    fn fetch_files(&self, take: impl Fn(&str) -> bool, complete: bool) -> Result<ResolvedModel, HubError> {
        let url = format!("{}/api/models/{}/revision/{}", self.opts.endpoint, self.id, self.opts.revision);
        let agent = self.agent(10);
        let info: serde_json::Value = match self.get(&agent, &url, false) {
            Err(e) => {
                // As huggingface_hub does: without network, fall back to the cached snapshot.
                if let Some((dir, commit)) = self.cached_snapshot() {
                    eprintln!("lora: hub unreachable ({e}); using the cached snapshot {}", dir.display());
                    return Ok(self.done(dir, commit));
                }
                return Err(HubError::Unreachable {
                    id: self.id.into(),
                    endpoint: self.opts.endpoint.clone(),
                    why: e.to_string(),
                    cache: self.repo_dir.clone(),
                });
            }
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                if status != 200 {
                    return Err(self.status_error(&url, status));
                }
                let text = resp.body_mut().read_to_string().map_err(|e| HubError::Protocol {
                    id: self.id.into(),
                    url: url.clone(),
                    why: e.to_string(),
                })?;
                serde_json::from_str(&text).map_err(|e| HubError::Protocol {
                    id: self.id.into(),
                    url: url.clone(),
                    why: format!("not JSON: {e}"),
                })?
            }
        };
        let protocol = |why: &str| HubError::Protocol { id: self.id.into(), url: url.clone(), why: why.into() };
        let commit = info["sha"].as_str().ok_or_else(|| protocol("no `sha` field"))?.to_string();
        if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(protocol("`sha` is not a commit hash"));
        }
        let files: Vec<String> = info["siblings"]
            .as_array()
            .ok_or_else(|| protocol("no `siblings` list"))?
            .iter()
            .filter_map(|s| s["rfilename"].as_str().map(String::from))
            .collect();
        if !files.iter().any(|f| f.ends_with(".safetensors") && !f.contains('/')) {
            return Err(HubError::NoSafetensors { id: self.id.into(), files: files.join(", ") });
        }
        let snapshot = self.repo_dir.join("snapshots").join(&commit);
        for file in files.iter().filter(|f| take(f)) {
            let target = snapshot.join(file);
            if target.is_file() {
                continue; // cache reuse
            }
            self.fetch(&commit, file, &target)?;
        }
        if !complete {
            return Ok(self.done(snapshot, commit));
        }
        let refs = self.repo_dir.join("refs");
        fs::create_dir_all(&refs).map_err(io_err("creating", &refs))?;
        write_atomic(&refs.join(&self.opts.revision), commit.as_bytes())?;
        Ok(self.done(snapshot, commit))
    }

    /// Downloads one file into `blobs/<etag>` and links `snapshots/<commit>/<file>` to it.
    fn fetch(&self, commit: &str, file: &str, target: &Path) -> Result<(), HubError> {
        let url = format!("{}/{}/resolve/{}/{}", self.opts.endpoint, self.id, commit, file);
        let dl = |why: String| HubError::Download { id: self.id.into(), file: file.into(), why };
        // Metadata first, without following redirects: an LFS file answers 302 with X-Linked-Etag.
        let head = self.get(&self.agent(0), &url, true).map_err(|e| dl(e.to_string()))?;
        let status = head.status().as_u16();
        if !(200..400).contains(&status) {
            return Err(self.status_error(&url, status));
        }
        let header = |k: &str| head.headers().get(k).and_then(|v| v.to_str().ok()).map(String::from);
        let etag = header("X-Linked-Etag")
            .or_else(|| header("ETag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']))
            .ok_or_else(|| dl(format!("{url} sent no ETag: is HF_ENDPOINT a Hugging Face hub?")))?;
        let expected_size = header("X-Linked-Size").or_else(|| header("Content-Length")).and_then(|s| s.parse::<u64>().ok());
        let blobs = self.repo_dir.join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
        let blob = blobs.join(&etag);
        if !blob.is_file() {
            let mut resp = self.get(&self.agent(10), &url, false).map_err(|e| dl(e.to_string()))?;
            if resp.status().as_u16() != 200 {
                return Err(self.status_error(&url, resp.status().as_u16()));
            }
            let total = resp.headers().get("Content-Length").and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok()).or(expected_size);
            let partial = blobs.join(format!("{etag}.incomplete"));
            let mut out = fs::File::create(&partial).map_err(io_err("creating", &partial))?;
            let mut reader = resp.body_mut().as_reader();
            let mut hasher = Sha256::new();
            let mut progress = Progress::new(file, total, self.opts.progress);
            let mut buf = vec![0u8; 1 << 20];
            let mut written = 0u64;
            loop {
                let n = reader.read(&mut buf).map_err(|e| dl(format!("reading {url}: {e}")))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n]).map_err(io_err("writing", &partial))?;
                hasher.update(&buf[..n]);
                written += n as u64;
                progress.update(written);
            }
            progress.finish(written);
            out.sync_all().map_err(io_err("syncing", &partial))?;
            drop(out);
            if let Some(size) = expected_size.filter(|_| header("X-Linked-Size").is_some())
                && size != written
            {
                let _ = fs::remove_file(&partial);
                return Err(dl(format!("got {written} bytes, the hub announced {size}")));
            }
            // An LFS etag is the file's sha256: check it.
            let digest = hex(&hasher.finalize());
            if etag.len() == 64 && etag.chars().all(|c| c.is_ascii_hexdigit()) && etag != digest {
                let _ = fs::remove_file(&partial);
                return Err(dl(format!("sha256 {digest} does not match the hub's {etag}: download corrupted")));
            }
            fs::rename(&partial, &blob).map_err(io_err("renaming into", &blob))?;
        }
        let parent = target.parent().expect("snapshot file has a parent");
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        let depth = file.matches('/').count();
        let rel = PathBuf::from(format!("{}../../blobs/{etag}", "../".repeat(depth)));
        let _ = fs::remove_file(target);
        link_or_copy(&rel, &blob, target)?;
        Ok(())
    }
}

#[cfg(unix)]
fn link_or_copy(rel: &Path, blob: &Path, target: &Path) -> Result<(), HubError> {
    std::os::unix::fs::symlink(rel, target)
        .or_else(|_| fs::copy(blob, target).map(|_| ()))
        .map_err(io_err("linking", target))
}

#[cfg(not(unix))]
fn link_or_copy(_rel: &Path, blob: &Path, target: &Path) -> Result<(), HubError> {
    fs::copy(blob, target).map(|_| ()).map_err(io_err("copying", target))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    crate::fs::write_atomic(path, bytes).map_err(io_err("writing", path))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A download progress line on stderr.
pub(crate) struct Progress {
    file: String,
    total: Option<u64>,
    enabled: bool,
    tty: bool,
    start: Instant,
    last_draw: Instant,
    last_decile: u64,
}

impl Progress {
    pub(crate) fn new(file: &str, total: Option<u64>, enabled: bool) -> Self {
        let now = Instant::now();
        Progress {
            file: file.into(),
            total,
            enabled,
            tty: std::io::stderr().is_terminal(),
            start: now,
            last_draw: now,
            last_decile: 0,
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        match self.total {
            Some(t) if t > 0 => format!(
                "downloading {} {} / {} ({:.0}%, {}/s)",
                self.file,
                human(done),
                human(t),
                100.0 * done as f64 / t as f64,
                human(rate as u64)
            ),
            _ => format!("downloading {} {} ({}/s)", self.file, human(done), human(rate as u64)),
        }
    }

    pub(crate) fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        if self.tty {
            if self.last_draw.elapsed() >= Duration::from_millis(200) {
                self.last_draw = Instant::now();
                eprint!("\r\x1b[2K{}", self.line(done));
            }
        } else if let Some(t) = self.total.filter(|t| *t > 0) {
            let decile = done * 10 / t;
            if decile > self.last_decile {
                self.last_decile = decile;
                eprintln!("{}", self.line(done));
            }
        }
    }

    pub(crate) fn finish(&self, done: u64) {
        if self.enabled && (self.tty || self.total.is_none()) {
            eprintln!("{}{}", if self.tty { "\r\x1b[2K" } else { "" }, self.line(done));
        }
    }
}

/// Bytes in binary units (`1.5 GiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        for id in ["Qwen/Qwen2.5-1.5B-Instruct", "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "a_b/c.d"] {
            assert!(is_hub_id(id), "{id}");
        }
        for not in ["", "/abs/path", "./rel", "a/b/c", "org/", "../x", "a b", "org/na..me", "C:\\x"] {
            assert!(!is_hub_id(not), "{not}");
        }
    }

    #[test]
    fn oci_references_go_to_the_oci_client() {
        let opts = HubOptions { offline: true, ..HubOptions::from_env() };
        let err = resolve_model("oci://quay.io/Org/model:1", &opts).unwrap_err().to_string();
        assert!(err.contains("not an OCI reference") && err.contains("`Org`"), "{err}");
    }

    #[test]
    fn offline_and_not_cached_says_so() {
        let dir = std::env::temp_dir().join(format!("lora-hub-offline-{}", std::process::id()));
        let opts = HubOptions {
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            cache_dir: dir.clone(),
            offline: true,
            revision: "main".into(),
            progress: false,
        };
        let err = resolve_model("org/never-downloaded", &opts).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE") && err.contains("org/never-downloaded"), "{err}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}

#[cfg(test)]
#[path = "hub_test.rs"]
mod fake_hub_tests;
