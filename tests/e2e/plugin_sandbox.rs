//! Issue 11, items 1-8, through the real binary: hostile plugins in `lora train`, `--dry-run` and
//! `lora plugin check` fail clearly, in bounded time, naming the plugin, and harm nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lora_engine::DType;
use serde_json::{Value, json};

use super::{SMALL, build_guest_plugins};
use crate::common::*;

fn hostile() -> PathBuf {
    build_guest_plugins(&["hostile-reporter", "hostile-scheduler", "hostile-preprocessor", "webhook-reporter"])
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_contains(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "missing `{n}` in:\n{text}");
    }
}

/// The issue's command: `lora plugin check rep_sleep.wasm --plugin-config
/// '{"reporter":{"deadline_ms":1000}}'` (the reporter told to sleep in `on_start`) returns within
/// a bound, exit 1, naming the plugin, the call and the deadline. It used to never return.
#[test]
fn plugin_check_of_a_sleeping_reporter_returns_at_its_deadline() {
    let dir = temp_dir("check-sleep");
    let wasm = dir.join("rep_sleep.wasm");
    std::fs::copy(hostile().join("hostile_reporter.wasm"), &wasm).unwrap();
    let config = r#"{"reporter":{"deadline_ms":1000,"settings":{"attack":"sleep"}}}"#;
    let t = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["plugin", "check"])
        .arg(&wasm)
        .args(["--plugin-config", config])
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()
        .unwrap();
    let took = t.elapsed();
    let stderr = stderr_of(&out);
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_contains(&stderr, &["plugin:rep_sleep", "on_start", "per-call deadline of 1000 ms"]);
}

/// A `lora train` whose reporter sleeps in `on_step` (at step 3) fails with a clear error instead
/// of hanging; the checkpoints written before it (steps 1 and 2) are complete and intact.
#[test]
fn a_run_whose_reporter_sleeps_fails_at_the_deadline_and_keeps_its_checkpoints() {
    let base = temp_dir("sleep-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("sleep-run");
    let plugins = format!("reporter={}", hostile().join("hostile_reporter.wasm").display());
    let config = json!({"reporter": {"deadline_ms": 1000,
        "settings": {"attack": "sleep", "call": "on_step", "at_step": "3"}}})
    .to_string();
    let args = [SMALL, &["--training-num-epochs", "2", "--training-save-steps", "1", "--training-plugins", &plugins, "--training-plugin-config", &config]].concat();
    let t = Instant::now();
    let out = train_cmd(&work, &model, &capitals(), &args).output().unwrap();
    let stderr = stderr_of(&out);
    assert!(t.elapsed() < Duration::from_secs(120), "took {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_contains(&stderr, &["plugin:hostile_reporter", "on_step", "step 3", "per-call deadline of 1000 ms"]);
    let steps: Vec<u64> = lora::checkpoint::list(&work.join("pvc/checkpoints")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![1, 2], "complete checkpoints before the failing step");
    for (_, dir) in lora::checkpoint::list(&work.join("pvc/checkpoints")) {
        let adapter = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        lora::checkpoint::decode_safetensors(&adapter, &dir).unwrap();
    }
    assert!(!work.join("out/model/model.safetensors").exists());
}

/// The issue's attack: a reporter granted `<pvc_path>/checkpoints` plants
/// `training_metrics.jsonl.tmp -> ../../victim.txt`. The grant itself is refused (exit 2, before
/// anything runs, naming the plugin and why); granted a folder of its own, the plugin cannot plant
/// the link (the run fails naming it). The victim is untouched either way.
#[test]
fn a_planted_link_cannot_make_lora_overwrite_a_file_outside_the_workspace() {
    let base = temp_dir("link-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("link-run");
    let victim = work.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let checkpoints = work.join("pvc/checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    let plugins = format!("reporter={}", hostile().join("hostile_reporter.wasm").display());
    let attack = |dir: &Path, link: &str| {
        json!({"reporter": {"grants": {"dir": dir},
            "settings": {"attack": "symlink", "link": link, "to": "../../victim.txt"}}})
        .to_string()
    };
    let args = |config: &str| -> Vec<String> {
        [SMALL, &["--training-num-epochs", "1", "--training-plugins", &plugins, "--training-plugin-config", config]]
            .concat()
            .into_iter()
            .map(String::from)
            .collect()
    };

    let config = attack(&checkpoints, "training_metrics.jsonl.tmp");
    for dry in [true, false] {
        let mut a = args(&config);
        if dry {
            a.push("--dry-run".into());
            a.push("--json".into());
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = train_cmd(&work, &model, &capitals(), &a).output().unwrap();
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "dry run {dry}: {stderr}");
        assert_contains(&stderr, &["plugin:hostile_reporter", "grant dir", "checkpoints", "where lora writes", "a folder of its own"]);
    }
    assert!(std::fs::symlink_metadata(checkpoints.join("training_metrics.jsonl.tmp")).is_err());

    let own = work.join("pvc/reporter");
    std::fs::create_dir_all(&own).unwrap();
    let a = args(&attack(&own, "training_metrics.jsonl.tmp"));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = train_cmd(&work, &model, &capitals(), &a).output().unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_contains(&stderr, &["plugin:hostile_reporter", "on_start", "blocked: linking", "refused to create the symbolic link"]);
    assert!(std::fs::symlink_metadata(own.join("training_metrics.jsonl.tmp")).is_err());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

/// Secrets in `training_envs` (and secret-looking plugin settings) never reach a reporter, the
/// manifest in the outputs or a checkpoint, nor `--dry-run`'s plan: each shows `<hidden>`.
#[test]
fn secret_parameters_are_hidden_from_plugins_manifests_and_dry_runs() {
    let server = lora_plugins::testing::HttpEndpoint::start(200).unwrap();
    let base = temp_dir("secret-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("secret-run");
    let plugins = format!("reporter={}", hostile().join("webhook_reporter.wasm").display());
    let config = json!({"reporter": {"settings": {"url": format!("{}/lora", server.origin())},
        "grants": {"http": [server.origin()]}}})
    .to_string();
    let secret = "hf_SECRET_value_7f3a";
    let envs = format!("HF_TOKEN={secret},TOKENIZERS_PARALLELISM=false,WANDB_API_KEY=k_{secret}");
    let args = [SMALL, &["--training-num-epochs", "1", "--training-plugins", &plugins, "--training-plugin-config", &config, "--training-envs", &envs]].concat();

    let mut dry = args.clone();
    dry.push("--dry-run");
    dry.push("--json");
    let plan = run_ok(train_cmd(&work, &model, &capitals(), &dry));
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(!plan.contains(secret), "{plan}");
    assert_contains(&plan, &["HF_TOKEN=<hidden>", "TOKENIZERS_PARALLELISM=false", "plugins_checked"]);
    assert!(server.requests().is_empty(), "a dry run sent a request");

    run_ok(train_cmd(&work, &model, &capitals(), &args));
    let start = server.requests().into_iter().map(|q| q.json()).find(|e| e["event"] == "start").unwrap();
    assert_eq!(start["params"]["training_envs"], "HF_TOKEN=<hidden>,TOKENIZERS_PARALLELISM=false,WANDB_API_KEY=<hidden>", "{start}");
    let mut written = vec![work.join("out/model/run_manifest.json")];
    written.extend(lora::checkpoint::list(&work.join("pvc/checkpoints")).into_iter().map(|(_, d)| d.join("run_manifest.json")));
    for f in written.iter().filter(|f| f.is_file()) {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(!text.contains(secret), "{} holds the secret", f.display());
    }
    assert!(written[0].is_file());
}

/// `--dry-run` loads every plugin as the run would: a garbage `.wasm` and a plugin whose
/// `configure` refuses its settings both fail it with exit 2, naming them; good ones are listed.
#[test]
fn a_dry_run_loads_and_checks_every_plugin() {
    let base = temp_dir("dry-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("dry-run");
    let garbage = work.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x0d\0\x01\0 not really").unwrap();
    let dry = |plugins: String, config: &str| {
        let args = [&["--dry-run", "--json", "--training-plugins", &plugins, "--training-plugin-config", config][..], SMALL].concat();
        train_cmd(&work, &model, &capitals(), &args).output().unwrap()
    };
    let out = dry(format!("reporter={}", garbage.display()), "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert_contains(&stderr_of(&out), &["garbage.wasm", "not a valid WebAssembly component"]);

    let wasm = hostile();
    let out = dry(format!("scheduler={}", wasm.join("hostile_scheduler.wasm").display()), "");
    let plan: Value = serde_json::from_slice(&run_ok_output(out)).unwrap();
    let checked = plan["inputs"]["plugins_checked"].as_array().unwrap();
    assert!(checked[0].as_str().unwrap().contains("plugin:hostile_scheduler"), "{plan}");

    let out = dry(format!("reporter={}", wasm.join("hostile_reporter.wasm").display()), r#"{"reporter": {"settings": {"no_such": "1"}}}"#);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert_contains(&stderr_of(&out), &["plugin:hostile_reporter", "configure", "no_such"]);
    assert!(!work.join("out").exists() && !work.join("pvc").exists(), "a dry run wrote something");
}

fn run_ok_output(out: std::process::Output) -> Vec<u8> {
    assert!(out.status.success(), "{}", stderr_of(&out));
    out.stdout
}

/// A scheduler returning 1e300 at step 2 stops the run there, naming the plugin, the call and the
/// step, before the optimizer uses it (it used to write a checkpoint full of NaN marked complete
/// and blame "the loss diverged").
#[test]
fn an_absurd_learning_rate_stops_the_run_naming_the_scheduler() {
    let base = temp_dir("lr-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("lr-run");
    let plugins = format!("scheduler={}", hostile().join("hostile_scheduler.wasm").display());
    let config = r#"{"scheduler": {"settings": {"attack": "value", "arg": "1e300", "at_step": "2"}}}"#;
    let args = [SMALL, &["--training-num-epochs", "2", "--training-save-steps", "1", "--training-plugins", &plugins, "--training-plugin-config", config]].concat();
    let out = train_cmd(&work, &model, &capitals(), &args).output().unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_contains(&stderr, &["plugin:hostile_scheduler", "learning_rate", "1e300", "for step 2"]);
    assert!(!stderr.contains("diverged"), "{stderr}");
    let steps: Vec<u64> = lora::checkpoint::list(&work.join("pvc/checkpoints")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![1, 2]);
}

/// `lora plugin check --model` with the real tokenizer: a preprocessor asking it to encode 24 MiB
/// in one call is refused at once (it used to take minutes and gigabytes past its deadline).
#[test]
fn plugin_check_refuses_a_huge_encode_before_tokenizing() {
    let dir = temp_dir("check-encode");
    let model = tiny_model(&dir.join("model"), DType::F32);
    let input = dir.join("records.jsonl");
    std::fs::write(&input, "{\"text\": \"hi\"}\n").unwrap();
    let t = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["plugin", "check"])
        .arg(hostile().join("hostile_preprocessor.wasm"))
        .arg("--input")
        .arg(&input)
        .arg("--model")
        .arg(&model)
        .args(["--plugin-config", r#"{"preprocessor": {"settings": {"attack": "encode-huge", "arg": "24"}}}"#])
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()
        .unwrap();
    let stderr = stderr_of(&out);
    eprintln!("encode of 24 MiB refused in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_contains(&stderr, &["plugin:hostile_preprocessor", "process_batch", "max_text_input_kib"]);
}
