//! The example plugins, run through the `lora-api` traits exactly as a run would.

mod common;

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::sync::Arc;

use lora_api::{RawRecord, RunInfo, Sample, ScheduleContext, StepMetrics};
use lora_plugins::{PluginSet, load_preprocessor, load_reporter, load_scheduler};
use serde_json::json;

use common::{RecordingTools, options, plugin};

fn ticket(index: u64, value: serde_json::Value) -> RawRecord {
    RawRecord {
        index,
        source: "tickets.jsonl".into(),
        value,
        json: None,
    }
}

fn tickets() -> Vec<RawRecord> {
    vec![
        ticket(
            1,
            json!({"id": "T-1", "messages": [
                {"from": "customer", "body": "My card was charged twice. Reach me at jane.doe@example.com or +1 (555) 010-4477."},
                {"from": "agent", "body": "Sorry Jane! I refunded one charge; confirmation sent to jane.doe@example.com."}
            ]}),
        ),
        ticket(
            2,
            json!({"id": "T-2", "messages": [{"from": "customer", "body": "Nobody answered: call 030 1234567"}]}),
        ),
        ticket(
            3,
            json!({"id": "T-3", "messages": [{"from": "robot", "body": "hi"}]}),
        ),
    ]
}

/// Protects: personal data in tickets never reaches the samples nor the tokenizer.
#[test]
fn ticket_redactor_redacts_before_anything_reaches_the_tokenizer() {
    let (mut opts, _) = options();
    opts.settings = BTreeMap::from([
        ("system_prompt".into(), "You are a support agent.".into()),
        ("max_tokens".into(), "200".into()),
    ]);
    let tools = Arc::new(RecordingTools::default());
    let mut p = load_preprocessor(&plugin("ticket_redactor"), &opts, tools.clone()).unwrap();
    assert_eq!(p.name(), "plugin:ticket_redactor");
    let out = p.process_batch(0, &tickets()).unwrap();

    assert_eq!(out.len(), 3);
    let Ok(samples) = &out[0].result else {
        panic!("record 1 failed: {:?}", out[0].result)
    };
    let Sample::Chat { messages } = &samples[0] else {
        panic!("not a chat sample: {samples:?}")
    };
    let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant"]);
    assert_eq!(
        messages[1].content,
        "My card was charged twice. Reach me at [EMAIL] or [PHONE]."
    );
    assert_eq!(
        messages[2].content,
        "Sorry Jane! I refunded one charge; confirmation sent to [EMAIL]."
    );
    assert_eq!(
        out[1].result,
        Ok(vec![]),
        "a ticket without an agent reply is dropped"
    );
    let Err(e) = &out[2].result else {
        panic!("record 3 should be a record error")
    };
    assert!(e.contains("messages[0].from") && e.contains("robot"), "{e}");

    let seen = tools.seen.lock().unwrap();
    assert!(
        !seen.is_empty(),
        "max_tokens must make the plugin use the tokenizer"
    );
    for text in seen.iter() {
        assert!(
            !text.contains("jane.doe@example.com") && !text.contains("010-4477"),
            "unredacted text reached the tokenizer: {text}"
        );
    }
}

/// Protects: a record's source text (a JSONL line, as the reader kept it) is what the guest gets,
/// not the parsed value written out again; without text, the value is serialized.
#[test]
fn the_guest_gets_the_records_source_text_when_the_reader_kept_it() {
    let (opts, _) = options();
    let mut p = load_preprocessor(
        &plugin("ticket_redactor"),
        &opts,
        Arc::new(RecordingTools::default()),
    )
    .unwrap();
    assert!(p.wants_json_text(), "a WASM preprocessor asks readers for the text");
    let line = r#"{ "messages" : [ {"from":"customer","body":"from the line"}, {"from":"agent","body":"ok"} ] }"#;
    let mut with_text = ticket(7, json!({"messages": [{"from": "customer", "body": "from the value"}, {"from": "agent", "body": "ok"}]}));
    with_text.json = Some(line.to_string());
    let without_text = ticket(8, with_text.value.clone());
    let out = p.process_batch(0, &[with_text, without_text]).unwrap();
    let first_user = |i: usize| match &out[i].result {
        Ok(samples) => match &samples[0] {
            Sample::Chat { messages } => messages[0].content.clone(),
            other => panic!("not chat: {other:?}"),
        },
        Err(e) => panic!("record failed: {e}"),
    };
    assert_eq!(first_user(0), "from the line");
    assert_eq!(first_user(1), "from the value");
}

#[test]
fn ticket_redactor_refuses_unknown_settings_by_name() {
    let (mut opts, _) = options();
    opts.settings = BTreeMap::from([("email_tokn".into(), "x".into())]);
    let err = load_preprocessor(
        &plugin("ticket_redactor"),
        &opts,
        Arc::new(RecordingTools::default()),
    )
    .err()
    .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("plugin:ticket_redactor")
            && text.contains("configure")
            && text.contains("email_tokn"),
        "{text}"
    );
}

fn ctx(warmup: u64, total: u64, settings: &[(&str, &str)]) -> ScheduleContext {
    ScheduleContext {
        base_lr: 2e-4,
        warmup_steps: warmup,
        total_steps: total,
        num_epochs: 1,
        steps_per_epoch: total,
        settings: settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// transformers' `get_cosine_schedule_with_warmup` (num_cycles 0.5), natively.
fn native_cosine(base: f64, warmup: u64, total: u64, step: u64) -> f64 {
    let factor = if step < warmup {
        step as f64 / warmup.max(1) as f64
    } else {
        let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        f64::max(0.0, 0.5 * (1.0 + libm::cos(PI * 0.5 * 2.0 * progress)))
    };
    base * factor
}

/// `a` and `b` agree to within 1e-15 of the peak learning rate (for formulas this file writes in
/// a different order of operations than the plugin does).
fn assert_close(a: f64, b: f64, peak: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-15 * peak,
        "{what}: {a:e} vs {b:e} (difference {:e})",
        (a - b).abs()
    );
}

/// Protects: a WASM implementation of a schedule gives the same learning rates as the native one.
#[test]
fn wasm_cosine_equals_native_cosine() {
    let (opts, _) = options();
    let mut steps = 0;
    for (warmup, total) in [(10, 1000), (0, 37), (5, 5), (3, 1), (100, 4321), (0, 1)] {
        let mut s = load_scheduler(&plugin("schedules"), &opts, ctx(warmup, total, &[])).unwrap();
        for step in 0..total + 3 {
            let wasm = s.learning_rate(step).unwrap();
            let native = native_cosine(2e-4, warmup, total, step);
            assert_eq!(
                wasm.to_bits(),
                native.to_bits(),
                "warmup {warmup}, total {total}, step {step}: WASM {wasm:e} vs native {native:e}"
            );
            steps += 1;
        }
    }
    assert!(steps > 5000);
}

#[test]
fn one_cycle_follows_pytorch_formula() {
    let (opts, _) = options();
    let total = 100u64;
    let mut s = load_scheduler(
        &plugin("schedules"),
        &opts,
        ctx(
            0,
            total,
            &[("schedule", "one_cycle"), ("pct_start", "0.25")],
        ),
    )
    .unwrap();
    let (max, initial) = (2e-4, 2e-4 / 25.0);
    let min = initial / 1e4;
    let (p1, p2) = (0.25 * total as f64 - 1.0, total as f64 - 1.0);
    let cos = |a: f64, b: f64, pct: f64| b + (a - b) / 2.0 * ((PI * pct).cos() + 1.0);
    for step in 0..total {
        let x = step as f64;
        let want = if x <= p1 {
            cos(initial, max, x / p1)
        } else {
            cos(max, min, (x - p1) / (p2 - p1))
        };
        assert_close(
            s.learning_rate(step).unwrap(),
            want,
            max,
            &format!("step {step}"),
        );
    }
    assert_close(s.learning_rate(0).unwrap(), initial, max, "step 0");
    assert!((s.learning_rate(24).unwrap() - max).abs() < 1e-18);
}

/// Protects: `observe_loss` reaches the plugin and drives an adaptive schedule.
#[test]
fn plateau_halves_the_rate_after_patience_steps_without_improvement() {
    let (opts, logs) = options();
    let mut s = load_scheduler(
        &plugin("schedules"),
        &opts,
        ctx(2, 100, &[("schedule", "plateau"), ("patience", "3")]),
    )
    .unwrap();
    assert_eq!(s.learning_rate(0).unwrap(), 0.0);
    assert_eq!(s.learning_rate(1).unwrap(), 1e-4);
    let losses = [9.0, 9.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5];
    let mut lrs = Vec::new();
    for (step, loss) in losses.iter().enumerate() {
        s.observe_loss(step as u64, *loss).unwrap();
        lrs.push(s.learning_rate(step as u64 + 1).unwrap());
    }
    // Steps 0-1 are warmup; best 2.0 then 1.0 at step 3; steps 4..7 do not improve: after the
    // 4th (> patience 3) the rate halves.
    assert_eq!(&lrs[2..], &[2e-4, 2e-4, 2e-4, 2e-4, 2e-4, 1e-4, 1e-4]);
    assert!(
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("plugin:schedules") && l.contains("plateaued")),
        "{logs:?}"
    );
}

#[test]
fn scheduler_errors_name_the_setting() {
    let (opts, _) = options();
    let err = load_scheduler(
        &plugin("schedules"),
        &opts,
        ctx(0, 10, &[("schedule", "zigzag")]),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("plugin:schedules") && err.contains("create") && err.contains("zigzag"),
        "{err}"
    );
}

fn step(step: u64) -> StepMetrics {
    StepMetrics {
        step,
        epoch: step as f64 / 10.0,
        max_steps: 10,
        loss: 3.0 / step as f64,
        grad_norm: 0.5,
        learning_rate: 1e-4,
        tokens: 100,
        trained_tokens: 60,
        tokens_per_second: 1000.0,
        elapsed_s: step as f64,
    }
}

fn run_info() -> RunInfo {
    RunInfo {
        run_id: "r1".into(),
        params: json!({"training_lora_r": 16}),
        total_steps: 10,
        num_epochs: 1,
        steps_per_epoch: 10,
        start_step: 0,
        world_size: 1,
    }
}

/// Protects: the reporter writes one row per `on_step`, only inside its granted directory.
#[test]
fn csv_reporter_writes_one_row_per_step_in_its_granted_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (mut opts, _) = options();
    opts.grants.dir = Some(dir.path().to_path_buf());
    opts.settings = BTreeMap::from([("file".into(), "steps.csv".into())]);
    let mut r = load_reporter(&plugin("csv_reporter"), &opts).unwrap();
    r.on_start(&run_info()).unwrap();
    for s in 1..=7 {
        r.on_step(&step(s)).unwrap();
    }
    let text = std::fs::read_to_string(dir.path().join("steps.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    assert!(lines[0].starts_with("step,epoch,loss"));
    assert_eq!(lines[3], "3,0.3,1,0.5,0.0001,100,60,1000,3");
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "the reporter wrote only its file");
}

#[test]
fn csv_reporter_without_a_grant_fails_clearly() {
    let (opts, _) = options();
    let mut r = load_reporter(&plugin("csv_reporter"), &opts).unwrap();
    let err = r.on_start(&run_info()).unwrap_err();
    assert_eq!(err.kind, lora_api::ErrorKind::Failed);
    assert!(
        err.message.contains("/out/metrics.csv") && err.message.contains("granted"),
        "{err}"
    );
}

/// The run's parameters, end to end: names, config keyed by kind and by stem, grants, seeds.
#[test]
fn plugin_set_from_params_loads_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = format!(
        "preprocessor={},scheduler={}, reporter={}",
        plugin("ticket_redactor").display(),
        plugin("schedules").display(),
        plugin("csv_reporter").display()
    );
    let config = json!({
        "scheduler": {"settings": {"schedule": "one_cycle"}, "deadline_ms": 2000},
        "schedules": {"settings": {"pct_start": 0.5}},
        "csv_reporter": {"grants": {"dir": dir.path()}, "memory_mib": 64}
    })
    .to_string();
    let mut set = PluginSet::from_params(&plugins, &config, 7).unwrap();
    set.set_cache_dir(None);
    let sched = set.scheduler.as_ref().unwrap();
    assert_eq!(
        sched.options.settings.get("schedule").map(String::as_str),
        Some("one_cycle")
    );
    assert_eq!(
        sched.options.settings.get("pct_start").map(String::as_str),
        Some("0.5")
    );
    assert_eq!(sched.options.limits.deadline.as_millis(), 2000);
    assert_eq!(set.reporters[0].options.limits.memory_bytes, 64 << 20);
    assert_ne!(
        set.preprocessor.as_ref().unwrap().options.seed,
        sched.options.seed
    );

    let mut s = set.load_scheduler(ctx(0, 10, &[])).unwrap().unwrap();
    assert_close(
        s.learning_rate(0).unwrap(),
        2e-4 / 25.0,
        2e-4,
        "one-cycle step 0",
    );
    let mut reporters = set.load_reporters().unwrap();
    reporters[0].on_start(&run_info()).unwrap();
    assert!(dir.path().join("metrics.csv").is_file());
    let p = set
        .load_preprocessor(Arc::new(RecordingTools::default()))
        .unwrap()
        .unwrap();
    assert_eq!(p.name(), "plugin:ticket_redactor");
}

#[test]
fn plugin_parameters_are_refused_with_the_parameter_named() {
    let sched = plugin("schedules");
    let cases = [
        ("scheduler".to_string(), "", "training_plugins", "kind=path"),
        (
            "optimizer=/x.wasm".to_string(),
            "",
            "training_plugins",
            "unknown kind `optimizer`",
        ),
        (
            "scheduler=/no/such.wasm".to_string(),
            "",
            "training_plugins",
            "/no/such.wasm",
        ),
        (
            format!("scheduler={0},scheduler={0}", sched.display()),
            "",
            "training_plugins",
            "stem",
        ),
        (
            format!("scheduler={}", sched.display()),
            "[1]",
            "training_plugin_config",
            "JSON object",
        ),
        (
            format!("scheduler={}", sched.display()),
            r#"{"reporter": {}}"#,
            "training_plugin_config",
            "`reporter` names no plugin",
        ),
        (
            format!("scheduler={}", sched.display()),
            r#"{"scheduler": {"memory": 1}}"#,
            "training_plugin_config",
            "memory",
        ),
        (
            format!("scheduler={}", sched.display()),
            r#"{"scheduler": {"grants": {"dir": "/tmp"}}}"#,
            "training_plugin_config",
            "reporters only",
        ),
        (
            format!("scheduler={}", sched.display()),
            r#"{"scheduler": {"grants": {"http": ["api.wandb.ai"]}}}"#,
            "training_plugin_config",
            "wasi:http",
        ),
        (
            format!("scheduler={}", sched.display()),
            r#"{"scheduler": {"deadline_ms": 0}}"#,
            "training_plugin_config",
            "greater than 0",
        ),
        (
            format!("scheduler={}", sched.display()),
            r#"{"scheduler": {"settings": {"a": [1]}}}"#,
            "training_plugin_config",
            "settings.a",
        ),
    ];
    for (plugins, config, param, needle) in cases {
        let err = PluginSet::from_params(&plugins, config, 0)
            .err()
            .unwrap_or_else(|| panic!("accepted {plugins} / {config}"));
        let text = err.to_string();
        assert!(
            text.starts_with(param) && text.contains(needle),
            "{plugins} / {config}: {text}"
        );
    }
    assert!(PluginSet::from_params("", "", 0).unwrap().is_empty());
}

#[test]
fn wrong_kind_is_refused_by_name() {
    let (opts, _) = options();
    let err = load_reporter(&plugin("schedules"), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("is a scheduler plugin") && err.contains("reporter"),
        "{err}"
    );
}

#[test]
fn inspect_shows_kind_version_imports_and_grants() {
    let i = lora_plugins::inspect(
        &plugin("ticket_redactor"),
        r#"{"preprocessor": {"memory_mib": 128}}"#,
    )
    .unwrap();
    assert_eq!(i.kind, lora_plugins::PluginKind::Preprocessor);
    assert_eq!(i.api_version, "0.1.0");
    assert_eq!(i.sdk_stamp.as_deref(), Some("0.1.0"));
    assert!(
        i.imports
            .iter()
            .any(|n| n == "lora:plugin/text-tools@0.1.0"),
        "{:?}",
        i.imports
    );
    let text = i.to_string();
    assert!(
        text.contains("kind:        preprocessor")
            && text.contains("filesystem: none")
            && text.contains("memory 128 MiB"),
        "{text}"
    );
}

#[test]
fn check_runs_each_kind_on_sample_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("tickets.jsonl");
    let lines: Vec<String> = tickets().iter().map(|r| r.value.to_string()).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let report = lora_plugins::check(&plugin("ticket_redactor"), Some(&input), "", None).unwrap();
    let text = report.to_string();
    assert!(
        text.contains("record 1: {\"kind\":\"chat\"") && text.contains("[EMAIL]"),
        "{text}"
    );
    assert!(
        text.contains("record 2: dropped") && text.contains("record 3: error"),
        "{text}"
    );
    assert_eq!(report.record_errors, 1);

    let report = lora_plugins::check(&plugin("schedules"), None, "", None).unwrap();
    assert_eq!(report.lines.len(), 100);

    let out = tempfile::tempdir().unwrap();
    let config = json!({"reporter": {"grants": {"dir": out.path()}}}).to_string();
    let report = lora_plugins::check(&plugin("csv_reporter"), None, &config, None).unwrap();
    assert!(report.to_string().contains("metrics.csv"), "{report}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        6
    );
}

#[test]
fn compiled_components_are_cached_on_disk_by_content_hash() {
    use sha2::Digest;
    let cache = tempfile::tempdir().unwrap();
    let (mut opts, _) = options();
    opts.cache_dir = Some(cache.path().to_path_buf());
    // No other test in this binary loads this component, so it is compiled here, not taken from
    // the in-process cache.
    let _ = load_reporter(&plugin("hostile_reporter"), &opts).unwrap();
    let files: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let hash: String = sha2::Sha256::digest(std::fs::read(plugin("hostile_reporter")).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with(&hash) && files[0].ends_with(".cwasm"),
        "{files:?}"
    );
}

/// Protects: a second process finds the compiled component on disk instead of compiling again.
#[test]
fn precompile_fills_the_disk_cache_and_then_reads_it() {
    use lora_plugins::{CacheOutcome, precompile};
    let cache = tempfile::tempdir().unwrap();
    assert_eq!(
        precompile(&plugin("schedules"), cache.path()).unwrap(),
        CacheOutcome::Compiled
    );
    assert_eq!(
        precompile(&plugin("schedules"), cache.path()).unwrap(),
        CacheOutcome::Disk
    );
}

/// Protects: an SDK method a plugin did not implement fails clearly, naming the method.
#[test]
fn unimplemented_sdk_methods_name_themselves() {
    let (opts, _) = options();
    // The hostile reporter implements only `on_start`.
    let mut r = load_reporter(&plugin("hostile_reporter"), &opts).unwrap();
    let err = r.on_step(&step(4)).unwrap_err();
    assert_eq!(
        (err.kind, err.call.as_str(), err.batch),
        (lora_api::ErrorKind::Failed, "on_step", Some(4))
    );
    assert!(
        err.message
            .contains("does not implement `Reporter::on_step`"),
        "{err}"
    );
    r.on_eval(&lora_api::EvalMetrics {
        step: 4,
        epoch: 0.4,
        eval_loss: 1.0,
        perplexity: 1.0f64.exp(),
        eval_tokens: 9,
    })
    .unwrap();
}
