//! The hub client against a fake hub on 127.0.0.1 speaking the real URL scheme and headers
//! (`/api/models/<id>/revision/main`, `/<id>/resolve/<commit>/<file>`, LFS files as a 302 with
//! `X-Linked-Etag` / `X-Linked-Size`), started by the test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use super::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct FakeHub {
    endpoint: String,
    /// Every request line served, in order.
    log: Arc<Mutex<Vec<String>>>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Serves repo `org/tiny` (config.json, tokenizer.json, model.safetensors via LFS redirect, and a
/// pytorch_model.bin that must not be fetched). With `token`, every request needs it.
fn start_fake_hub(token: Option<&'static str>, weights: Vec<u8>) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    files.insert("config.json".into(), br#"{"architectures":["LlamaForCausalLM"]}"#.to_vec());
    files.insert("tokenizer.json".into(), br#"{"version":"1.0"}"#.to_vec());
    files.insert("model.safetensors".into(), weights);
    files.insert("pytorch_model.bin".into(), b"not wanted".to_vec());
    let server_log = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut authorized = token.is_none();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(t) = token
                    && line.to_ascii_lowercase().starts_with("authorization:")
                    && line.trim_end().ends_with(&format!("Bearer {t}"))
                {
                    authorized = true;
                }
            }
            let mut parts = request.split_whitespace();
            let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
            server_log.lock().unwrap().push(format!("{method} {path}"));
            let head = method == "HEAD";
            let mut reply = |status: &str, headers: Vec<(String, String)>, body: &[u8]| {
                let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let _ = stream.write_all(out.as_bytes());
                if !head {
                    let _ = stream.write_all(body);
                }
            };
            // LFS content sits behind a presigned CDN URL: no token needed (clients drop it on redirect).
            if !authorized && !path.starts_with("/lfs/") {
                reply("401 Unauthorized", vec![], b"{\"error\":\"gated\"}");
                continue;
            }
            if path == "/api/models/org/tiny/revision/main" {
                let siblings: Vec<String> = files.keys().map(|f| format!("{{\"rfilename\":\"{f}\"}}")).collect();
                let body = format!("{{\"id\":\"org/tiny\",\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}", siblings.join(","));
                reply("200 OK", vec![], body.as_bytes());
            } else if let Some(file) = path.strip_prefix(&format!("/org/tiny/resolve/{COMMIT}/")) {
                match files.get(file) {
                    Some(bytes) if file.ends_with(".safetensors") => {
                        let sha = sha256_hex(bytes);
                        reply(
                            "302 Found",
                            vec![
                                ("X-Repo-Commit".into(), COMMIT.into()),
                                ("X-Linked-Etag".into(), format!("\"{sha}\"")),
                                ("X-Linked-Size".into(), bytes.len().to_string()),
                                ("Location".into(), format!("/lfs/{sha}")),
                            ],
                            b"",
                        );
                    }
                    Some(bytes) => {
                        let etag = format!("\"git-{}\"", &sha256_hex(bytes)[..40]);
                        reply("200 OK", vec![("X-Repo-Commit".into(), COMMIT.into()), ("ETag".into(), etag)], bytes);
                    }
                    None => reply("404 Not Found", vec![], b"{}"),
                }
            } else if let Some(sha) = path.strip_prefix("/lfs/") {
                let bytes = files.values().find(|b| sha256_hex(b) == sha).cloned().unwrap_or_default();
                reply("200 OK", vec![], &bytes);
            } else {
                reply("404 Not Found", vec![], b"{}");
            }
        }
    });
    FakeHub { endpoint, log }
}

fn temp_cache(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-hub-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn opts(hub: &FakeHub, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.endpoint.clone(),
        token: None,
        cache_dir: cache.to_path_buf(),
        offline: false,
        revision: "main".into(),
        progress: false,
    }
}

#[test]
fn downloads_into_the_hf_cache_layout_and_reuses_it() {
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let hub = start_fake_hub(None, weights.clone());
    let cache = temp_cache("layout");
    let model = resolve_model("org/tiny", &opts(&hub, &cache)).unwrap();

    let repo = cache.join("models--org--tiny");
    assert_eq!(model.dir, repo.join("snapshots").join(COMMIT));
    assert_eq!(model.commit.as_deref(), Some(COMMIT));
    assert_eq!(fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT);
    assert_eq!(fs::read(model.dir.join("model.safetensors")).unwrap(), weights);
    // The snapshot entry is a relative symlink to the blob named by the LFS etag (sha256).
    let link = fs::read_link(model.dir.join("model.safetensors")).unwrap();
    assert_eq!(link, PathBuf::from(format!("../../blobs/{}", sha256_hex(&weights))));
    assert!(model.dir.join("config.json").is_file() && model.dir.join("tokenizer.json").is_file());
    assert!(!model.dir.join("pytorch_model.bin").exists(), "non-safetensors weights are not fetched");
    let first = hub.log.lock().unwrap().clone();
    assert!(first.iter().any(|l| l.starts_with("GET /lfs/")), "{first:?}");

    // Second resolve: only the API call, no file traffic (cache reuse).
    hub.log.lock().unwrap().clear();
    let again = resolve_model("org/tiny", &opts(&hub, &cache)).unwrap();
    assert_eq!(again, model);
    assert_eq!(*hub.log.lock().unwrap(), vec!["GET /api/models/org/tiny/revision/main".to_string()]);

    // Offline: from the cache, no traffic at all.
    hub.log.lock().unwrap().clear();
    let offline = resolve_model("org/tiny", &HubOptions { offline: true, ..opts(&hub, &cache) }).unwrap();
    assert_eq!(offline.dir, model.dir);
    assert!(hub.log.lock().unwrap().is_empty());
    let _ = fs::remove_dir_all(&cache);
}

#[test]
fn gated_models_need_the_token_and_say_so() {
    let hub = start_fake_hub(Some("s3cret"), vec![1, 2, 3]);
    let cache = temp_cache("gated");
    let err = resolve_model("org/tiny", &opts(&hub, &cache)).unwrap_err().to_string();
    assert!(err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    let ok = resolve_model("org/tiny", &HubOptions { token: Some("s3cret".into()), ..opts(&hub, &cache) }).unwrap();
    assert_eq!(fs::read(ok.dir.join("model.safetensors")).unwrap(), vec![1, 2, 3]);
    let _ = fs::remove_dir_all(&cache);
}

#[test]
fn unknown_model_and_unreachable_hub_are_clear_errors() {
    let hub = start_fake_hub(None, vec![0]);
    let cache = temp_cache("missing");
    let err = resolve_model("org/missing", &opts(&hub, &cache)).unwrap_err().to_string();
    assert!(err.contains("404") && err.contains("org/missing"), "{err}");
    // Port 9 (discard) on loopback: nothing listens.
    let o = HubOptions { endpoint: "http://127.0.0.1:9".into(), ..opts(&hub, &cache) };
    let err = resolve_model("org/tiny", &o).unwrap_err().to_string();
    assert!(err.contains("cannot reach") && err.contains("127.0.0.1:9"), "{err}");
    let _ = fs::remove_dir_all(&cache);
}
