//! Hostile plugins: each attack is stopped with a clear error naming the plugin, the call and
//! the batch, nothing escapes, and the host process carries on (the next test runs in it).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora_api::{
    ErrorKind, ExtError, Preprocessor, RawRecord, RecordOutcome, Reporter, RunInfo,
    ScheduleContext, StepMetrics,
};
use lora_plugins::{PluginError, PluginOptions, load_preprocessor, load_reporter, load_scheduler};
use serde_json::json;

use common::{RecordingTools, options, plugin, wat_plugin};

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

fn run_info() -> RunInfo {
    RunInfo {
        run_id: "r".into(),
        params: json!({}),
        total_steps: 3,
        num_epochs: 1,
        steps_per_epoch: 3,
        start_step: 0,
        world_size: 1,
    }
}

fn step_metrics(step: u64) -> StepMetrics {
    StepMetrics {
        step,
        epoch: step as f64 / 3.0,
        max_steps: 3,
        loss: 1.0,
        grad_norm: 1.0,
        learning_rate: 1e-4,
        tokens: 10,
        trained_tokens: 5,
        tokens_per_second: 1.0,
        elapsed_s: 1.0,
    }
}

fn summary() -> lora_api::RunSummary {
    lora_api::RunSummary {
        total_steps: 3,
        epochs: 1.0,
        train_loss: 1.0,
        final_loss: 1.0,
        min_loss: 1.0,
        final_eval_loss: None,
        final_perplexity: None,
        tokens: 30,
        trained_tokens: 15,
        tokens_per_second: 1.0,
        peak_memory_bytes: 0,
        train_runtime: 1.0,
    }
}

fn schedule_context(settings: &[(&str, &str)]) -> ScheduleContext {
    ScheduleContext {
        base_lr: 2e-4,
        warmup_steps: 0,
        total_steps: 10,
        num_epochs: 1,
        steps_per_epoch: 10,
        settings: settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn reporter(settings: &[(&str, &str)], tweak: impl FnOnce(&mut PluginOptions)) -> Box<dyn Reporter> {
    let (mut opts, _) = options();
    opts.settings = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tweak(&mut opts);
    load_reporter(&plugin("hostile_reporter"), &opts).unwrap()
}

/// Asserts a deadline error of `deadline` for `plugin`'s `call` that came within a bound.
fn assert_deadline(what: &str, err: &ExtError, plugin: &str, call: &str, started: Instant, deadline: Duration) {
    let took = started.elapsed();
    eprintln!("{what}: {took:?}: {err}");
    assert_eq!((err.extension.as_str(), err.call.as_str()), (plugin, call), "{what}: {err}");
    assert_eq!(err.kind, ErrorKind::Limit, "{what}: {err}");
    assert!(
        err.message.contains(&format!("deadline of {} ms", deadline.as_millis())),
        "{what}: {err}"
    );
    assert!(took < deadline + Duration::from_secs(3), "{what} took {took:?}");
}

/// Issue 11, item 1: a guest that sleeps (`std::thread::sleep`) or blocks in `wasi:io/poll` on a
/// far monotonic instant is stopped at its deadline in every call of every kind, though no guest
/// code runs while it waits (the epoch alone never fires then).
#[test]
fn sleeping_or_polling_guests_are_stopped_at_the_deadline_in_every_call() {
    let d = Duration::from_millis(400);
    let tight = |o: &mut PluginOptions| o.limits.deadline = d;
    for attack in ["sleep", "poll-far"] {
        // Preprocessor: `configure` and `process_batch`.
        let (mut opts, _) = options();
        tight(&mut opts);
        opts.settings = BTreeMap::from([("attack".into(), format!("{attack}-configure"))]);
        let t = Instant::now();
        let err = load_preprocessor(&plugin("hostile_preprocessor"), &opts, Arc::new(RecordingTools::default()))
            .err()
            .unwrap();
        let PluginError::Setup(err) = err else { panic!("{err}") };
        assert_deadline(attack, &err, "plugin:hostile_preprocessor", "configure", t, d);
        let t = Instant::now();
        let err = attack_with(attack, tight);
        assert_deadline(attack, &err, "plugin:hostile_preprocessor", "process_batch", t, d);

        // Scheduler: `create`, `learning_rate` (at step 2, after two good steps), `observe_loss`.
        let scheduler = |call: &str| {
            let (mut opts, _) = options();
            tight(&mut opts);
            let settings = [("attack", attack), ("call", call), ("at_step", "2")];
            load_scheduler(&plugin("hostile_scheduler"), &opts, schedule_context(&settings))
        };
        let t = Instant::now();
        let Some(PluginError::Setup(err)) = scheduler("create").err() else { panic!("create did not fail") };
        assert_deadline(attack, &err, "plugin:hostile_scheduler", "create", t, d);
        let mut s = scheduler("learning_rate").unwrap();
        assert_eq!(s.learning_rate(0).unwrap(), 2e-4);
        assert_eq!(s.learning_rate(1).unwrap(), 2e-4);
        let t = Instant::now();
        let err = s.learning_rate(2).unwrap_err();
        assert_deadline(attack, &err, "plugin:hostile_scheduler", "learning_rate", t, d);
        assert_eq!(err.batch, Some(2));
        let mut s = scheduler("observe_loss").unwrap();
        let t = Instant::now();
        let err = s.observe_loss(5, 1.0).unwrap_err();
        assert_deadline(attack, &err, "plugin:hostile_scheduler", "observe_loss", t, d);

        // Reporter: `on_start`, `on_step`, `on_finish`; the instance is not entered again.
        for call in ["on_start", "on_step", "on_finish"] {
            let mut r = reporter(&[("attack", attack), ("call", call)], tight);
            let t = Instant::now();
            let err = match call {
                "on_start" => r.on_start(&run_info()).unwrap_err(),
                "on_step" => {
                    r.on_start(&run_info()).unwrap();
                    r.on_step(&step_metrics(1)).unwrap_err()
                }
                _ => r.on_finish(&summary()).unwrap_err(),
            };
            assert_deadline(attack, &err, "plugin:hostile_reporter", call, t, d);
            let again = r.on_step(&step_metrics(2)).unwrap_err();
            assert!(again.message.contains("cannot be called again"), "{again}");
        }
    }
}

/// Runs an attack of the hostile preprocessor on batch 3 with `tweak`ed options.
fn attack_with(name: &str, tweak: impl FnOnce(&mut PluginOptions)) -> ExtError {
    attack(name, "", tweak)
}

/// Issue 11, item 1 (wasi:http): a reporter that retries a server that never answers cannot
/// stretch one call to many deadlines (each request is capped, and so is the call).
#[test]
fn retrying_a_silent_server_ends_the_call_at_its_deadline() {
    let server = lora_plugins::testing::HttpEndpoint::silent().unwrap();
    let (mut opts, _) = options();
    opts.limits.deadline = Duration::from_millis(1000);
    opts.grants.http = vec![server.origin()];
    opts.settings = BTreeMap::from([
        ("attack".into(), "requests".into()),
        ("url".into(), format!("{}/log", server.origin())),
        ("arg".into(), "50".into()),
    ]);
    let mut r = load_reporter(&plugin("hostile_http_reporter"), &opts).unwrap();
    let t = Instant::now();
    let err = r.on_start(&run_info()).unwrap_err();
    assert_deadline("requests", &err, "plugin:hostile_http_reporter", "on_start", t, opts.limits.deadline);
    assert!(server.requests().len() <= 2, "{} requests in one call", server.requests().len());
}

/// Issue 11, item 6: a plugin cannot print a line that looks like another plugin's or like
/// lora's own `error:`; its log lines, its errors, its per-record errors and its stderr (a
/// panic) all reach the user escaped, on the plugin's own prefixed line.
#[test]
fn plugin_output_cannot_forge_lines_or_terminal_control() {
    let (mut opts, logs) = options();
    opts.settings = BTreeMap::from([("attack".into(), "forge".into())]);
    let mut p = load_preprocessor(&plugin("hostile_preprocessor"), &opts, Arc::new(RecordingTools::default())).unwrap();
    let out = p.process_batch(0, &records(1)).unwrap();
    let logs = logs.lock().unwrap().clone();
    let clean = |s: &str| !s.chars().any(|c| c.is_control());
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(logs[0].starts_with("[plugin:hostile_preprocessor] Info: fine\\n[plugin:csv_reporter]"), "{logs:?}");
    assert!(clean(&logs[0]) && logs[0].contains("\\u{1b}[2K"), "{logs:?}");
    let record_error = out[0].result.as_ref().unwrap_err();
    assert!(clean(record_error) && record_error.contains("bad record\\nerror: forged"), "{record_error}");

    for attack_name in ["forge-error", "forge-panic"] {
        let err = attack(attack_name, "", |_| {});
        let text = err.to_string();
        assert!(clean(&text), "{attack_name}: {text:?}");
        assert!(text.contains("\\nerror: lora: forged"), "{attack_name}: {text}");
    }
}

/// Issue 11, item 7: a scheduler's learning rate must be finite, not negative and at most 1e3;
/// anything else stops the run naming the plugin, the call and the step.
#[test]
fn absurd_learning_rates_are_refused_naming_the_plugin_call_and_step() {
    for value in ["1e300", "1e4", "NaN", "inf", "-1e-5"] {
        let (opts, _) = options();
        let settings = [("attack", "value"), ("arg", value), ("at_step", "3")];
        let mut s = load_scheduler(&plugin("hostile_scheduler"), &opts, schedule_context(&settings)).unwrap();
        for step in 0..3 {
            assert_eq!(s.learning_rate(step).unwrap(), 2e-4);
        }
        let err = s.learning_rate(3).unwrap_err();
        assert_eq!(
            (err.extension.as_str(), err.call.as_str(), err.kind, err.batch),
            ("plugin:hostile_scheduler", "learning_rate", ErrorKind::Contract, Some(3)),
            "{err}"
        );
        assert!(err.message.contains("for step 3") && err.message.contains("at most 1e3"), "{value}: {err}");
    }
    // The bound itself is a valid rate.
    let (opts, _) = options();
    let settings = [("attack", "value"), ("arg", "1000")];
    let mut s = load_scheduler(&plugin("hostile_scheduler"), &opts, schedule_context(&settings)).unwrap();
    assert_eq!(s.learning_rate(0).unwrap(), 1000.0);
}

/// Issue 11, item 2: a plugin cannot create a link that points outside its granted directory,
/// relative ones that climb included; links that stay inside still work.
#[test]
fn symlinks_out_of_the_granted_dir_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let granted = root.path().join("pvc/checkpoints");
    std::fs::create_dir_all(&granted).unwrap();
    std::fs::write(root.path().join("victim.txt"), "precious").unwrap();
    for to in ["../../victim.txt", "../checkpoints/../../victim.txt", "/etc/passwd", "sub/../../victim.txt", ".."] {
        let (mut opts, logs) = options();
        opts.grants.dir = Some(granted.clone());
        opts.settings = [("attack", "symlink"), ("link", "training_metrics.jsonl.tmp"), ("to", to)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut r = load_reporter(&plugin("hostile_reporter"), &opts).unwrap();
        let err = r.on_start(&run_info()).unwrap_err();
        assert_blocked(&err);
        assert!(
            std::fs::symlink_metadata(granted.join("training_metrics.jsonl.tmp")).is_err(),
            "{to}: the link was created"
        );
        let logs = logs.lock().unwrap();
        assert!(logs.iter().any(|l| l.contains("refused to create the symbolic link")), "{to}: {logs:?}");
    }
    let mut r = reporter(&[("attack", "symlink"), ("link", "latest"), ("to", "run-5/metrics.csv")], |o| {
        o.grants.dir = Some(granted.clone())
    });
    r.on_start(&run_info()).unwrap();
    assert_eq!(std::fs::read_link(granted.join("latest")).unwrap(), PathBuf::from("run-5/metrics.csv"));
    assert_eq!(std::fs::read_to_string(root.path().join("victim.txt")).unwrap(), "precious");
}

/// Issue 11, item 8: a component whose imports or exports do not match the contract, or that
/// imports a `wasi:*` interface lora does not link, is refused before running, saying which.
#[test]
fn mismatched_components_say_what_does_not_match() {
    let (opts, _) = options();
    let load = |name: &str| {
        load_preprocessor(&wat_plugin(name), &opts, Arc::new(RecordingTools::default()))
            .err()
            .unwrap()
    };
    let err = load("wrong-import");
    let text = err.to_string();
    assert!(matches!(err, PluginError::Mismatch { .. }), "{text}");
    assert!(text.contains("its imports do not match") && text.contains("lora:plugin/host@0.1.0"), "{text}");
    assert!(!text.contains("trapped"), "{text}");

    let text = load("wrong-export").to_string();
    assert!(text.contains("its exports do not match") && text.contains("type mismatch"), "{text}");
    assert!(!text.contains("trapped"), "{text}");

    let err = load("unknown-wasi");
    assert!(matches!(err, PluginError::UnsupportedImport { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("wasi:frobnicate/thing@0.2.0") && text.contains("WASI 0.2 interfaces"), "{text}");
}

/// Issue 11, item 2: a `grants.dir` that is, or contains, a folder lora writes into is refused,
/// however it is spelled (a link to it, `..`); a folder of the plugin's own next to it is fine.
#[test]
fn grants_where_lora_writes_are_refused_however_spelled() {
    let root = tempfile::tempdir().unwrap();
    let pvc = root.path().join("pvc");
    std::fs::create_dir_all(pvc.join("checkpoints")).unwrap();
    std::fs::create_dir_all(pvc.join("metrics")).unwrap();
    std::os::unix::fs::symlink(pvc.join("checkpoints"), root.path().join("alias")).unwrap();
    let reserved = vec![
        (pvc.join("checkpoints"), "its checkpoints".to_string()),
        (pvc.join("final_model"), "the final model".to_string()), // not created yet
    ];
    let set = |dir: &std::path::Path| {
        let config = json!({"reporter": {"grants": {"dir": dir}}}).to_string();
        let plugins = format!("reporter={}", plugin("hostile_reporter").display());
        lora_plugins::PluginSet::from_params(&plugins, &config, 0).unwrap()
    };
    for (dir, needle) in [
        (pvc.join("checkpoints"), "is where lora writes its checkpoints"),
        (root.path().join("alias"), "is where lora writes its checkpoints"),
        (pvc.join("metrics/../checkpoints"), "is where lora writes its checkpoints"),
        (pvc.clone(), "contains"),
        (root.path().to_path_buf(), "contains"),
    ] {
        let err = set(&dir).check_dir_grants(&reserved).unwrap_err();
        assert!(matches!(err, PluginError::Grant { grant: "dir", .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("plugin:hostile_reporter") && text.contains(needle) && text.contains("a folder of its own"), "{}: {text}", dir.display());
    }
    set(&pvc.join("metrics")).check_dir_grants(&reserved).unwrap();
    set(&pvc.join("checkpoints/reporter")).check_dir_grants(&reserved).unwrap();
}
