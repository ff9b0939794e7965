//! Test support shared by every crate whose tests run real guest plugins: build packages of the
//! `plugins/` workspace from source for wasm32-wasip2. Not used by the runtime itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The guest target directory: `LORA_PLUGINS_WASM_TARGET` if set (the stage script shares one),
/// else `<cargo target tmp>/plugins-wasm` (callers pass their `CARGO_TARGET_TMPDIR`).
pub fn guest_target_dir(target_tmpdir: &Path) -> PathBuf {
    std::env::var_os("LORA_PLUGINS_WASM_TARGET")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_tmpdir.join("plugins-wasm"))
}

/// Builds `packages` of the guest workspace at `repo/plugins` for wasm32-wasip2 into `target`
/// (one `cargo build -p` each, so the SDK's per-kind features do not unify) and returns the
/// folder holding the `.wasm` files. Calls are serialised within a process; cargo's own lock
/// serialises separate test binaries.
pub fn build_guest_plugins(repo: &Path, target: &Path, packages: &[&str], release: bool) -> Result<PathBuf, String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for package in packages {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(repo.join("plugins"))
            .args(["build", "--quiet", "--target", "wasm32-wasip2", "-p", package])
            .env("CARGO_TARGET_DIR", target)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().map_err(|e| format!("cannot run {cargo} to build guest plugin {package}: {e}"))?;
        if !status.success() {
            return Err(format!("building guest plugin {package} for wasm32-wasip2 failed ({status})"));
        }
    }
    Ok(target.join("wasm32-wasip2").join(if release { "release" } else { "debug" }))
}

/// One request an [`HttpEndpoint`] received.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ReceivedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A real HTTP/1.1 server on a loopback port, in a background thread, for reporters that send
/// requests: it records each request and answers `status` (or never answers, with `silent`).
/// [`HttpEndpoint::answer_from`] changes the answer from the n-th request on.
pub struct HttpEndpoint {
    pub port: u16,
    pub received: std::sync::Arc<Mutex<Vec<ReceivedRequest>>>,
    /// (from request number, status) pairs, the last matching one wins; status 0 = no answer.
    answers: std::sync::Arc<Mutex<Vec<(usize, u16)>>>,
}

impl HttpEndpoint {
    /// Answers every request with `status` and a short body.
    pub fn start(status: u16) -> std::io::Result<HttpEndpoint> {
        Self::spawn(status)
    }

    /// Accepts connections and reads requests but never answers.
    pub fn silent() -> std::io::Result<HttpEndpoint> {
        Self::spawn(0)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// From the `n`-th request on (0-based, counting every request received so far), answer
    /// `status` instead.
    pub fn answer_from(&self, n: usize, status: u16) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((n, status));
    }

    /// `status` 0: never answer.
    fn spawn(status: u16) -> std::io::Result<HttpEndpoint> {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let received: std::sync::Arc<Mutex<Vec<ReceivedRequest>>> = Default::default();
        let answers = std::sync::Arc::new(Mutex::new(vec![(0, status)]));
        let sink = received.clone();
        let policy = answers.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let sink = sink.clone();
                let policy = policy.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(match stream.try_clone() {
                        Ok(s) => s,
                        Err(_) => return,
                    });
                    let mut writer = stream;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut parts = line.split_whitespace();
                        let (method, path) = (
                            parts.next().unwrap_or("").to_string(),
                            parts.next().unwrap_or("").to_string(),
                        );
                        let mut headers = Vec::new();
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                            }
                        }
                        let len = headers
                            .iter()
                            .find(|(k, _)| k == "content-length")
                            .and_then(|(_, v)| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        let number = {
                            let mut got = sink.lock().unwrap_or_else(|e| e.into_inner());
                            got.push(ReceivedRequest {
                                method,
                                path,
                                headers,
                                body,
                            });
                            got.len() - 1
                        };
                        let status = policy
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .iter()
                            .rev()
                            .find(|(from, _)| number >= *from)
                            .map_or(0, |(_, s)| *s);
                        if status == 0 {
                            // Hold the connection open without answering.
                            std::thread::sleep(std::time::Duration::from_secs(120));
                            return;
                        }
                        let reply = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\nreceived"
                        );
                        if writer.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(HttpEndpoint {
            port,
            received,
            answers,
        })
    }
}
