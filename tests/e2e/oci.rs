//! `oci://` models against a real registry: Debian's `docker-registry` started here on 127.0.0.1
//! (htpasswd Basic auth, or Bearer tokens from `oci_token_server.py`), modelcars built by
//! `packaging/modelcar.sh` (umoci, the image build's tooling) and pushed by `skopeo`; OCI
//! artifacts and image indexes pushed through the registry API.
//!
//! Ignored in a plain `cargo test` (they need those Debian packages); `tests/ci.d/60-oci.sh`
//! installs them and runs `cargo test -p lora --test e2e oci_ -- --ignored`. Each test starts and
//! stops its own registry (and token server).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use lora_engine::DType;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::*;

const USER: &str = "lora";
const PASSWORD: &str = "s3cret-pw";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// A process killed when the test ends, however it ends.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

enum Auth {
    Basic,
    Token,
}

/// `docker-registry serve` on 127.0.0.1 with its storage under `dir`.
struct Registry {
    addr: String,
    storage: PathBuf,
    _services: Vec<Service>,
}

impl Registry {
    fn start(dir: &Path, auth: Auth) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut services = Vec::new();
        let auth_yaml = match auth {
            Auth::Basic => {
                let out = run(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]));
                std::fs::write(dir.join("htpasswd"), out.stdout).unwrap();
                format!("  htpasswd:\n    realm: lora-test\n    path: {}\n", dir.join("htpasswd").display())
            }
            Auth::Token => {
                let tport = free_port();
                let script = repo_root().join("tests/e2e/oci_token_server.py");
                let mut child = Command::new("python3")
                    .arg(script)
                    .arg(dir)
                    .args([&tport.to_string(), USER, PASSWORD, "lora-test-issuer", "lora-test-registry"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut line = String::new();
                BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
                assert_eq!(line.trim(), "ready", "token server did not start");
                services.push(Service(child));
                format!(
                    "  token:\n    realm: http://127.0.0.1:{tport}/token\n    service: lora-test-registry\n    issuer: lora-test-issuer\n    rootcertbundle: {}\n",
                    dir.join("cert.pem").display()
                )
            }
        };
        let storage = dir.join("data");
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n{auth_yaml}",
            storage.display()
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry").arg("serve").arg(dir.join("config.yml")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        services.push(Service(child));
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Registry { addr, storage, _services: services }
    }

    /// skopeo-pushes `layout:tag` as `repo:tag` (`format`: None keeps OCI, `v2s2` writes Docker's).
    fn push(&self, layout: &Path, tag: &str, repo: &str, format: Option<&str>) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", &format!("{USER}:{PASSWORD}")]);
        if let Some(f) = format {
            c.args(["--format", f]);
        }
        c.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{}/{repo}:{tag}", self.addr));
        run(&mut c);
    }

    /// The blob file the registry serves for `digest` (filesystem driver layout).
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    fn basic(&self) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")))
    }

    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = format!("sha256:{}", hex(&Sha256::digest(bytes)));
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let resp = agent.post(&format!("http://{}/v2/{repo}/blobs/uploads/", self.addr)).header("Authorization", &self.basic()).send_empty().unwrap();
        assert_eq!(resp.status().as_u16(), 202, "starting an upload");
        let loc = resp.headers().get("Location").unwrap().to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") { loc } else { format!("http://{}{loc}", self.addr) };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let resp = agent
            .put(&format!("{loc}{sep}digest={digest}"))
            .header("Authorization", &self.basic())
            .header("Content-Type", "application/octet-stream")
            .send(bytes)
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "uploading {digest}");
        digest
    }

    fn push_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &Value) -> String {
        let bytes = serde_json::to_vec(body).unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut resp = agent
            .put(&format!("http://{}/v2/{repo}/manifests/{tag}", self.addr))
            .header("Authorization", &self.basic())
            .header("Content-Type", media_type)
            .send(&bytes[..])
            .unwrap();
        let status = resp.status().as_u16();
        assert_eq!(status, 201, "pushing {repo}:{tag}: {}", resp.body_mut().read_to_string().unwrap_or_default());
        format!("sha256:{}", hex(&Sha256::digest(&bytes)))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Builds a modelcar of `model` with packaging/modelcar.sh; `extra` adds a second layer, `whiteout`
/// a third that deletes `/models/<whiteout>`. Returns the layout.
fn modelcar(layout: &Path, model: &Path, extra: Option<&Path>, whiteout: Option<&str>) -> PathBuf {
    let mut c = Command::new("bash");
    c.arg(repo_root().join("packaging/modelcar.sh")).arg(model).arg(layout).arg("1");
    if let Some(e) = extra {
        c.env("LORA_MODELCAR_EXTRA", e);
    }
    if let Some(w) = whiteout {
        c.env("LORA_MODELCAR_WHITEOUT", w);
    }
    run(&mut c);
    layout.to_path_buf()
}

/// The manifest of `layout`'s tag `1`: (digest, manifest JSON).
fn layout_manifest(layout: &Path) -> (String, Value) {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let blob = layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap());
    (digest, serde_json::from_slice(&std::fs::read(blob).unwrap()).unwrap())
}

/// A docker config.json with `user:password` for the registry, in its own folder.
fn docker_config(dir: &Path, addr: &str, password: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
    std::fs::write(dir.join("config.json"), json!({ "auths": { addr: { "auth": auth } } }).to_string()).unwrap();
    dir.to_path_buf()
}

/// `lora train` from `model` (an oci:// reference) with a clean credential environment: only
/// `docker_config` (if any) holds credentials; the OCI cache is `work/oci-cache`.
fn oci_train(work: &Path, model: &str, docker: Option<&Path>, offline: bool) -> Command {
    let mut c = train_cmd(work, Path::new(model), &capitals(), &["--training-effective-batch-size", "8", "--training-num-epochs", "1"]);
    c.env_remove("HF_HUB_OFFLINE")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("LORA_OCI_USERNAME")
        .env_remove("LORA_OCI_PASSWORD")
        .env("HOME", work.join("home"))
        .env("XDG_CONFIG_HOME", work.join("home/.config"))
        .env("LORA_OCI_CACHE", work.join("oci-cache"))
        .env("DOCKER_CONFIG", docker.map_or(work.join("no-docker-config"), Path::to_path_buf));
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    }
    c
}

/// Runs `c`, expecting exit `code` (2: the input is wrong; 1: the run failed, e.g. the network).
fn fails(mut c: Command, code: i32) -> String {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "expected exit {code}:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The cache's `models/` entries (complete and partial).
fn cache_entries(work: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(work.join("oci-cache/models"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The proof of issue 16 item 5: train from a pushed modelcar, then again offline from the cache.
#[test]
#[ignore = "needs docker-registry, skopeo, umoci, htpasswd: run by tests/ci.d/60-oci.sh"]
fn oci_modelcar_trains_then_runs_offline_from_the_cache() {
    let work = temp_dir("oci-train");
    let model = tiny_model(&work.join("base"), DType::F32);
    // Layer 1: a stale file; layer 2 (a umoci whiteout) deletes it again.
    std::fs::create_dir_all(work.join("extra")).unwrap();
    std::fs::write(work.join("extra/stale.txt"), "from a lower layer").unwrap();
    let layout = modelcar(&work.join("layout"), &model, Some(&work.join("extra")), Some("stale.txt"));
    let (digest, manifest) = layout_manifest(&layout);
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 3);
    let registry = Registry::start(&work.join("registry"), Auth::Basic);
    registry.push(&layout, "1", "models/tiny", None);
    let docker = docker_config(&work.join("docker"), &registry.addr, PASSWORD);
    let reference = format!("oci://{}/models/tiny:1", registry.addr);

    let out = run_ok(oci_train(&work, &reference, Some(&docker), false));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("pulling {reference} ({digest}")), "{stderr}");
    let adapter = adapter_bytes(&work);
    let rm: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/run_manifest.json")).unwrap()).unwrap();
    assert_eq!(rm["model"]["name"], reference.as_str());
    assert_eq!(rm["model"]["commit"], digest.as_str(), "the run manifest records the manifest digest");
    let entry = work.join("oci-cache/models").join(digest.replace(':', "-"));
    assert!(entry.join("config.json").is_file() && entry.join("model.safetensors").is_file());
    assert!(!entry.join("stale.txt").exists(), "the whiteout layer removed stale.txt");
    assert_eq!(std::fs::read(entry.join("model.safetensors")).unwrap(), std::fs::read(model.join("model.safetensors")).unwrap());
    assert_eq!(cache_entries(&work), [digest.replace(':', "-")], "one complete entry, no partial one");
    let cfg: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], reference.as_str());

    // Offline, registry stopped: from the cache, the same adapter bit for bit.
    drop(registry);
    let _ = std::fs::remove_dir_all(work.join("out"));
    let _ = std::fs::remove_dir_all(work.join("pvc"));
    let out = run_ok(oci_train(&work, &reference, None, true));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("pulling"), "offline must not pull:\n{stderr}");
    assert_eq!(adapter_bytes(&work), adapter, "same model from the cache, same adapter");

    // Online but the registry is down: the cached tag stands in, with a warning.
    let _ = std::fs::remove_dir_all(work.join("pvc"));
    let out = run_ok(oci_train(&work, &reference, Some(&docker), false));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the registry") && stderr.contains(&format!("using the cached {reference} ({digest})")), "{stderr}");

    // The digest reference needs neither the registry nor the tag.
    let _ = std::fs::remove_dir_all(work.join("pvc"));
    let pinned = format!("oci://{}/models/tiny@{digest}", "127.0.0.1:9");
    run_ok(oci_train(&work, &pinned, None, true));
    let _ = std::fs::remove_dir_all(&work);
}

/// Each failure names what failed, exits 1, and leaves no cache entry behind.
#[test]
#[ignore = "needs docker-registry, skopeo, umoci, htpasswd: run by tests/ci.d/60-oci.sh"]
fn oci_refusals_name_what_failed_and_keep_nothing() {
    let work = temp_dir("oci-refuse");
    let model = tiny_model(&work.join("base"), DType::F32);
    let registry = Registry::start(&work.join("registry"), Auth::Basic);
    let tiny = modelcar(&work.join("tiny"), &model, None, None);
    registry.push(&tiny, "1", "models/tiny", None);
    // A modelcar with a layer of its own (blobs are shared by digest), then tampered in storage.
    std::fs::create_dir_all(work.join("extra")).unwrap();
    std::fs::write(work.join("extra/README.md"), "tampered image").unwrap();
    let tampered = modelcar(&work.join("tampered"), &model, Some(&work.join("extra")), None);
    registry.push(&tampered, "1", "models/tampered", None);
    // An image without model files: /opt/readme only.
    let empty = work.join("empty");
    std::fs::create_dir_all(work.join("opt")).unwrap();
    std::fs::write(work.join("opt/readme"), "no model here").unwrap();
    run(Command::new("umoci").args(["init", "--layout"]).arg(&empty));
    run(Command::new("umoci").arg("new").arg("--image").arg(format!("{}:1", empty.display())));
    run(Command::new("umoci").arg("insert").arg("--image").arg(format!("{}:1", empty.display())).arg(work.join("opt")).arg("/opt"));
    registry.push(&empty, "1", "models/empty", None);
    let docker = docker_config(&work.join("docker"), &registry.addr, PASSWORD);
    let at = |repo: &str| format!("oci://{}/{repo}", registry.addr);

    let err = fails(oci_train(&work, &at("models/tiny:nope"), Some(&docker), false), 2);
    assert!(err.contains("tag `nope` not found") && err.contains("MANIFEST_UNKNOWN"), "{err}");
    let err = fails(oci_train(&work, &at("models/absent:1"), Some(&docker), false), 2);
    assert!(err.contains("tag `1` not found") && (err.contains("NAME_UNKNOWN") || err.contains("MANIFEST_UNKNOWN")), "{err}");

    let err = fails(oci_train(&work, &at("models/tiny:1"), None, false), 2);
    assert!(err.contains("asks for credentials and none were found") && err.contains("no-docker-config/config.json"), "{err}");
    let wrong = docker_config(&work.join("docker-wrong"), &registry.addr, "wrong-password");
    let err = fails(oci_train(&work, &at("models/tiny:1"), Some(&wrong), false), 2);
    assert!(err.contains("refused the credentials from") && err.contains("docker-wrong/config.json"), "{err}");
    assert!(!err.contains("wrong-password"), "the secret is never printed:\n{err}");

    let (_, m) = layout_manifest(&tampered);
    let layer = m["layers"][1]["digest"].as_str().unwrap().to_string();
    let file = registry.blob_file(&layer);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let err = fails(oci_train(&work, &at("models/tampered:1"), Some(&docker), false), 1);
    assert!(err.contains(&format!("layer 1 ({layer}) failed its digest check")) && err.contains("nothing was kept"), "{err}");
    assert!(cache_entries(&work).is_empty(), "a failed pull leaves no entry: {:?}", cache_entries(&work));

    let err = fails(oci_train(&work, &at("models/empty:1"), Some(&docker), false), 2);
    assert!(err.contains("has no model files: nothing under /models"), "{err}");
    assert!(cache_entries(&work).is_empty(), "{:?}", cache_entries(&work));

    let addr = registry.addr.clone();
    drop(registry);
    let err = fails(oci_train(&work, &format!("oci://{addr}/models/tiny:1"), Some(&docker), false), 1);
    assert!(err.contains("cannot reach the registry") && err.contains(&addr), "{err}");
    let err = fails(oci_train(&work, &format!("oci://{addr}/models/tiny:1"), Some(&docker), true), 2);
    assert!(err.contains("HF_HUB_OFFLINE is set and the image is not in the OCI cache"), "{err}");
    let _ = std::fs::remove_dir_all(&work);
}

/// Bearer tokens (the `WWW-Authenticate` flow), OCI artifacts, image indexes and Docker media types.
#[test]
#[ignore = "needs docker-registry, skopeo, umoci, htpasswd, openssl: run by tests/ci.d/60-oci.sh"]
fn oci_token_auth_artifacts_indexes_and_docker_manifests() {
    let work = temp_dir("oci-kinds");
    let model = tiny_model(&work.join("base"), DType::F32);
    let layout = modelcar(&work.join("tiny"), &model, None, None);

    // Token auth: skopeo pushes through it too.
    let registry = Registry::start(&work.join("registry"), Auth::Token);
    registry.push(&layout, "1", "models/tiny", None);
    let docker = docker_config(&work.join("docker"), &registry.addr, PASSWORD);
    let out = run_ok(oci_train(&work, &format!("oci://{}/models/tiny:1", registry.addr), Some(&docker), false));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pulling"));
    let adapter = adapter_bytes(&work);
    // Anonymous: the token server hands out a token without access; the registry still says 401.
    let err = fails(oci_train(&work, &format!("oci://{}/models/tiny:2", registry.addr), None, false), 2);
    assert!(err.contains("asks for credentials and none were found"), "{err}");
    let wrong = docker_config(&work.join("docker-wrong"), &registry.addr, "nope");
    let err = fails(oci_train(&work, &format!("oci://{}/models/tiny:2", registry.addr), Some(&wrong), false), 2);
    assert!(err.contains("refused the credentials") && err.contains("token service"), "{err}");
    drop(registry);

    // Basic auth for the rest (the test pushes through the registry API with Basic auth).
    let registry = Registry::start(&work.join("registry2"), Auth::Basic);
    let docker = docker_config(&work.join("docker2"), &registry.addr, PASSWORD);
    let fresh = |w: &Path| {
        let _ = std::fs::remove_dir_all(w.join("out"));
        let _ = std::fs::remove_dir_all(w.join("pvc"));
        let _ = std::fs::remove_dir_all(w.join("oci-cache"));
    };

    // Docker schema 2 media types (skopeo converts).
    registry.push(&layout, "1", "models/docker", Some("v2s2"));
    fresh(&work);
    run_ok(oci_train(&work, &format!("oci://{}/models/docker:1", registry.addr), Some(&docker), false));
    assert_eq!(adapter_bytes(&work), adapter, "same model files, same adapter");

    // An OCI artifact: every model file a layer, named by its title annotation.
    let repo = "models/artifact";
    let empty = registry.push_blob(repo, b"{}");
    let mut layers = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&model).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    names.sort();
    for name in &names {
        let bytes = std::fs::read(model.join(name)).unwrap();
        let digest = registry.push_blob(repo, &bytes);
        layers.push(json!({ "mediaType": "application/octet-stream", "digest": digest, "size": bytes.len(),
                             "annotations": { "org.opencontainers.image.title": name } }));
    }
    let artifact = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.lora.model.v1",
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2 },
        "layers": layers,
    });
    let artifact_digest = registry.push_manifest(repo, "1", "application/vnd.oci.image.manifest.v1+json", &artifact);
    fresh(&work);
    run_ok(oci_train(&work, &format!("oci://{}/{repo}:1", registry.addr), Some(&docker), false));
    assert_eq!(adapter_bytes(&work), adapter, "the artifact's files are the model");

    // An image index: linux/amd64 is the modelcar; an arm64 entry (the artifact) is not chosen.
    registry.push(&layout, "1", "models/multi", None); // the index below takes the tag over
    let (modelcar_digest, _) = layout_manifest(&layout);
    let artifact_bytes = serde_json::to_vec(&artifact).unwrap();
    for name in &names {
        let bytes = std::fs::read(model.join(name)).unwrap();
        registry.push_blob("models/multi", &bytes);
    }
    let _ = registry.push_blob("models/multi", b"{}");
    let _ = registry.push_manifest("models/multi", "arm64-files", "application/vnd.oci.image.manifest.v1+json", &artifact);
    let index = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": artifact_digest, "size": artifact_bytes.len(),
              "platform": { "os": "linux", "architecture": "arm64" } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": modelcar_digest,
              "size": std::fs::metadata(layout.join("blobs/sha256").join(modelcar_digest.strip_prefix("sha256:").unwrap())).unwrap().len(),
              "platform": { "os": "linux", "architecture": "amd64" } },
        ],
    });
    let index_digest = registry.push_manifest("models/multi", "1", "application/vnd.oci.image.index.v1+json", &index);
    fresh(&work);
    let out = run_ok(oci_train(&work, &format!("oci://{}/models/multi:1", registry.addr), Some(&docker), false));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("({index_digest}, image {modelcar_digest}")), "the amd64 entry is the modelcar:\n{stderr}");
    let rm: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/run_manifest.json")).unwrap()).unwrap();
    assert_eq!(rm["model"]["commit"], index_digest.as_str(), "the digest the tag resolved to, which @ pins");
    let _ = std::fs::remove_dir_all(&work);
}
