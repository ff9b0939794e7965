//! Runs and their outputs under interruption and bad input (issue 11, items 7 and 9–14): kills at
//! every stage (training, checkpoint writing, pruning, output writing and publishing) end in
//! outputs byte-identical to an uninterrupted run's; a failed run never replaces an earlier
//! run's outputs; a damaged checkpoint is never resumed; bad model folders fail before anything.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{SMALL, jsonl};
use crate::common::*;
use lora_engine::DType;
use serde_json::Value;

/// Every file under `root` (relative path → bytes), leaving out the workspace lock (it names the
/// pid that holds it) and the processed-data cache (not an output).
fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            if rel == "pvc/.lora.lock" || rel.contains("_internal_data_processing") || rel == "base" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(&p, root, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Asserts two runs left the same files with the same bytes, naming the first that differs.
fn assert_same_files(got: &Path, want: &Path) {
    let (a, b) = (files(got), files(want));
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "the runs left different files");
    for (name, bytes) in &a {
        if bytes != &b[name] {
            let (x, y) = (String::from_utf8_lossy(bytes), String::from_utf8_lossy(&b[name]));
            let line = x.lines().zip(y.lines()).find(|(l, r)| l != r);
            panic!("{name} differs from the uninterrupted run's (first differing line: {line:?})");
        }
    }
}

/// Hidden leftovers next to the outputs and in the workspace (temp and moved-aside paths).
fn leftovers(work: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for dir in [work.join("out"), work.join("pvc"), work.join("pvc/checkpoints")] {
        for e in std::fs::read_dir(&dir).into_iter().flatten() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            if name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-")) {
                out.push(format!("{}/{name}", dir.display()));
            }
        }
    }
    out
}

fn steps(work: &Path) -> Vec<u64> {
    lora::checkpoint::list(&work.join("pvc/checkpoints")).into_iter().map(|(s, _)| s).collect()
}

/// A run with every timing frozen (`LORA_TEST_FROZEN_CLOCK=1`): its outputs are reproducible to
/// the byte, so an interrupted run can be compared with an uninterrupted one file by file.
fn frozen(work: &Path, model: &Path, args: &[&str]) -> Command {
    let mut c = train_cmd(work, model, &capitals(), args);
    c.env("LORA_TEST_FROZEN_CLOCK", "1");
    c
}

/// Starts the run, SIGKILLs it when a stderr line starts with `prefix`; returns the lines seen.
fn kill_at(mut c: Command, prefix: &str) -> Vec<String> {
    let mut child = c.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let hit = line.starts_with(prefix);
        lines.push(line);
        if hit {
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(lines.last().is_some_and(|l| l.starts_with(prefix)) && !status.success(), "expected to kill the run at `{prefix}`: {lines:?}");
    lines
}

/// Runs with `LORA_FAULT_INJECT=<point>` (an abort, as a SIGKILL would) and returns stderr.
fn abort_at(mut c: Command, point: &str) -> String {
    c.env("LORA_FAULT_INJECT", point);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && stderr.contains(&format!("LORA_FAULT_INJECT={point}: aborting now")), "{point}: {stderr}");
    stderr
}

/// The kill campaign (issue 11 items 11, 12): the same training as an uninterrupted run, killed
/// after a logged step, half-way through writing a checkpoint, after a checkpoint's rename and
/// before its pruning, after every output is staged, and half-way through publishing the outputs;
/// each time started again on the same workspace. In the end every output file, checkpoint and
/// metric is byte-identical to the uninterrupted run's (`training_train_loss` too, which lost a
/// bit when losses were read back from a checkpoint), and nothing a killed run left remains.
#[test]
fn killed_runs_resume_to_byte_identical_outputs() {
    let base = temp_dir("kill-base");
    let model = tiny_model(&base, DType::F32);
    // 9 steps; logging every 2, checkpoints every step (2 kept): resumes land inside logging
    // intervals and every save prunes.
    let args = [SMALL, &["--training-num-epochs", "3", "--training-save-steps", "1", "--training-logging-steps", "2", "--training-lora-dropout", "0.1", "--training-save-total-limit", "2"]].concat();
    let reference = temp_dir("kill-ref");
    run_ok(frozen(&reference, &model, &args));

    let work = temp_dir("kill-work");
    // 1. SIGKILL right after step 2 is logged.
    kill_at(frozen(&work, &model, &args), "step 2/");
    // 2. Abort half-way through writing checkpoint 5.
    let err = abort_at(frozen(&work, &model, &args), "checkpoint-mid:5");
    assert!(err.contains("resuming from"), "the second start resumes: {err}");
    // 3. Abort after checkpoint 6 is renamed into place, before pruning: one too many is left.
    abort_at(frozen(&work, &model, &args), "checkpoint-prune:6");
    assert_eq!(steps(&work), vec![4, 5, 6], "a kill before pruning leaves more than training_save_total_limit");
    // 4. The next start prunes them; SIGKILL it after step 8.
    let seen = kill_at(frozen(&work, &model, &args), "step 8/");
    assert!(seen.iter().any(|l| l.contains("removed 1 checkpoint(s) beyond training_save_total_limit=2")), "{seen:?}");
    // 5. Abort once every output is staged, before any is published: nothing is published.
    abort_at(frozen(&work, &model, &args), "outputs-staged:9");
    assert!(!work.join("out/model").exists() && !work.join("out/metrics.json").exists());
    assert!(leftovers(&work).iter().any(|l| l.contains("/.model.tmp-")), "{:?}", leftovers(&work));
    // 6. Finish: the run is found complete, the outputs are written and the leftovers removed.
    let out = run_ok(frozen(&work, &model, &args));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resuming from") && err.contains("left by a run that was stopped"), "{err}");
    assert_eq!(leftovers(&work), Vec::<String>::new());
    // 7. Again, aborted half-way through publishing over those outputs: a reader sees no
    //    output_model (never a complete-looking one with another run's files).
    abort_at(frozen(&work, &model, &args), "outputs-publish:9");
    assert!(!work.join("out/model").exists(), "output_model is published last");
    assert!(leftovers(&work).iter().any(|l| l.contains("/.model.old-")), "{:?}", leftovers(&work));
    // 8. Run to the end.
    run_ok(frozen(&work, &model, &args));
    assert_eq!(leftovers(&work), Vec::<String>::new());
    assert_eq!(steps(&work), vec![8, 9]);
    let rows = jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl"));
    let logged: Vec<u64> = rows.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(logged, vec![2, 4, 6, 8, 9], "training_metrics.jsonl has each logged step once");
    assert_same_files(&work, &reference);
}

/// Issue 11 item 13, the attack as written: one low mantissa bit flipped inside the newest
/// checkpoint's adapter. The run finds it by the hashes in the checkpoint's `complete` marker,
/// says so, resumes from the checkpoint before it, and ends with the uninterrupted run's adapter.
#[test]
fn a_flipped_bit_in_a_checkpoint_is_found_and_the_previous_one_resumed() {
    let base = temp_dir("flip-base");
    let model = tiny_model(&base, DType::F32);
    let args = [SMALL, &["--training-num-epochs", "2", "--training-save-steps", "1", "--training-save-total-limit", "3"]].concat();
    let work = temp_dir("flip");
    run_ok(frozen(&work, &model, &args));
    let first = adapter_bytes(&work);
    let path = work.join("pvc/checkpoints/checkpoint-6/adapter_model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 4 * 1000; // the lowest byte (mantissa) of an f32 in the data
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let out = run_ok(frozen(&work, &model, &args));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checkpoint-6/adapter_model.safetensors is damaged: its sha256 is"), "{err}");
    assert!(err.contains("checkpoint-6.damaged") && err.contains("checkpoint-5 (step 5)"), "{err}");
    assert!(adapter_bytes(&work) == first, "the resumed run's adapter differs from the run's before the flip");
    assert!(work.join("pvc/checkpoints/checkpoint-6/complete").is_file(), "step 6 was trained and checkpointed again");
}

/// Issue 11 items 10 and 7: a run that fails (here its optimizer meets a learning rate too large
/// for f32, or a checkpoint of a diverged adapter is refused) leaves the earlier run's outputs as
/// they were, byte for byte, and no temp files; the error names the step, the learning rate and
/// the scheduler, and the hint promises a resume only when there is a checkpoint to resume from.
#[test]
fn a_failed_run_never_replaces_an_earlier_runs_outputs() {
    let base = temp_dir("failed-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("failed");
    let args = ["--training-effective-batch-size", "8", "--training-num-epochs", "1"];
    run_ok(train_cmd(&work, &model, &capitals(), &args));
    let before = files(&work.join("out"));
    // A new run writing the same outputs (its own workspace).
    let other = |extra: &[&str]| {
        let _ = std::fs::remove_dir_all(work.join("pvc2"));
        let args = [args.as_slice(), &["--training-lr-warmup-steps", "0", "--training-save-steps", "1"], extra].concat();
        train_cmd_at(&work, &work.join("pvc2"), &model, &capitals(), &args).output().unwrap()
    };
    // Each case: flags, what stderr must name, and how it says no checkpoint exists.
    let diverged = "with no checkpoint of it to resume from";
    #[cfg_attr(not(feature = "plugins"), allow(unused_mut))]
    let mut cases: Vec<(Vec<String>, Vec<String>, &str)> = vec![
        (vec!["1e39".into()], vec!["optimizer step 1: the learning rate of step 1 was 1e39, from the built-in `linear` schedule".into(), "must be non-negative and finite in f32".into()], diverged),
        (
            vec!["1e38".into()],
            vec![
                "training diverged at step 1: the learning rate of step 1 was 1e38, from the built-in `linear` schedule".into(),
                "not writing checkpoint-1:".into(),
                "after step 1; the adapter or its optimizer state is no longer finite".into(),
            ],
            diverged,
        ),
    ];
    // The same rate from a scheduler plugin is a broken plugin contract (rates above 1e3 are
    // refused before they reach the optimizer), naming the plugin and its call.
    #[cfg(feature = "plugins")]
    {
        let wasm = super::build_guest_plugins(&["schedules"]).join("schedules.wasm");
        let config = r#"{"scheduler": {"settings": {"schedule": "cosine"}}}"#;
        cases.push((
            vec!["1e38".into(), "--training-plugins".into(), format!("scheduler={}", wasm.display()), "--training-plugin-config".into(), config.into()],
            vec![
                "broke the plugin contract in `learning_rate`".into(),
                "returned learning rate 1e38 for step 0; it must be finite, not negative and at most 1e3".into(),
            ],
            "no checkpoint was written",
        ));
    }
    for (flags, needles, no_checkpoint) in &cases {
        let mut extra = vec!["--training-learning-rate"];
        extra.extend(flags.iter().map(String::as_str));
        let out = other(&extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n.as_str()), "missing `{n}`: {stderr}");
        }
        assert!(stderr.contains(no_checkpoint) && !stderr.contains("resumes from"), "{stderr}");
        assert!(lora::checkpoint::list(&work.join("pvc2/checkpoints")).is_empty(), "no checkpoint of a diverged adapter");
        assert!(files(&work.join("out")) == before, "the failed run changed the earlier outputs");
        assert_eq!(leftovers(&work), Vec::<String>::new());
    }
}

/// Issue 11 item 14: a missing tokenizer or weight shard, and a `training_max_seq_len` the model
/// cannot take, exit 2 before anything is loaded (they exited 1 after loading the data, with the
/// "rerun resumes" hint); RoPE scaling allows a longer length with a warning, recorded in the
/// run manifest.
#[test]
fn bad_model_folders_exit_2_before_anything_is_loaded() {
    let base = temp_dir("badmodel-base");
    let model = tiny_model(&base.join("m"), DType::F32);
    let copy = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&model).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        edit(&dir);
        dir
    };
    let no_tokenizer = copy("no-tokenizer", &|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    let missing_shard = copy("missing-shard", &|d| {
        std::fs::rename(d.join("model.safetensors"), d.join("model-00001-of-00002.safetensors")).unwrap();
        let index = serde_json::json!({"metadata": {}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"}});
        std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    });
    let set_config = |d: &Path, key: &str, v: Value| {
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        cfg[key] = v;
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    };
    let scaled = copy("rope-linear", &|d| set_config(d, "rope_scaling", serde_json::json!({"rope_type": "linear", "factor": 4.0})));
    let long = ["--training-max-seq-len", "8192", "--training-max-tokens-per-gpu", "8192"];
    for (dir, extra, needle) in [
        (&no_tokenizer, &[][..], "no-tokenizer has no tokenizer.json"),
        (&missing_shard, &[][..], "model.safetensors.index.json lists the shard model-00002-of-00002.safetensors, which is not in the folder"),
        (&model, &long[..], "training_max_seq_len = 8192 is above the model's max_position_embeddings 4096"),
        (&scaled, &["--training-max-seq-len", "20000", "--training-max-tokens-per-gpu", "20000"][..], "even with its linear RoPE scaling (factor 4: 16384 positions)"),
    ] {
        for dry in [false, true] {
            let work = temp_dir("badmodel");
            let mut c = train_cmd(&work, dir, &capitals(), &[SMALL, extra].concat());
            if dry {
                c.args(["--dry-run", "--json"]);
            }
            let out = c.output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains(needle) && stderr.contains("hint: `--dry-run`"), "missing `{needle}`: {stderr}");
            assert!(!stderr.contains("lora: dataset"), "the data was prepared first: {stderr}");
        }
    }
    // Within the scaled window: accepted, warned and recorded.
    let work = temp_dir("badmodel-scaled");
    let out = run_ok(train_cmd(&work, &scaled, &capitals(), &[SMALL, &long[..]].concat()));
    let warning = "training_max_seq_len = 8192 is above the model's max_position_embeddings 4096: sequences past it rely on the model's linear RoPE scaling (factor 4, up to 16384 positions)";
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("lora: warning: {warning}")));
    let manifest: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/run_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["notes"], serde_json::json!([warning]));
}

/// Issue 11 item 12: every value written out is the value given: `adapter_config.json`, the
/// metrics, the run manifest and a checkpoint's trainer state say 0.1 for a dropout of 0.1
/// (adapter_config.json said 0.10000000149011612), and the metrics' train loss is the mean of the
/// losses as logged. Also (item 9) a run with a latin-1 byte in an unrelated variable works.
#[test]
fn values_written_out_are_the_values_given() {
    use std::os::unix::ffi::OsStrExt;
    let base = temp_dir("values-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("values");
    let args = [SMALL, &["--training-num-epochs", "1", "--training-lora-dropout", "0.1", "--training-learning-rate", "3e-4", "--training-weight-decay", "0.07", "--training-lora-alpha", "24"]].concat();
    let mut c = train_cmd(&work, &model, &capitals(), &args);
    c.env("SOME_VAR", std::ffi::OsStr::from_bytes(b"caf\xe9"));
    run_ok(c);
    let read = |p: &str| -> (String, Value) {
        let text = std::fs::read_to_string(work.join(p)).unwrap();
        let v = serde_json::from_str(&text).unwrap();
        (text, v)
    };
    let (text, cfg) = read("out/model/adapter/adapter_config.json");
    assert!(text.contains("\"lora_dropout\": 0.1,") && text.contains("\"lora_alpha\": 24,"), "{text}");
    assert_eq!(cfg["lora_dropout"].as_f64(), Some(0.1));
    let (_, metrics) = read("out/metrics.json");
    assert_eq!((metrics["lora_dropout"].as_f64(), metrics["learning_rate"].as_f64()), (Some(0.1), Some(3e-4)));
    let (_, manifest) = read("out/model/run_manifest.json");
    let params = &manifest["params"];
    assert_eq!((params["training_lora_dropout"].as_f64(), params["training_weight_decay"].as_f64()), (Some(0.1), Some(0.07)));
    let (_, state) = read("pvc/checkpoints/checkpoint-3/trainer_state.json");
    assert_eq!(state["trainer"]["adapter"]["lora_dropout"].as_f64(), Some(0.1));
    assert_eq!(state["trainer"]["optim"]["weight_decay"].as_f64(), Some(0.07));
    let losses: Vec<f64> = state["history"]["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).collect();
    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
    assert_eq!(metrics["training_train_loss"].as_f64(), Some(mean), "train loss from the losses as written");
}

/// Issue 11 item 11: a second run on a workspace another run holds is refused (it would mix its
/// checkpoints in and remove the other's temp folders).
#[test]
fn a_second_run_on_a_busy_workspace_is_refused() {
    let base = temp_dir("busy-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("busy");
    std::fs::create_dir_all(work.join("pvc")).unwrap();
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(work.join("pvc/.lora.lock")).unwrap();
    lock.lock().unwrap();
    let out = train_cmd(&work, &model, &capitals(), SMALL).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("another lora run is using the workspace") && stderr.contains(".lora.lock"), "{stderr}");
    drop(lock);
    run_ok(train_cmd(&work, &model, &capitals(), &[SMALL, &["--training-num-epochs", "1"]].concat()));
}
