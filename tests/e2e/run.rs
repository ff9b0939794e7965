//! End-to-end tests of `lora train`: the real binary in a temp dir, a tiny model made here
//! (random weights, real SmolLM2 tokenizer), the learnable `examples/data/capitals.jsonl`.
//!
//! Run: `cargo test -p lora --test e2e`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;
use lora_data::{DataConfig, DatasetSource, HfTextTools};
use lora_engine::{AdapterConfig, DType, LoadOptions, Model, OptimConfig, Trainer};
use serde_json::Value;

/// 24 Q/A pairs, batch 8: 3 optimizer steps per epoch.
const SMALL: &[&str] = &["--training-effective-batch-size", "8", "--training-lr-warmup-steps", "1"];

fn jsonl(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn train_writes_every_output() {
    let work = temp_dir("outputs");
    let model = tiny_model(&work.join("base"), DType::BF16);
    let args = [SMALL, &["--training-num-epochs", "2", "--training-validation-split", "0.25", "--training-eval-steps", "2", "--training-save-steps", "2"]].concat();
    let out = run_ok(train_cmd(&work, &model, &capitals(), &args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("step 1/"), "plain per-step log lines when not a terminal:\n{stderr}");

    let m = work.join("out/model");
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "run_manifest.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"] {
        assert!(m.join(f).is_file(), "output_model lacks {f}");
    }
    // The merged model keeps the base dtype and size (bf16 in, bf16 out).
    let base_len = std::fs::metadata(model.join("model.safetensors")).unwrap().len();
    let merged_len = std::fs::metadata(m.join("model.safetensors")).unwrap().len();
    assert!((merged_len as i64 - base_len as i64).abs() < 4096, "merged {merged_len} vs base {base_len} bytes");
    let cfg: Value = serde_json::from_slice(&std::fs::read(m.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 16);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    // final_model is a copy.
    assert_eq!(std::fs::read(work.join("pvc/final_model/adapter/adapter_model.safetensors")).unwrap(), adapter_bytes(&work));

    let metrics: Value = serde_json::from_slice(&std::fs::read(work.join("out/metrics.json")).unwrap()).unwrap();
    for k in ["training_final_loss", "training_min_loss", "training_eval_loss", "training_perplexity", "training_steps", "training_tokens_per_second", "lora_r", "learning_rate", "num_epochs"] {
        assert!(metrics[k].is_number(), "metrics lack {k}: {metrics}");
    }
    // 24 records, 6 held out for validation: 18 / batch 8 = 3 steps per epoch, 2 epochs.
    assert_eq!(metrics["training_steps"], 6.0, "{metrics}");

    let rows = jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl"));
    let steps: Vec<u64> = rows.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>());
    assert!(rows.iter().any(|r| r.get("eval_loss").is_some()), "eval rows");
    assert!(rows.last().unwrap().get("train_runtime").is_some(), "totals row last");

    let chart = std::fs::read_to_string(work.join("out/loss_chart.html")).unwrap();
    assert!(chart.contains("<svg") && chart.contains("Training loss") && !chart.contains("http://") && !chart.contains("https://"));
    let ckpts = lora::checkpoint::list(&work.join("pvc/checkpoints"));
    assert!(!ckpts.is_empty(), "checkpoints written");
}

/// Mean loss per trained token of `model_dir` on the capitals set (a fresh adapter has B = 0, so
/// this is the model folder's own loss).
fn loss_on_capitals(model_dir: &std::path::Path, tokenizer_dir: &std::path::Path) -> f64 {
    let tools = HfTextTools::from_dir(tokenizer_dir).unwrap();
    let cfg = DataConfig { max_seq_len: 256, max_tokens_per_gpu: 1024, effective_batch_size: 24, num_epochs: 1, ..DataConfig::default() };
    let source = DatasetSource::from_path(&capitals()).unwrap();
    let mut pre = lora_data::builtin_preprocessor(&cfg);
    let data = lora_data::prepare(&cfg, &source, pre.as_mut(), &tools).unwrap();
    let model = Model::load(model_dir, &LoadOptions::cpu()).unwrap();
    let trainer = Trainer::new(model, AdapterConfig::default(), OptimConfig::default(), 1).unwrap();
    let (mut loss, mut n) = (0.0, 0usize);
    for step in data.epoch_plan(0).steps {
        for mb in &step.micro_batches {
            let mut b = lora_engine::Batch::default();
            for r in &mb.rows {
                b.input_ids.extend(&r.input_ids);
                b.train_mask.extend(&r.train_mask);
                b.seq_lens.extend(&r.seq_lens);
            }
            let (l, t) = trainer.eval_loss(&b).unwrap();
            loss += l;
            n += t;
        }
    }
    loss / n as f64
}

#[test]
fn loss_goes_down_and_the_trained_model_answers_better_than_the_base() {
    let work = temp_dir("learns");
    let model = learnable_model(&work.join("base"), 8.0);
    let args = [SMALL, &["--training-num-epochs", "20", "--training-learning-rate", "5e-3", "--training-lr-scheduler", "constant_with_warmup"]].concat();
    run_ok(train_cmd(&work, &model, &capitals(), &args));
    let rows = jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl"));
    let losses: Vec<f64> = rows.iter().filter_map(|r| r.get("loss").and_then(Value::as_f64)).collect();
    assert_eq!(losses.len(), 60);
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    let base = loss_on_capitals(&model, &model);
    let trained = loss_on_capitals(&work.join("out/model"), &model);
    eprintln!("capitals: logged loss first epoch {first:.4} → last epoch {last:.4}; answer loss base {base:.4} → trained (merged model) {trained:.4}");
    assert!(last < first * 0.7, "training loss did not go down: {first} → {last}");
    assert!(trained < base * 0.7, "the merged model does not answer better than the base: {base} → {trained}");
}

#[test]
fn same_seed_gives_identical_adapter_bytes_and_another_seed_does_not() {
    let base = temp_dir("seed-base");
    let model = tiny_model(&base, DType::F32);
    let run = |name: &str, seed: &str| {
        let work = temp_dir(name);
        let args = [SMALL, &["--training-num-epochs", "1", "--training-seed", seed, "--training-lora-dropout", "0.1"]].concat();
        run_ok(train_cmd(&work, &model, &capitals(), &args));
        adapter_bytes(&work)
    };
    let a = run("seed-a", "11");
    let b = run("seed-b", "11");
    let c = run("seed-c", "12");
    assert!(a == b, "same seed, same inputs: adapter bytes differ");
    assert!(a != c, "different seeds gave identical adapters");
}

/// Runs the same training as `reference` with interruptions: SIGKILL after a logged step, an
/// abort half-way through writing a checkpoint, SIGKILL again; each time started again on the
/// same workspace. The final adapter must be bit-identical to the uninterrupted run.
#[test]
fn killed_runs_resume_to_a_bit_identical_adapter() {
    let base = temp_dir("kill-base");
    let model = tiny_model(&base, DType::F32);
    let args = [SMALL, &["--training-num-epochs", "3", "--training-save-steps", "1", "--training-lora-dropout", "0.1", "--training-save-total-limit", "2"]].concat();

    let reference = temp_dir("kill-ref");
    run_ok(train_cmd(&reference, &model, &capitals(), &args));

    let work = temp_dir("kill-work");
    // 1. SIGKILL right after step 2 is logged.
    let kill_after = |line_prefix: &str| {
        let mut child = train_cmd(&work, &model, &capitals(), &args).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut seen = false;
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.starts_with(line_prefix) {
                child.kill().unwrap(); // SIGKILL
                seen = true;
                break;
            }
        }
        let status = child.wait().unwrap();
        assert!(seen && !status.success(), "expected to kill the run at `{line_prefix}`");
    };
    kill_after("step 2/");
    // 2. Abort half-way through writing checkpoint 5.
    let mut c = train_cmd(&work, &model, &capitals(), &args);
    c.env("LORA_FAULT_INJECT", "checkpoint-mid:5");
    let out = c.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"), "the second start resumes");
    // 3. SIGKILL after step 7.
    kill_after("step 7/");
    // 4. Run to the end.
    let out = run_ok(train_cmd(&work, &model, &capitals(), &args));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    assert!(adapter_bytes(&work) == adapter_bytes(&reference), "the resumed run's adapter differs from the uninterrupted run's");
    let rows = jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl"));
    let steps: Vec<u64> = rows.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=9).collect::<Vec<_>>(), "training_metrics.jsonl has each step once");
    // The same losses as the uninterrupted run.
    let ref_rows = jsonl(&reference.join("pvc/checkpoints/training_metrics.jsonl"));
    let losses = |rows: &[Value]| rows.iter().filter_map(|r| r.get("loss").and_then(Value::as_f64)).collect::<Vec<_>>();
    assert_eq!(losses(&rows), losses(&ref_rows));
}

#[test]
fn a_changed_input_is_not_resumed_silently() {
    let work = temp_dir("changed");
    let model = tiny_model(&work.join("base"), DType::F32);
    let args = [SMALL, &["--training-num-epochs", "1"]].concat();
    run_ok(train_cmd(&work, &model, &capitals(), &args));
    let changed = [args.as_slice(), &["--training-learning-rate", "1e-3"]].concat();
    let out = train_cmd(&work, &model, &capitals(), &changed).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("training_learning_rate") && stderr.contains("training_resume=never"), "{stderr}");
    let fresh = [changed.as_slice(), &["--training-resume", "never"]].concat();
    let out = run_ok(train_cmd(&work, &model, &capitals(), &fresh));
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed 1 old checkpoint"));
}
