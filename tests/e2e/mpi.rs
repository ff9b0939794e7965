//! Data parallel for real: `mpirun -np N lora train …` on this machine's CPU (Open MPI from
//! Debian, the binary built with `--features mpi`). N ranks must give the adapter of one process
//! with the same global batch, up to float summation order; a rerun must give the same bits; a
//! crashing rank must stop the run, naming it, and leave the checkpoints resumable. `lora train
//! --training-resource-num-procs-per-worker N` starts its N ranks under mpirun itself.
//!
//! Run: `tests/ci.d/65-mpi.sh` (installs Open MPI, then
//! `cargo test -p lora --features mpi --test mpi`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lora_engine::{DType, NamedTensor};
use serde_json::Value;

/// 18 training samples, batch 12 (divisible by 1, 2 and 3 ranks, as the reference's arithmetic
/// wants): 2 optimizer steps per epoch (12 samples, then 6), 4 in all; a checkpoint every 2.
const ARGS: &[&str] = &[
    "--training-effective-batch-size",
    "12",
    "--training-lr-warmup-steps",
    "1",
    "--training-num-epochs",
    "2",
    "--training-learning-rate",
    "5e-3",
    "--training-save-steps",
    "2",
    "--training-validation-split",
    "0.25",
    "--training-eval-steps",
    "3",
];

/// Every step lasts one second by the run's clock: interrupted and whole runs compare byte for byte.
const FROZEN: &[(&str, &str)] = &[("LORA_TEST_FROZEN_CLOCK", "1")];

/// `cmd` (a `lora` command line) started as `np` ranks by mpirun.
fn under_mpirun(np: usize, cmd: Command) -> Command {
    let mut m = Command::new("mpirun");
    m.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()]);
    // mpirun passes its own environment on; the command's settings go through it.
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => m.env(k, v),
            None => m.env_remove(k),
        };
    }
    m.arg(cmd.get_program()).args(cmd.get_args());
    m.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    m
}

fn train(work: &Path, model: &Path, np: usize, extra: &[&str]) -> Command {
    let args = [ARGS, extra].concat();
    let c = train_cmd(work, model, &capitals(), &args);
    if np == 0 { c } else { under_mpirun(np, c) }
}

/// `c` with `vars` set (mpirun hands its environment on to the ranks).
fn with(mut c: Command, vars: &[(&str, &str)]) -> Command {
    c.envs(vars.iter().copied());
    c
}

fn fails(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "expected a failure:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn adapter(work: &Path) -> Vec<NamedTensor> {
    let path = work.join("out/model/adapter/adapter_model.safetensors");
    lora::checkpoint::decode_safetensors(&std::fs::read(&path).unwrap(), &path).unwrap()
}

fn losses(work: &Path) -> Vec<f64> {
    std::fs::read_to_string(work.join("pvc/checkpoints/training_metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect()
}

/// Largest |a - b| over every adapter tensor, and the largest |a|.
fn max_diff(a: &[NamedTensor], b: &[NamedTensor]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let (mut d, mut m) = (0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
        for (p, q) in x.data.iter().zip(&y.data) {
            d = d.max((p - q).abs());
            m = m.max(p.abs());
        }
    }
    (d, m)
}

/// Processes whose command line mentions `dir` (a test's own work folder): what a crash left.
fn processes_in(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().to_string();
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) && e.file_name().to_string_lossy() != me)
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle).then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

fn base(dir: &Path) -> PathBuf {
    learnable_model(&dir.join("base"), 4.0)
}

#[test]
fn two_and_three_ranks_train_the_one_process_adapter_and_repeat_it_bit_for_bit() {
    let root = temp_dir("mpi-equal");
    let model = base(&root);
    let single = root.join("single");
    run_ok(train(&single, &model, 0, &[]));
    let one = adapter(&single);
    for np in [2usize, 3] {
        let work = root.join(format!("np{np}"));
        run_ok(train(&work, &model, np, &[]));
        // (Not from the log: the ranks' lines interleave.)
        let manifest: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/run_manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["device"], format!("cpu, {np} data-parallel ranks (mpi)"));
        let (d, m) = max_diff(&one, &adapter(&work));
        eprintln!("np {np}: max |adapter - 1-process adapter| = {d:e} (largest value {m:e})");
        // Only the summation order of gradients differs (f32): far below one learning-rate step.
        assert!(d <= 1e-5 + 1e-4 * m, "np {np}: adapters differ by {d:e} (largest value {m:e})");
        let (a, b) = (losses(&single), losses(&work));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "np {np}: losses {a:?} vs {b:?}");
        }
        // Only rank 0 wrote: one metrics line per logged step, not one per rank.
        assert_eq!(b.len(), 4, "{b:?}");
    }
    let again = root.join("np2-again");
    run_ok(train(&again, &model, 2, &[]));
    assert!(adapter_bytes(&again) == adapter_bytes(&root.join("np2")), "a rerun with 2 ranks must give the same bytes");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_crashing_rank_stops_the_run_naming_it_and_the_run_resumes_with_the_same_ranks_only() {
    let root = temp_dir("mpi-crash");
    let model = base(&root);
    let whole = root.join("whole");
    run_ok(with(train(&whole, &model, 2, &[]), FROZEN));

    // Started by lora itself (`training_resource_num_procs_per_worker` 2 becomes mpirun -np 2).
    let work = root.join("crash");
    let launched = || train(&work, &model, 0, &["--training-resource-num-procs-per-worker", "2"]);
    let out = fails(with(launched(), &[FROZEN[0], ("LORA_FAULT_INJECT", "rank1-step:3")]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("starting 2 processes with mpirun"), "{log}");
    assert!(log.contains("rank1-step:3: aborting now") && log.contains("rank 1"), "the failure must name rank 1:\n{log}");
    assert!(processes_in(&work).is_empty(), "left behind: {:?}", processes_in(&work));
    let kept: Vec<u64> = lora::run::list_checkpoints(&work.join("pvc/checkpoints")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, vec![2], "the checkpoint of step 2 survives the crash in step 3");

    // Another number of ranks is refused, naming the change; the same number resumes and ends
    // where the uninterrupted run did, bit for bit.
    let out = fails(with(train(&work, &model, 3, &[]), FROZEN));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("2 data-parallel ranks") && log.contains("3 data-parallel ranks"), "{log}");
    let out = fails(with(train(&work, &model, 0, &[]), FROZEN));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("2 data-parallel ranks"), "{log}");
    let out = run_ok(with(launched(), FROZEN));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(step 2)"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(adapter_bytes(&work) == adapter_bytes(&whole), "the resumed 2-rank run must end where the uninterrupted one did");
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs `c` until a rank reports (through `LORA_FAULT_INJECT=…:hang`) that it waits to be killed,
/// sends that process SIGKILL from outside, and returns how the run ended and its stderr.
fn kill_the_waiting_rank(mut c: Command) -> (std::process::ExitStatus, String) {
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if let Some(pid) = line.split("process ").nth(1).and_then(|r| r.strip_suffix(" waits to be killed")) {
                let _ = tx.send(pid.to_string());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let Ok(pid) = rx.recv_timeout(Duration::from_secs(300)) else {
        let _ = child.kill();
        panic!("no rank reached the fault point:\n{}", reader.join().unwrap());
    };
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success(), "kill -KILL {pid}");
    // The others must stop by themselves, soon: no hang.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the run did not end within 120 s of rank {pid} being killed:\n{}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, reader.join().unwrap())
}

#[test]
fn a_rank_killed_from_outside_mid_run_stops_the_run_naming_it_and_the_run_resumes() {
    let root = temp_dir("mpi-kill");
    let model = base(&root);
    let whole = root.join("whole");
    run_ok(with(train(&whole, &model, 2, &[]), FROZEN));

    // Rank 1 stops in step 3 (after the checkpoint of step 2) and is killed with SIGKILL there.
    let work = root.join("killed");
    let launched = || train(&work, &model, 0, &["--training-resource-num-procs-per-worker", "2"]);
    let (status, log) = kill_the_waiting_rank(with(launched(), &[FROZEN[0], ("LORA_FAULT_INJECT", "rank1-step:3:hang")]));
    eprintln!("{log}");
    assert!(!status.success(), "the run must fail:\n{log}");
    assert!(log.contains("rank1-step:3:hang"), "{log}");
    // mpirun's own report names the killed rank and the signal.
    assert!(log.contains("rank 1") && (log.contains("signal 9") || log.contains("Killed")), "the failure must name rank 1 and its SIGKILL:\n{log}");
    assert!(processes_in(&work).is_empty(), "left behind: {:?}", processes_in(&work));
    let kept: Vec<u64> = lora::run::list_checkpoints(&work.join("pvc/checkpoints")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, vec![2], "the checkpoint of step 2 survives the kill in step 3");
    assert!(!work.join("out/model/adapter").exists(), "no outputs from a killed run");

    let out = run_ok(with(launched(), FROZEN));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(step 2)"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(adapter_bytes(&work) == adapter_bytes(&whole), "the resumed 2-rank run must end where the uninterrupted one did");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_process_count_that_disagrees_with_mpirun_is_refused_by_name() {
    let root = temp_dir("mpi-count");
    let model = tiny_model(&root.join("base"), DType::F32);
    let out = fails(train(&root, &model, 2, &["--training-resource-num-procs-per-worker", "3"]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("training_resource_num_procs_per_worker") && log.contains("started as 2 processes"), "{log}");
    let _ = std::fs::remove_dir_all(&root);
}
