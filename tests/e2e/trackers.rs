//! End-to-end tests of the experiment trackers (`host/lora/src/trackers`): the real binary,
//! tiny models made here, as `tests/e2e/run.rs` does.
//!
//! The tests that run everywhere check what needs no tracker software: startup failures, the
//! dry run, and that TensorBoard and W&B files of a killed and resumed run hold every step once.
//! `write_tracker_fixture` (ignored; `tests/ci.d/45-trackers.sh` runs it against a real
//! `mlflow server`) writes the runs `tests/e2e/check_trackers.py` reads back with the
//! `tensorboard`, `mlflow` and `wandb` packages.
//!
//! Run: `cargo test -p lora --test trackers`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lora_engine::DType;
use serde_json::{Value, json};

/// 24 Q/A pairs, batch 8, a quarter held out: 3 optimizer steps per epoch, eval every 2 steps.
const SMALL: &[&str] = &[
    "--training-effective-batch-size",
    "8",
    "--training-lr-warmup-steps",
    "1",
    "--training-validation-split",
    "0.25",
    "--training-eval-steps",
    "2",
];

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn logged_steps(work: &Path) -> Vec<u64> {
    jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl")).iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect()
}

/// Starts `cmd` and SIGKILLs it once a stderr line starts with `prefix`.
fn kill_after(mut cmd: Command, prefix: &str) {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let seen = BufReader::new(stderr).lines().map_while(Result::ok).any(|l| l.starts_with(prefix));
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(seen && !status.success(), "expected to kill the run at `{prefix}`");
}

/// (tag, step) of every scalar in the TensorBoard run folders under `log_dir`.
fn tensorboard_points(log_dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for run in std::fs::read_dir(log_dir).unwrap().map(|e| e.unwrap().path()) {
        out.extend(lora::trackers::tensorboard::scalars(&run).into_iter().map(|(tag, step, _)| (tag, step)));
    }
    out.sort();
    out
}

fn run_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    v.sort();
    v
}

/// A run killed twice and resumed has, in TensorBoard and in its W&B offline run, each logged
/// step once with the values of `training_metrics.jsonl`, in one TensorBoard run folder and one
/// W&B run (the tracker runs continue; what the killed attempts wrote after their checkpoint is
/// gone).
#[test]
fn a_killed_and_resumed_run_has_each_step_once_in_tensorboard_and_wandb() {
    let work = temp_dir("trackers-resume");
    let model = tiny_model(&work.join("base"), DType::F32);
    let tb = work.join("tb");
    let args = [SMALL, &["--training-num-epochs", "3", "--training-save-steps", "1", "--training-tensorboard-log-dir", tb.to_str().unwrap(), "--training-wandb-project", "lora-e2e"]].concat();
    let cmd = || {
        let mut c = train_cmd(&work, &model, &capitals(), &args);
        c.env_remove("WANDB_MODE").env_remove("WANDB_DIR");
        c
    };
    kill_after(cmd(), "step 2/");
    kill_after(cmd(), "step 4/");
    let out = run_ok(cmd());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming from") && stderr.contains("wandb sync"), "{stderr}");

    let steps = logged_steps(&work);
    assert_eq!(steps, (1..=9).collect::<Vec<_>>(), "3 epochs of 3 steps");
    let rows = jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl"));
    let evals: Vec<u64> = rows.iter().filter(|r| r.get("eval_loss").is_some() && r.get("train_runtime").is_none()).map(|r| r["step"].as_u64().unwrap()).collect();

    assert_eq!(run_dirs(&tb).len(), 1, "one TensorBoard run folder for the run and its resumed attempts");
    let points = tensorboard_points(&tb);
    let loss_steps: Vec<u64> = points.iter().filter(|(t, _)| t == "train/loss").map(|(_, s)| *s).collect();
    assert_eq!(loss_steps, steps, "train/loss once per logged step");
    let eval_steps: Vec<u64> = points.iter().filter(|(t, _)| t == "eval/loss").map(|(_, s)| *s).collect();
    assert_eq!(eval_steps, evals);
    assert_eq!(points.iter().filter(|(t, _)| t == "train/train_loss").count(), 1, "the totals once");
    let tb_loss: Vec<f32> = run_dirs(&tb).iter().flat_map(|d| lora::trackers::tensorboard::scalars(d)).filter(|(t, _, _)| t == "train/loss").map(|(_, _, v)| v).collect();
    let jsonl_loss: Vec<f32> = rows.iter().filter_map(|r| r.get("loss").and_then(Value::as_f64)).map(|v| v as f32).collect();
    assert_eq!(tb_loss, jsonl_loss);

    let wandb_runs = run_dirs(&work.join("pvc/wandb"));
    assert_eq!(wandb_runs.len(), 1, "one W&B offline run: {wandb_runs:?}");
    let history = lora::trackers::wandb::history(&wandb_runs[0]);
    let w_steps: Vec<u64> = history.iter().map(|row| row["_step"].as_u64().unwrap()).collect();
    // One history row per logged step, and one for the eval before the first step.
    assert_eq!(evals.first(), Some(&0), "an eval before the first step: {evals:?}");
    let want: Vec<u64> = std::iter::once(0).chain(steps.iter().copied()).collect();
    assert_eq!(w_steps, want, "one history row per logged step: {history:?}");
    let trained = history.iter().filter(|row| row.get("train/loss").is_some());
    for (row, r) in trained.zip(rows.iter().filter(|r| r.get("loss").is_some())) {
        assert_eq!(row["train/loss"].as_f64(), r["loss"].as_f64());
        if evals.contains(&r["step"].as_u64().unwrap()) {
            assert!(row["eval/loss"].is_number(), "eval merged into the row of its step: {row}");
        }
    }
    let trackers: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/run_manifest.json")).unwrap()).unwrap();
    assert_eq!(trackers["trackers"]["tensorboard"]["log_dir"], json!(tb), "the manifest records the trackers");
    assert_eq!(trackers["trackers"]["wandb"]["project"], "lora-e2e");
}

/// An MLflow server that does not answer stops the run before any training, naming the tracker
/// and the URI; W&B online mode is refused at once (exit 2, no work done).
#[test]
fn unusable_trackers_stop_the_run_before_training() {
    let work = temp_dir("trackers-startup");
    let model = tiny_model(&work.join("base"), DType::F32);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let uri = format!("http://127.0.0.1:{port}");
    let mut c = train_cmd(&work, &model, &capitals(), SMALL);
    c.env("MLFLOW_TRACKING_URI", &uri);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("mlflow: ") && stderr.contains(&uri) && stderr.contains("MLFLOW_TRACKING_URI"), "{stderr}");
    assert!(!stderr.contains("step 1/") && lora::checkpoint::list(&work.join("pvc/checkpoints")).is_empty(), "nothing trained");

    let envs = "WANDB_MODE=online";
    let out = train_cmd(&work, &model, &capitals(), &[SMALL, &["--training-wandb-project", "p", "--training-envs", envs]].concat()).env_remove("WANDB_API_KEY").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("wandb: WANDB_MODE=online") && stderr.contains("WANDB_API_KEY is not set") && stderr.contains("wandb sync"), "{stderr}");
}

/// `--dry-run` names each enabled tracker and where it writes, with credentials hidden.
#[test]
fn dry_run_names_the_trackers_and_where_they_write() {
    let work = temp_dir("trackers-dry");
    let model = tiny_model(&work.join("base"), DType::F32);
    let envs = "MLFLOW_TRACKING_URI=http://127.0.0.1:1,MLFLOW_TRACKING_TOKEN=s3cret,MLFLOW_EXPERIMENT_NAME=exp";
    let args = [SMALL, &["--dry-run", "--json", "--training-tensorboard-log-dir", "/tmp/tb", "--training-wandb-project", "p", "--training-wandb-run-name", "first", "--training-envs", envs]].concat();
    let out = run_ok(train_cmd(&work, &model, &capitals(), &args));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &plan["trackers"];
    assert_eq!(t["tensorboard"]["log_dir"], "/tmp/tb");
    assert_eq!(t["mlflow"]["tracking_uri"], "http://127.0.0.1:1");
    assert_eq!(t["mlflow"]["experiment"], "exp");
    assert_eq!(t["wandb"]["mode"], "offline");
    assert_eq!(t["wandb"]["run_name"], "first");
    assert!(t["wandb"]["run_dir"].as_str().unwrap().starts_with(&work.join("pvc/wandb/offline-run-").display().to_string()), "{t}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"), "the token is hidden");
}

/// A `mlflow server` child process, killed on drop.
struct MlflowServer {
    child: Child,
    uri: String,
}

impl MlflowServer {
    /// `python -m mlflow server` on a free port, with its store under `dir`; waits until
    /// `/health` answers.
    fn start(python: &Path, dir: &Path) -> MlflowServer {
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // Its own process group: the server's workers are its children, and all must go.
        let child = Command::new(python)
            .process_group(0)
            .args(["-m", "mlflow", "server", "--host", "127.0.0.1", "--port", &port.to_string(), "--workers", "1"])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
            .spawn()
            .unwrap();
        let uri = format!("http://127.0.0.1:{port}");
        let server = MlflowServer { child, uri };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(600) {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && Command::new("curl").args(["-sf", &format!("{}/health", server.uri)]).output().is_ok_and(|o| o.status.success())
            {
                return server;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("mlflow server did not start; see {}", dir.join("server.log").display());
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the runs `tests/e2e/check_trackers.py` reads back, into `LORA_TRACKERS_DIR`, logging to
/// the MLflow server at `LORA_TRACKERS_MLFLOW_URI` (started by `tests/ci.d/45-trackers.sh`):
/// - `ref`: an uninterrupted run with TensorBoard, MLflow and W&B;
/// - `resumed`: the same run killed twice and resumed (same adapter as `ref`);
/// - `outage`: a run whose own MLflow server (started here with `LORA_TRACKERS_PYTHON`) is killed
///   mid-run: the run warns, goes on and finishes with the same adapter.
#[test]
#[ignore = "fixture for tests/e2e/check_trackers.py; run by tests/ci.d/45-trackers.sh"]
fn write_tracker_fixture() {
    let dir = PathBuf::from(std::env::var("LORA_TRACKERS_DIR").expect("set LORA_TRACKERS_DIR"));
    let uri = std::env::var("LORA_TRACKERS_MLFLOW_URI").expect("set LORA_TRACKERS_MLFLOW_URI");
    let python = PathBuf::from(std::env::var("LORA_TRACKERS_PYTHON").expect("set LORA_TRACKERS_PYTHON"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(&dir.join("base"), DType::F32);
    let cmd = |name: &str, mlflow: &str, experiment: &str, extra: &[&str]| {
        let work = dir.join(name);
        let tb = work.join("tb");
        let envs = format!("MLFLOW_TRACKING_URI={mlflow},MLFLOW_EXPERIMENT_NAME={experiment},LORA_MLFLOW_DRAIN_SECS=5");
        let args = [
            SMALL,
            &["--training-num-epochs", "3", "--training-save-steps", "1", "--training-tensorboard-log-dir", tb.to_str().unwrap()],
            &["--training-wandb-project", "lora-e2e", "--training-wandb-run-name", name, "--training-envs", &envs],
            extra,
        ]
        .concat();
        let mut c = train_cmd(&work, &model, &capitals(), &args);
        c.env_remove("WANDB_MODE").env_remove("WANDB_DIR").env_remove("MLFLOW_TRACKING_URI");
        c
    };
    let t0 = Instant::now();
    run_ok(cmd("ref", &uri, "lora-ref", &[]));
    eprintln!("ref run: {:.1}s", t0.elapsed().as_secs_f64());

    kill_after(cmd("resumed", &uri, "lora-resumed", &[]), "step 2/");
    kill_after(cmd("resumed", &uri, "lora-resumed", &[]), "step 5/");
    let out = run_ok(cmd("resumed", &uri, "lora-resumed", &[]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("continuing run"), "the resumed attempt continues the MLflow run");
    assert!(adapter_bytes(&dir.join("resumed")) == adapter_bytes(&dir.join("ref")), "resumed adapter differs from the uninterrupted run's");

    // The outage: the server goes away after step 2 and does not come back.
    let own = MlflowServer::start(&python, &dir.join("outage-server"));
    let mut child = cmd("outage", &own.uri, "lora-outage", &[]).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut own = Some(own);
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        if line.starts_with("step 2/") {
            drop(own.take()); // kill the server
        }
        lines.push(line);
    }
    let status = child.wait().unwrap();
    let stderr = lines.join("\n");
    assert!(status.success(), "a tracking server failing mid-run does not fail the run:\n{stderr}");
    assert!(stderr.contains("warning: mlflow: logging metrics") && stderr.contains("training goes on"), "{stderr}");
    assert!(stderr.contains("could not be delivered"), "the end of the run names what was lost:\n{stderr}");
    assert!(adapter_bytes(&dir.join("outage")) == adapter_bytes(&dir.join("ref")), "the outage changed the adapter");
    std::fs::write(dir.join("outage/stderr.txt"), &stderr).unwrap();

    let fixture = json!({
        "mlflow_uri": uri,
        "runs": {
            "ref": {"experiment": "lora-ref"},
            "resumed": {"experiment": "lora-resumed"},
        },
    });
    std::fs::write(dir.join("fixture.json"), fixture.to_string()).unwrap();
}
