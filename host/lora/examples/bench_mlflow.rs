//! Benchmark: what logging to a slow MLflow server costs a training step. A proxy on 127.0.0.1
//! in front of a real `mlflow server` delays every request by `delay_ms`; then, for the same
//! steps (7 metrics each, as lora logs them):
//! - blocking: one `log-batch` POST per step on the caller's thread (a reporter without a queue);
//! - lora: the MLflow tracker's `step()` (the queue and the background thread), then the drain at
//!   the end of the run.
//!
//! Prints both side by side, and how many requests the tracker needed.
//!
//! ```text
//! mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///tmp/b.db &
//! cargo run -p lora --example bench_mlflow -- http://127.0.0.1:5000 [delay_ms=200] [steps=50]
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lora::trackers::mlflow::{Mlflow, Settings};
use lora::trackers::{RunState, Start, Tracker};
use lora_api::{RunInfo, StepMetrics};
use serde_json::{Map, json};

/// Forwards 127.0.0.1:<port> to `upstream`, sleeping `delay` before each chunk the client sends
/// (so each request waits at least `delay`); counts the chunks (≈ requests).
fn delay_proxy(upstream: String, delay: Duration, chunks: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let Ok(server) = TcpStream::connect(&upstream) else { continue };
            let (mut c_read, mut s_write) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            let (mut s_read, mut c_write) = (server, client);
            let chunks = chunks.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    chunks.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(delay);
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
            });
        }
    });
    port
}

fn metrics(step: u64) -> StepMetrics {
    StepMetrics {
        step,
        epoch: step as f64 / 100.0,
        max_steps: 1000,
        loss: 2.0 / step as f64,
        grad_norm: 0.5,
        learning_rate: 2e-4,
        tokens: 4096,
        trained_tokens: 2048,
        tokens_per_second: 1000.0,
        elapsed_s: step as f64,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let upstream = args.get(1).expect("usage: bench_mlflow <mlflow uri> [delay_ms] [steps]").trim_end_matches('/').to_string();
    let delay_ms: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200);
    let steps: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(50);
    let host = upstream.trim_start_matches("http://").to_string();
    let chunks = Arc::new(AtomicUsize::new(0));
    let port = delay_proxy(host, Duration::from_millis(delay_ms), chunks.clone());
    let uri = format!("http://127.0.0.1:{port}");
    let env = |k: &str| match k {
        "MLFLOW_TRACKING_URI" => Some(uri.clone()),
        "MLFLOW_EXPERIMENT_NAME" => Some("lora-bench".into()),
        _ => None,
    };
    let settings = Settings::resolve(&env).expect("settings").expect("enabled");

    // Blocking: a run made by the tracker, then one POST per step from this thread.
    let mut tracker = Mlflow::connect(&settings).expect("connect");
    let info = RunInfo { run_id: "bench".into(), params: json!({}), total_steps: steps, num_epochs: 1, steps_per_epoch: steps, start_step: 0, world_size: 1 };
    let mut state = RunState { run_id: "bench".into(), started_unix: 0.0, started: "bench".into(), ..RunState::default() };
    let params = Map::new();
    tracker.start(Start { info: &info, params: &params, model: "m", device: "cpu", state: &mut state, resumed: false }).expect("start");
    let run_id = state.mlflow_run_id.clone().expect("run id");
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let blocking_before = chunks.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for s in 1..=steps {
        let m = metrics(s);
        let values: Vec<_> = [("loss", m.loss), ("learning_rate", m.learning_rate), ("grad_norm", m.grad_norm), ("tokens_per_second", m.tokens_per_second), ("epoch", m.epoch), ("tokens", 4096.0), ("trained_tokens", 2048.0)]
            .iter()
            .map(|(k, v)| json!({"key": format!("blocking_{k}"), "value": v, "timestamp": 0, "step": s}))
            .collect();
        let body = json!({"run_id": run_id, "metrics": values}).to_string();
        let resp = agent.post(format!("{uri}/api/2.0/mlflow/runs/log-batch")).header("Content-Type", "application/json").send(body).expect("post");
        assert_eq!(resp.status().as_u16(), 200);
    }
    let blocking = t0.elapsed().as_secs_f64();
    let blocking_requests = chunks.load(Ordering::Relaxed) - blocking_before;

    // lora's tracker: the same steps through step(), then the end of the run.
    let before = chunks.load(Ordering::Relaxed);
    let mut worst = 0.0f64;
    let t0 = Instant::now();
    for s in 1..=steps {
        let t = Instant::now();
        tracker.step(&metrics(s)).expect("step");
        worst = worst.max(t.elapsed().as_secs_f64());
    }
    let in_steps = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let warnings = tracker.outputs(&[]);
    let drain = t1.elapsed().as_secs_f64();
    assert!(warnings.is_empty(), "{warnings:?}");
    let requests = chunks.load(Ordering::Relaxed) - before;

    println!("MLflow behind a {delay_ms} ms proxy, {steps} steps x 7 metrics");
    println!("{:<28} {:>14} {:>14}", "", "blocking", "lora tracker");
    println!("{:<28} {:>12.3} s {:>12.6} s", "time spent in the steps", blocking, in_steps);
    println!("{:<28} {:>11.3} ms {:>11.3} ms", "per step", blocking * 1e3 / steps as f64, in_steps * 1e3 / steps as f64);
    println!("{:<28} {:>14} {:>11.3} ms", "slowest step call", "-", worst * 1e3);
    println!("{:<28} {:>14} {:>12.3} s", "end of run (drain + close)", "-", drain);
    println!("{:<28} {:>14} {:>14}", "writes through the proxy", blocking_requests, requests);
}
