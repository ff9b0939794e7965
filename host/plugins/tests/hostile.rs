//! Hostile plugins: each attack is stopped with a clear error naming the plugin, the call and
//! the batch, nothing escapes, and the host process carries on (the next test runs in it).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora_api::{ErrorKind, ExtError, Preprocessor, RawRecord, RecordOutcome, RunInfo};
use lora_plugins::{PluginError, PluginOptions, load_preprocessor, load_reporter};
use serde_json::json;

use common::{RecordingTools, options, plugin};

fn records(n: u64) -> Vec<RawRecord> {
    (1..=n)
        .map(|index| RawRecord {
            index,
            source: "data.jsonl".into(),
            value: json!({"text": "hi"}),
            json: None,
        })
        .collect()
}

fn hostile(
    attack: &str,
    arg: &str,
    tweak: impl FnOnce(&mut PluginOptions),
) -> Box<dyn Preprocessor> {
    let (mut opts, _) = options();
    opts.settings = BTreeMap::from([("attack".into(), attack.into()), ("arg".into(), arg.into())]);
    tweak(&mut opts);
    load_preprocessor(
        &plugin("hostile_preprocessor"),
        &opts,
        Arc::new(RecordingTools::default()),
    )
    .unwrap()
}

/// Runs one attack on batch 3 and returns the error, checking what every error must name.
fn attack(attack: &str, arg: &str, tweak: impl FnOnce(&mut PluginOptions)) -> ExtError {
    let mut p = hostile(attack, arg, tweak);
    let result: Result<Vec<RecordOutcome>, ExtError> = p.process_batch(3, &records(2));
    let err = match result {
        Err(e) => e,
        Ok(out) => panic!("attack `{attack}` was not stopped: {out:?}"),
    };
    assert_eq!(err.extension, "plugin:hostile_preprocessor");
    assert_eq!(err.call, "process_batch");
    assert_eq!(err.batch, Some(3));
    assert!(!err.message.contains("ESCAPED"), "{err}");
    eprintln!("{attack}: {err}");
    err
}

fn assert_blocked(err: &ExtError) {
    assert_eq!(err.kind, ErrorKind::Failed, "{err}");
    assert!(err.message.starts_with("blocked:"), "{err}");
}

#[test]
fn reading_etc_passwd_is_denied() {
    let err = attack("read-passwd", "", |_| {});
    assert_blocked(&err);
    assert!(err.message.contains("/etc/passwd"), "{err}");
}

#[test]
fn writing_a_file_without_a_grant_is_denied() {
    let _ = std::fs::remove_file("/tmp/lora-plugin-escape.txt");
    let err = attack("write-file", "", |_| {});
    assert_blocked(&err);
    assert!(!std::path::Path::new("/tmp/lora-plugin-escape.txt").exists());
}

#[test]
fn writing_outside_the_granted_dir_is_denied() {
    let root = tempfile::tempdir().unwrap();
    let granted = root.path().join("granted");
    std::fs::create_dir(&granted).unwrap();
    for target in [
        "/out/../escape.txt",
        "/tmp/escape.txt",
        "/out/../../escape.txt",
        "escape.txt",
    ] {
        let (mut opts, _) = options();
        opts.grants.dir = Some(granted.clone());
        opts.settings = BTreeMap::from([("target".into(), target.into())]);
        let mut r = load_reporter(&plugin("hostile_reporter"), &opts).unwrap();
        let err = r.on_start(&RunInfo {
            run_id: "r".into(),
            params: json!({}),
            total_steps: 1,
            num_epochs: 1,
            steps_per_epoch: 1,
            start_step: 0,
            world_size: 1,
        });
        let err = err.unwrap_err();
        assert_eq!(
            (err.extension.as_str(), err.call.as_str()),
            ("plugin:hostile_reporter", "on_start")
        );
        assert_blocked(&err);
        assert!(!root.path().join("escape.txt").exists(), "{target} escaped");
        assert_eq!(std::fs::read_dir(&granted).unwrap().count(), 0);
    }
}

#[test]
fn opening_a_socket_is_denied() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let err = attack("socket", &addr, |_| {});
    assert_blocked(&err);
    assert!(
        listener.accept().is_err(),
        "the plugin reached the host's listener"
    );
}

#[test]
fn environment_variables_are_not_visible() {
    assert!(
        std::env::var_os("PATH").is_some(),
        "the test needs PATH set in the host"
    );
    let err = attack("env", "", |_| {});
    assert_blocked(&err);
}

#[test]
fn granted_environment_variables_are_the_only_ones_visible() {
    let path = std::env::var("PATH").unwrap();
    let mut p = hostile("env", "", |o| o.grants.env = vec!["PATH".into()]);
    let out = p.process_batch(0, &records(1)).unwrap();
    let text = format!("{:?}", out[0].result);
    assert!(
        text.contains(&format!("PATH={path}")) && !text.contains("HOME="),
        "{text}"
    );
}

#[test]
fn clocks_read_zero_unless_granted() {
    let mut p = hostile("clock", "", |_| {});
    assert_eq!(
        format!("{:?}", p.process_batch(0, &records(1)).unwrap()[0].result),
        r#"Ok([Text { text: "wall clock: 0" }])"#
    );
    let mut p = hostile("clock", "", |o| o.grants.clocks = true);
    assert_ne!(
        format!("{:?}", p.process_batch(0, &records(1)).unwrap()[0].result),
        r#"Ok([Text { text: "wall clock: 0" }])"#
    );
}

/// Protects: a run with plugins is reproducible: the plugin's randomness follows the seed.
#[test]
fn randomness_is_seeded_from_the_run_seed() {
    let draw = |seed: u64| {
        let mut p = hostile("random", "", |o| o.seed = seed);
        format!("{:?}", p.process_batch(0, &records(1)).unwrap()[0].result)
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
}

#[test]
fn allocating_past_the_memory_cap_is_a_limit() {
    let err = attack("alloc", "", |o| o.limits.memory_bytes = 64 << 20);
    assert_eq!(err.kind, ErrorKind::Limit, "{err}");
    assert!(err.message.contains("memory limit of 64 MiB"), "{err}");
}

#[test]
fn an_infinite_loop_hits_the_deadline() {
    let start = Instant::now();
    let err = attack("loop", "", |o| {
        o.limits.deadline = Duration::from_millis(200)
    });
    assert_eq!(err.kind, ErrorKind::Limit, "{err}");
    assert!(err.message.contains("deadline of 200 ms"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn unbounded_recursion_is_a_trap() {
    let err = attack("recursion", "", |_| {});
    assert_eq!(err.kind, ErrorKind::Trap, "{err}");
    assert!(err.message.contains("stack overflow"), "{err}");
}

#[test]
fn a_panic_is_a_trap_with_the_panic_message_and_the_instance_is_not_reentered() {
    let mut p = hostile("panic", "", |_| {});
    let err = p.process_batch(5, &records(1)).unwrap_err();
    assert_eq!((err.kind, err.batch), (ErrorKind::Trap, Some(5)), "{err}");
    assert!(
        err.message
            .contains("deliberate panic in the hostile preprocessor"),
        "{err}"
    );
    let again = p.process_batch(6, &records(1)).unwrap_err();
    assert!(again.message.contains("cannot be called again"), "{again}");
}

#[test]
fn gigantic_output_is_a_limit() {
    let err = attack("huge-output", "40", |o| {
        o.limits.max_output_bytes = 16 << 20
    });
    assert_eq!(err.kind, ErrorKind::Limit, "{err}");
    assert!(err.message.contains("output limit of 16 MiB"), "{err}");
}

#[test]
fn malformed_outcomes_break_the_contract() {
    for (name, needle) in [
        ("wrong-count", "returned 1 outcomes for 2 records"),
        ("wrong-index", "carries index 101"),
        ("bad-mask", "train-mask has 1 entries for 3 tokens"),
        ("empty-chat", "chat sample has no messages"),
    ] {
        let err = attack(name, "", |_| {});
        assert_eq!(err.kind, ErrorKind::Contract, "{name}: {err}");
        assert!(err.message.contains(needle), "{name}: {err}");
    }
}

#[test]
fn a_newer_api_version_is_refused_before_running() {
    let (opts, _) = options();
    let err = load_preprocessor(
        &plugin("hostile_newer_api"),
        &opts,
        Arc::new(RecordingTools::default()),
    )
    .err()
    .unwrap();
    assert!(matches!(err, PluginError::ApiVersion { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("0.2.0")
            && text.contains("newer than")
            && text.contains("0.1.0")
            && text.contains("upgrade lora"),
        "{text}"
    );
}

#[test]
fn a_file_that_is_not_a_component_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("junk.wasm");
    std::fs::write(&path, b"\0asm junk").unwrap();
    let (opts, _) = options();
    let err = load_preprocessor(&path, &opts, Arc::new(RecordingTools::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("junk.wasm") && err.contains("not a valid WebAssembly component"),
        "{err}"
    );
}
