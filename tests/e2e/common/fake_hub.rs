//! A Hugging Face hub on 127.0.0.1 for end-to-end tests: serves one model folder as repo `id`
//! with the hub's URL scheme (`/api/models/<id>/revision/main`, `/<id>/resolve/<commit>/<file>`,
//! safetensors as an LFS redirect with `X-Linked-Etag`). Counts the file downloads.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub const COMMIT: &str = "1111111111111111111111111111111111111111";

pub struct FakeHub {
    pub endpoint: String,
    pub downloads: Arc<AtomicUsize>,
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn serve(id: &'static str, dir: &Path) -> FakeHub {
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap()))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let downloads = Arc::new(AtomicUsize::new(0));
    let counter = downloads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let mut parts = request.split_whitespace();
            let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
            let mut reply = |status: &str, headers: &[(&str, String)], body: &[u8]| {
                let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                if method != "HEAD" {
                    let _ = stream.write_all(body);
                }
            };
            if path == format!("/api/models/{id}/revision/main") {
                let siblings: Vec<String> = files.iter().map(|(f, _)| format!("{{\"rfilename\":\"{f}\"}}")).collect();
                reply("200 OK", &[], format!("{{\"id\":\"{id}\",\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}", siblings.join(",")).as_bytes());
            } else if let Some(name) = path.strip_prefix(&format!("/{id}/resolve/{COMMIT}/")) {
                match files.iter().find(|(f, _)| f == name) {
                    Some((f, bytes)) if f.ends_with(".safetensors") => {
                        let h = sha(bytes);
                        let headers = [("X-Repo-Commit", COMMIT.to_string()), ("X-Linked-Etag", format!("\"{h}\"")), ("X-Linked-Size", bytes.len().to_string()), ("Location", format!("/lfs/{h}"))];
                        reply("302 Found", &headers, b"");
                    }
                    Some((_, bytes)) => {
                        if method == "GET" {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        reply("200 OK", &[("X-Repo-Commit", COMMIT.to_string()), ("ETag", format!("\"{}\"", &sha(bytes)[..40]))], bytes);
                    }
                    None => reply("404 Not Found", &[], b"{}"),
                }
            } else if let Some(h) = path.strip_prefix("/lfs/") {
                counter.fetch_add(1, Ordering::SeqCst);
                let bytes = files.iter().find(|(_, b)| sha(b) == h).map(|(_, b)| b.clone()).unwrap_or_default();
                reply("200 OK", &[], &bytes);
            } else {
                reply("404 Not Found", &[], b"{}");
            }
        }
    });
    FakeHub { endpoint, downloads }
}
