//! The example plugins, run through the `lora-api` traits exactly as a run would.

mod common;

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::sync::Arc;

use lora_api::{
    CheckpointInfo, EvalMetrics, RawRecord, RunInfo, RunSummary, Sample, ScheduleContext,
    StepMetrics,
};
use lora_plugins::testing::HttpEndpoint;
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

fn summary() -> RunSummary {
    RunSummary {
        total_steps: 3,
        epochs: 1.0,
        train_loss: 2.0,
        final_loss: 1.0,
        min_loss: 1.0,
        final_eval_loss: Some(1.5),
        final_perplexity: Some(1.5f64.exp()),
        tokens: 300,
        trained_tokens: 180,
        tokens_per_second: 1000.0,
        peak_memory_bytes: 1 << 30,
        train_runtime: 3.0,
    }
}

fn webhook(url: &str, http: &[String], extra: &[(&str, &str)]) -> lora_plugins::PluginOptions {
    let (mut opts, _) = options();
    opts.settings = BTreeMap::from([("url".to_string(), url.to_string())]);
    opts.settings
        .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    opts.grants.http = http.to_vec();
    opts
}

/// Protects: a reporter granted one host reaches it over real HTTP, with every event of a run,
/// and with a token it was granted through the environment.
#[test]
fn webhook_reporter_posts_every_event_to_its_granted_host() {
    let server = HttpEndpoint::start(200).unwrap();
    let var = "LORA_TEST_WEBHOOK_TOKEN_7f3a";
    // SAFETY: a variable no other test reads or writes.
    unsafe { std::env::set_var(var, "s3cret") };
    let mut opts = webhook(
        &format!("{}/hooks/lora?team=ml", server.origin()),
        &[server.origin()],
        &[("bearer_token_env", var)],
    );
    opts.grants.env = vec![var.to_string()];
    let mut r = load_reporter(&plugin("webhook_reporter"), &opts).unwrap();
    r.on_start(&run_info()).unwrap();
    for s in 1..=3 {
        r.on_step(&step(s)).unwrap();
    }
    r.on_eval(&EvalMetrics { step: 3, epoch: 0.3, eval_loss: 1.5, perplexity: 1.5f64.exp(), eval_tokens: 40 })
        .unwrap();
    r.on_checkpoint(&CheckpointInfo { step: 3, epoch: 0.3, path: "/pvc/checkpoint-3".into() })
        .unwrap();
    r.on_finish(&summary()).unwrap();

    let got = server.requests();
    let events: Vec<String> = got.iter().map(|q| q.json()["event"].as_str().unwrap_or("?").to_string()).collect();
    assert_eq!(events, ["start", "step", "step", "step", "eval", "checkpoint", "finish"]);
    for q in &got {
        assert_eq!((q.method.as_str(), q.path.as_str()), ("POST", "/hooks/lora?team=ml"));
        assert_eq!(q.header("content-type"), Some("application/json"));
        assert_eq!(q.header("authorization"), Some("Bearer s3cret"));
        assert_eq!(q.json()["run_id"], "r1");
    }
    assert_eq!(got[0].json()["params"]["training_lora_r"], 16);
    assert_eq!(got[2].json()["step"], 2);
    assert_eq!(got[2].json()["loss"], 1.5);
    assert_eq!(got[5].json()["path"], "/pvc/checkpoint-3");
    assert_eq!(got[6].json()["final_eval_loss"], 1.5);
}

/// Protects: a request to a host outside the grant never leaves the host process; the call fails
/// naming the plugin, the call and the denied host. With `on_error=warn` the run goes on.
#[test]
fn webhook_requests_outside_the_grant_are_denied_and_named() {
    let server = HttpEndpoint::start(200).unwrap();
    let other = HttpEndpoint::start(200).unwrap();
    let opts = webhook(&server.origin(), &[other.origin()], &[]);
    let mut r = load_reporter(&plugin("webhook_reporter"), &opts).unwrap();
    let err = r.on_start(&run_info()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("plugin:webhook_reporter") && text.contains("on_start"), "{text}");
    assert!(
        text.contains(&format!("lora denied the request to http://127.0.0.1:{}: not in `grants.http` ({})", server.port, other.origin()))
            && text.contains("grants.http"),
        "{text}"
    );
    assert!(server.requests().is_empty() && other.requests().is_empty());

    let (_, logs) = options();
    let mut opts = webhook(&server.origin(), &[other.origin()], &[("on_error", "warn")]);
    let sink = logs.clone();
    opts.log = Arc::new(move |p, l, m| sink.lock().unwrap().push(format!("[{p}] {l:?}: {m}")));
    let mut r = load_reporter(&plugin("webhook_reporter"), &opts).unwrap();
    r.on_start(&run_info()).unwrap();
    r.on_step(&step(1)).unwrap();
    let logs = logs.lock().unwrap();
    assert!(logs.iter().any(|l| l.contains("Warn") && l.contains("denied a request")), "{logs:?}");
    assert!(server.requests().is_empty());
}

/// Protects: a reporter that imports wasi:http is refused at load without a grant (saying which
/// grant), and a grant for another kind of plugin is refused.
#[test]
fn wasi_http_needs_a_grant_and_a_reporter() {
    let opts = webhook("http://127.0.0.1:9/", &[], &[]);
    let err = load_reporter(&plugin("webhook_reporter"), &opts).err().unwrap().to_string();
    assert!(err.contains("wasi:http") && err.contains("grants.http"), "{err}");

    let (mut opts, _) = options();
    opts.grants.http = vec!["127.0.0.1:9".into()];
    let err = load_scheduler(&plugin("schedules"), &opts, ctx(0, 10, &[])).err().unwrap().to_string();
    assert!(err.contains("only reporters may be granted wasi:http"), "{err}");
}

/// Protects: a server that accepts but never answers cannot hold the run past the plugin's
/// per-call deadline.
#[test]
fn a_silent_server_is_cut_off_at_the_deadline() {
    let server = HttpEndpoint::silent().unwrap();
    let mut opts = webhook(&server.origin(), &[server.origin()], &[]);
    opts.limits.deadline = std::time::Duration::from_millis(800);
    let mut r = load_reporter(&plugin("webhook_reporter"), &opts).unwrap();
    let t = std::time::Instant::now();
    let err = r.on_start(&run_info()).unwrap_err();
    let took = t.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    assert!(err.to_string().contains("plugin:webhook_reporter") && err.to_string().contains("no response within the deadline"), "{err}");
    assert_eq!(server.requests().len(), 1, "the request reached the server");
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
            "`grants.http` is for reporters only",
        ),
        (
            format!("reporter={}", plugin("csv_reporter").display()),
            r#"{"reporter": {"grants": {"http": ["https://metrics.internal/api"]}}}"#,
            "training_plugin_config",
            "`reporter.grants.http`: entry 1 `https://metrics.internal/api`: give a host",
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
            && text.contains("memory 128 MiB")
            && text.contains("network:    none"),
        "{text}"
    );

    // A reporter that imports wasi:http shows it, and what it would be allowed to reach.
    let text = lora_plugins::inspect(&plugin("webhook_reporter"), "").unwrap().to_string();
    assert!(text.contains("it imports wasi:http, so it is refused unless `grants.http`"), "{text}");
    let i = lora_plugins::inspect(
        &plugin("webhook_reporter"),
        r#"{"reporter": {"grants": {"http": ["https://metrics.internal"]}}}"#,
    )
    .unwrap();
    assert!(
        i.imports.iter().any(|n| n.starts_with("wasi:http/outgoing-handler@0.2")),
        "{:?}",
        i.imports
    );
    let text = i.to_string();
    assert!(
        text.contains("network:    wasi:http to https://metrics.internal only (no sockets)"),
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
    let (mut opts, _) = options();
    // The hostile HTTP reporter implements only `on_start` (and imports wasi:http: a grant).
    opts.grants.http = vec!["127.0.0.1:9".into()];
    let mut r = load_reporter(&plugin("hostile_http_reporter"), &opts).unwrap();
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
