//! Issue 11, items 4 and 5: everything a hostile guest can make the host hold or write counts
//! against its limits, measured here (the host's resident memory, the bytes printed, the bytes on
//! disk) with the margin each limit promises.
//!
//! One test per resource, each measuring its own growth; the memory-measuring ones share a lock
//! so no other test in this binary allocates while they measure.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lora_api::{ErrorKind, ExtError, Preprocessor, RawRecord, RunInfo};
use lora_plugins::{PluginOptions, load_preprocessor, load_reporter};
use serde_json::json;

use common::{RecordingTools, options, plugin, reset_peak_rss, rss_bytes, wat_plugin};

const MIB: u64 = 1 << 20;

/// Serialises the tests that measure this process's memory.
static MEASURING: Mutex<()> = Mutex::new(());

fn records(n: u64) -> Vec<RawRecord> {
    (1..=n)
        .map(|index| RawRecord { index, source: "data.jsonl".into(), value: json!({"text": "hi"}), json: None })
        .collect()
}

fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn run_info() -> RunInfo {
    RunInfo { run_id: "r".into(), params: json!({}), total_steps: 1, num_epochs: 1, steps_per_epoch: 1, start_step: 0, world_size: 1 }
}

/// Runs `f` and returns its result with the growth of this process's peak resident memory.
fn peak_growth<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let can_reset = reset_peak_rss();
    let (before, _) = rss_bytes();
    let r = f();
    let (now, peak) = rss_bytes();
    let top = if can_reset { peak } else { now };
    (r, top.saturating_sub(before))
}

fn preprocessor(pairs: &[(&str, &str)], tweak: impl FnOnce(&mut PluginOptions)) -> Box<dyn Preprocessor> {
    let (mut opts, _) = options();
    opts.settings = settings(pairs);
    tweak(&mut opts);
    load_preprocessor(&plugin("hostile_preprocessor"), &opts, Arc::new(RecordingTools::default())).unwrap()
}

fn assert_limit(what: &str, err: &ExtError, needle: &str) {
    eprintln!("{what}: {err}");
    assert_eq!(err.kind, ErrorKind::Limit, "{what}: {err}");
    assert!(err.message.contains(needle), "{what}: {err}");
}

/// 100 tables of 2^20 function references (about 800 MiB of table storage on the host) under a
/// 16 MiB cap: refused while instantiating, and the host grew by less than the cap plus 16 MiB.
#[test]
fn tables_count_against_the_memory_cap() {
    let path = wat_plugin("table-bomb");
    let _m = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let (opts, _) = options();
    let mut opts = opts;
    opts.limits.memory_bytes = 16 * MIB;
    let (err, grew) = peak_growth(|| load_preprocessor(&path, &opts, Arc::new(RecordingTools::default())).err().unwrap());
    let text = err.to_string();
    eprintln!("table bomb: host peak +{} MiB: {text}", grew / MIB);
    assert!(text.contains("memory limit of 16 MiB") && text.contains("1048576 elements"), "{text}");
    assert!(grew < 32 * MIB, "the host grew by {} MiB", grew / MIB);
}

/// Header maps (`wasi:http` fields) live on the host, outside the guest's memory: a reporter
/// keeping thousands alive is stopped at the host-resource cap that follows `memory_mib`, and the
/// host grows by about the cap (two caps plus slack allowed).
#[test]
fn wasi_http_header_maps_count_against_the_host_resource_cap() {
    let _m = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let (mut opts, _) = options();
    opts.limits.memory_bytes = 16 * MIB;
    opts.grants.http = vec!["127.0.0.1:9".into()];
    opts.settings = settings(&[("attack", "header-bomb")]);
    let mut r = load_reporter(&plugin("hostile_http_reporter"), &opts).unwrap();
    let (err, grew) = peak_growth(|| r.on_start(&run_info()).unwrap_err());
    eprintln!("header bomb: host peak +{} MiB", grew / MIB);
    assert_limit("header bomb", &err, "more than 256 host resources");
    assert!(grew < 2 * 16 * MIB + 16 * MIB, "the host grew by {} MiB", grew / MIB);
}

/// A preprocessor asking the host to tokenize 24 MiB in one call is refused before the
/// tokenizer sees it (the host's work grows with the input: it once took 5 GiB and a minute).
#[test]
fn text_tools_inputs_are_capped_before_any_host_work() {
    let _m = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let tools = Arc::new(RecordingTools::default());
    let (mut opts, _) = options();
    opts.settings = settings(&[("attack", "encode-huge"), ("arg", "24")]);
    let mut p = load_preprocessor(&plugin("hostile_preprocessor"), &opts, tools.clone()).unwrap();
    let t = Instant::now();
    let (err, grew) = peak_growth(|| p.process_batch(0, &records(1)).unwrap_err());
    eprintln!("encode 24 MiB: {:?}, host peak +{} MiB", t.elapsed(), grew / MIB);
    assert_limit("encode", &err, "more than the limit of 1024 KiB per call (`max_text_input_kib`)");
    assert!(tools.seen.lock().unwrap().is_empty(), "the tokenizer was called");
    assert!(t.elapsed() < Duration::from_secs(10));
    // The guest's string (24 MiB) and its copy into the host (24 MiB); no tokenizer work.
    assert!(grew < 3 * 24 * MIB, "the host grew by {} MiB", grew / MIB);
}

/// Two million empty samples are not free: each counts what the host holds for it, so the flood
/// hits the output limit (once it passed as 0 bytes).
#[test]
fn empty_samples_count_against_the_output_limit() {
    let _m = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = preprocessor(&[("attack", "empty-flood")], |_| {});
    let (err, grew) = peak_growth(|| p.process_batch(0, &records(2)).unwrap_err());
    eprintln!("2M empty samples: host peak +{} MiB", grew / MIB);
    assert_limit("empty flood", &err, "output limit of 64 MiB (`max_output_mib`)");
    assert!(grew < 64 * MIB + 64 * MIB, "the host grew by {} MiB", grew / MIB);
}

/// A result over 128 MiB is reported as the output limit, not as wasmtime's "fuel for hostcalls
/// exhausted".
#[test]
fn a_result_past_the_output_limit_says_so() {
    let _m = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = preprocessor(&[("attack", "huge-output"), ("arg", "200")], |_| {});
    let err = p.process_batch(0, &records(1)).unwrap_err();
    assert_limit("200 MiB", &err, "output limit of 64 MiB (`max_output_mib`)");
    assert!(!err.message.contains("fuel"), "{err}");
}

/// `log()` in a loop (a million 1 KiB lines in one call) prints at most the per-call cap plus
/// two notices, and the call itself succeeds.
#[test]
fn log_floods_are_capped_per_call() {
    let (mut opts, logs) = options();
    opts.settings = settings(&[("attack", "log-flood")]);
    let mut p = load_preprocessor(&plugin("hostile_preprocessor"), &opts, Arc::new(RecordingTools::default())).unwrap();
    p.process_batch(0, &records(1)).unwrap();
    let logs = logs.lock().unwrap();
    let bytes: usize = logs.iter().map(String::len).sum();
    eprintln!("log flood: {} lines, {} KiB printed", logs.len(), bytes >> 10);
    assert!(logs.len() <= 256 + 2, "{} lines", logs.len());
    assert!(bytes <= (64 << 10) + 64 * 256 + 1024, "{bytes} bytes");
    assert!(logs.iter().any(|l| l.contains("log limit reached")), "no notice");
    assert!(logs.last().unwrap().contains("log lines of `process_batch` were suppressed"), "{:?}", logs.last());
}

/// A reporter writing 4 GiB into its granted directory is stopped at its quota (`max_dir_mib`),
/// naming it, with at most one write (1 MiB) past it on disk; so is one creating a million files.
#[test]
fn granted_directories_have_a_disk_quota() {
    for (attack, arg) in [("fill", "4096"), ("files", "1000000")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("before.bin"), vec![0u8; 4 << 20]).unwrap();
        let (mut opts, _) = options();
        opts.grants.dir = Some(dir.path().to_path_buf());
        opts.limits.max_dir_bytes = 8 * MIB;
        opts.settings = settings(&[("attack", attack), ("arg", arg)]);
        let mut r = load_reporter(&plugin("hostile_reporter"), &opts).unwrap();
        let t = Instant::now();
        let err = r.on_start(&run_info()).unwrap_err();
        let on_disk = du(dir.path());
        eprintln!("{attack}: {:?}, {} KiB on disk", t.elapsed(), on_disk >> 10);
        assert_limit(attack, &err, "directory quota of 8 MiB");
        assert!(err.message.contains(&dir.path().display().to_string()), "{err}");
        // What was there (4 MiB) does not count; the plugin added at most its quota.
        assert!(on_disk <= 4 * MIB + 8 * MIB + MIB, "{} KiB on disk", on_disk >> 10);
    }
}

/// Disk space in use under `root` (allocated blocks).
fn du(root: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() { du(&e.path()) } else { m.blocks() * 512 }
        })
        .sum()
}

/// A full disk under a plugin's directory ends the call naming the plugin and the directory (a
/// real small filesystem: tmpfs, where this process may mount one).
#[test]
fn a_full_disk_names_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root); the quota test covers the limit");
        return;
    }
    let (mut opts, _) = options();
    opts.grants.dir = Some(dir.path().to_path_buf());
    opts.settings = settings(&[("attack", "fill"), ("arg", "64")]);
    let mut r = load_reporter(&plugin("hostile_reporter"), &opts).unwrap();
    let err = r.on_start(&run_info());
    let _ = std::process::Command::new("umount").arg(dir.path()).status();
    let err = err.unwrap_err();
    assert_eq!(err.extension, "plugin:hostile_reporter");
    assert_limit("full disk", &err, "is full");
    assert!(err.message.contains(&dir.path().display().to_string()), "{err}");
}
