//! End-to-end tests of `lora train`: the real binary in a temp dir, a tiny model made here
//! (random weights, real SmolLM2 tokenizer), the learnable `examples/data/capitals.jsonl`.
//!
//! Run: `cargo test -p lora --test e2e`.

mod common;
mod dry_run;
mod merged;
mod outputs;
mod qlora;
mod oci;
mod workers;
mod launcher;
#[cfg(feature = "plugins")]
mod plugin_sandbox;

use common::*;
use lora_data::{DataConfig, DatasetSource, HfTextTools};
use lora_engine::{AdapterConfig, DType, LoadOptions, Model, ModelConfig, OptimConfig, QuantConfig, Trainer};
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

#[test]
fn a_changed_input_is_not_resumed_silently() {
    let work = temp_dir("changed");
    let model = tiny_model(&work.join("base"), DType::F32);
    let args = [SMALL, &["--training-num-epochs", "1"]].concat();
    run_ok(train_cmd(&work, &model, &capitals(), &args));
    let first = adapter_bytes(&work);
    // The same command again finds the run complete: it resumes at the last step and only
    // rewrites the outputs (same adapter, each step once in training_metrics.jsonl).
    let out = run_ok(train_cmd(&work, &model, &capitals(), &args));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    assert!(adapter_bytes(&work) == first);
    let rows = jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl"));
    assert_eq!(rows.iter().filter(|r| r.get("loss").is_some()).count(), 3, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r.get("train_runtime").is_some()).count(), 1);
    let changed = [args.as_slice(), &["--training-learning-rate", "1e-3"]].concat();
    let out = train_cmd(&work, &model, &capitals(), &changed).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Named as a `lora train` user types them, and no promise of a resume (issue 15).
    assert!(stderr.contains("--training-learning-rate: 0.0002 → 0.001") && stderr.contains("pass --training-resume never"), "{stderr}");
    assert!(!stderr.contains("training_resume=never") && !stderr.contains("resumes"), "{stderr}");
    assert!(stderr.contains("hint: the workspace's checkpoints belong to another run"), "{stderr}");
    let fresh = [changed.as_slice(), &["--training-resume", "never"]].concat();
    let out = run_ok(train_cmd(&work, &model, &capitals(), &fresh));
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed 1 old checkpoint"));
}

/// A tiny model folder for tests outside Rust (the kfp.local test in tests/kfp/test_kfp.py), at
/// `LORA_TINY_MODEL_DIR`; run by `tests/ci.d/10-kfp.sh` with `--ignored`.
#[test]
#[ignore = "fixture for tests/kfp/test_kfp.py; run by tests/ci.d/10-kfp.sh"]
fn write_tiny_model() {
    let dir = std::path::PathBuf::from(std::env::var("LORA_TINY_MODEL_DIR").expect("set LORA_TINY_MODEL_DIR"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    learnable_model(&dir, 4.0);
}

/// Writes the fixture `tests/e2e/interop.py` checks against transformers + PEFT (+ bitsandbytes):
/// a tiny f32 model, a run on it, and our own logits (base + trained adapter, through the engine)
/// for a fixed prompt; and the same for QLoRA runs on a bf16 model (see below). Only when `LORA_INTEROP_DIR` names the folder (the stage script
/// `tests/ci.d/40-interop.sh` runs it with `--ignored`).
#[test]
#[ignore = "fixture for tests/e2e/interop.py; run by tests/ci.d/40-interop.sh"]
fn write_interop_fixture() {
    let dir = std::path::PathBuf::from(std::env::var("LORA_INTEROP_DIR").expect("set LORA_INTEROP_DIR"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The families beyond Llama whose switches change the forward: SmolLM3 (no RoPE on layer 1)
    // and Mistral with a sliding window (6 tokens: shorter than the prompt below).
    let llama = ModelConfig::tiny_llama(49152);
    let smollm3 = ModelConfig { arch: lora_engine::Arch::SmolLM3, tie_word_embeddings: true, nope_layers: vec![false, true], ..llama.clone() };
    let mistral_sw = ModelConfig { arch: lora_engine::Arch::Mistral, sliding_window: Some(6), ..llama.clone() };
    // Gemma 3: a sliding layer (window 6, local RoPE base) then a global one, query_pre_attn_scalar 64.
    let gemma3 = ModelConfig { attention_scale: 0.125, ..common::tiny_gemma3(llama.vocab_size) };
    // Phi-3: fused qkv_proj / gate_up_proj, RoPE on 12 of 16 head dims, LongRoPE (the prompt is
    // longer than original_max_position_embeddings 8: long factors, attention factor 1.3).
    let phi3 = ModelConfig {
        arch: lora_engine::Arch::Phi3,
        layout: lora_engine::Layout::Phi3,
        rotary_dim: 12,
        rope_scaling: lora_engine::RopeScaling::LongRope {
            short_factor: vec![1.0, 1.1, 1.2, 1.5, 2.0, 3.0],
            long_factor: vec![1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
            original_max_position_embeddings: 8,
            attention_factor: 1.3,
        },
        ..llama.clone()
    };
    // Granite 4.0 dense: fused shared_mlp.input_linear, Granite multipliers.
    let granite4 = ModelConfig {
        arch: lora_engine::Arch::Granite4,
        layout: lora_engine::Layout::Granite4,
        embedding_multiplier: 2.0,
        residual_multiplier: 0.5,
        logits_scaling: 1.5,
        attention_scale: 0.2,
        ..llama.clone()
    };
    // Qwen3-MoE: layer 0 dense, layer 1 with 4 experts (top-2 renormalised); LoRA on attention and
    // on the 3-D experts (PEFT target_parameters); the merged model folds each expert's delta into
    // the per-expert weights the base files hold.
    let qwen3_moe = ModelConfig {
        arch: lora_engine::Arch::Qwen3Moe,
        qk_norm: true,
        moe: Some(lora_engine::config::MoeConfig {
            num_experts: 4,
            top_k: 2,
            moe_intermediate_size: 32,
            norm_topk_prob: true,
            sparse_layers: vec![false, true],
            aux_loss_coef: 0.0,
            output_router_logits: false,
            router_aux_loss_coef: 0.001,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![0],
        }),
        ..llama.clone()
    };
    let moe_targets = ["--training-lora-target-modules", "q_proj,k_proj,v_proj,o_proj,mlp.experts.gate_up_proj,mlp.experts.down_proj"];
    for (variant, cfg, extra) in [
        ("qwen3_moe", &qwen3_moe, &moe_targets[..]),
        ("phi3", &phi3, &[][..]),
        ("granite4", &granite4, &[][..]),
        ("lora", &llama, &[][..]),
        ("rslora", &llama, &["--training-lora-use-rslora", "true"][..]),
        ("dora", &llama, &["--training-lora-use-dora", "true"][..]),
        ("smollm3", &smollm3, &[][..]),
        ("mistral_sw", &mistral_sw, &[][..]),
        ("gemma3", &gemma3, &[][..]),
    ] {
        let work = dir.join(variant);
        let model = learnable_model_of(&work.join("base"), cfg, 4.0, DType::F32);
        let args = [SMALL, &["--training-num-epochs", "3", "--training-learning-rate", "5e-3"], extra].concat();
        run_ok(train_cmd(&work, &model, &capitals(), &args));
        // Our forward: the base model plus the adapter as written.
        let adapter_path = work.join("out/model/adapter/adapter_model.safetensors");
        let adapter = lora::checkpoint::decode_safetensors(&std::fs::read(&adapter_path).unwrap(), &adapter_path).unwrap();
        let cfg: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/adapter/adapter_config.json")).unwrap()).unwrap();
        let acfg = AdapterConfig {
            r: cfg["r"].as_u64().unwrap() as usize,
            lora_alpha: cfg["lora_alpha"].as_f64().unwrap(),
            use_rslora: cfg["use_rslora"].as_bool().unwrap(),
            use_dora: cfg["use_dora"].as_bool().unwrap(),
            // Qwen3-MoE's targets are named (its all-linear is refused); the others train all-linear.
            target_modules: if variant == "qwen3_moe" { moe_targets[1].split(',').map(String::from).collect() } else { Vec::new() },
            ..AdapterConfig::default()
        };
        let mut trainer = Trainer::new(Model::load(&model, &LoadOptions::cpu()).unwrap(), acfg, OptimConfig::default(), 1).unwrap();
        trainer.set_adapter_tensors(&adapter).unwrap();
        let tools = HfTextTools::from_dir(&model).unwrap();
        let ids = lora_api::TextTools::encode(&tools, "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\nThe capital of Peru is Lima.", false).unwrap();
        let batch = lora_engine::Batch { train_mask: vec![true; ids.len()], seq_lens: vec![ids.len() as u32], input_ids: ids.clone() };
        let logits = trainer.logits(&batch).unwrap();
        let fixture = serde_json::json!({"input_ids": ids, "vocab": 49152, "logits": logits});
        std::fs::write(work.join("our_logits.json"), fixture.to_string()).unwrap();
    }
    // QLoRA: a bf16 base trained 4-bit (nf4, double quant; compute float32 so PEFT's forward over
    // the same 4-bit weights is comparable at f32 tolerance), our bitsandbytes checkpoint of the
    // base for PEFT to load, and our logits over that 4-bit base.
    let four = QuantConfig::FourBit { quant_type: None, double_quant: None, compute_dtype: Some(DType::F32) };
    for (variant, extra) in [("qlora", &[][..]), ("qlora_dora", &["--training-lora-use-dora", "true"][..])] {
        let work = dir.join(variant);
        let model = learnable_model_in(&work.join("base"), 4.0, DType::BF16);
        let args = [SMALL, &["--training-num-epochs", "3", "--training-learning-rate", "5e-3", "--training-lora-load-in-4bit", "true", "--training-lora-bnb-4bit-compute-dtype", "float32"], extra].concat();
        run_ok(train_cmd(&work, &model, &capitals(), &args));
        lora_engine::quant::bnb::write_checkpoint(&model, &work.join("base4"), &four).unwrap();
        let adapter_path = work.join("out/model/adapter/adapter_model.safetensors");
        let adapter = lora::checkpoint::decode_safetensors(&std::fs::read(&adapter_path).unwrap(), &adapter_path).unwrap();
        let acfg = AdapterConfig { r: 16, lora_alpha: 32.0, use_dora: variant == "qlora_dora", ..AdapterConfig::default() };
        let base = Model::load(&model, &LoadOptions::cpu().with_quant(Some(four))).unwrap();
        let mut trainer = Trainer::new(base, acfg, OptimConfig::default(), 1).unwrap();
        trainer.set_adapter_tensors(&adapter).unwrap();
        let tools = HfTextTools::from_dir(&model).unwrap();
        let ids = lora_api::TextTools::encode(&tools, "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\nThe capital of Peru is Lima.", false).unwrap();
        let batch = lora_engine::Batch { train_mask: vec![true; ids.len()], seq_lens: vec![ids.len() as u32], input_ids: ids.clone() };
        let fixture = serde_json::json!({"input_ids": ids, "vocab": 49152, "logits": trainer.logits(&batch).unwrap(), "scale": 2.0});
        std::fs::write(work.join("our_logits.json"), fixture.to_string()).unwrap();
    }
}

/// `lora kfp` runs the same training from an executor input shaped as the KFP launcher writes it
/// (numbers as doubles, optional parameters absent) and writes `executor_output.json` listing
/// every output artifact, with the metrics as the metadata of `output_metrics`.
#[test]
fn kfp_run_writes_the_outputs_and_the_executor_output() {
    let work = temp_dir("kfp");
    let model = tiny_model(&work.join("base"), DType::F32);
    let art = |name: &str, uri: &std::path::Path, kind: &str| {
        serde_json::json!({ name: { "artifacts": [{ "name": name, "type": {"schemaTitle": kind}, "uri": uri, "metadata": {} }] } })
    };
    let mut outputs_artifacts = serde_json::Map::new();
    for (name, path, kind) in [
        ("output_model", work.join("kfp/model"), "system.Model"),
        ("output_metrics", work.join("kfp/metrics"), "system.Metrics"),
        ("output_loss_chart", work.join("kfp/chart.html"), "system.HTML"),
    ] {
        outputs_artifacts.extend(art(name, &path, kind).as_object().unwrap().clone());
    }
    let input = serde_json::json!({
        "inputs": {
            "artifacts": art("dataset", &capitals(), "system.Dataset"),
            "parameterValues": {
                "pvc_path": work.join("pvc"),
                "training_base_model": model,
                "training_effective_batch_size": 8.0,
                "training_max_seq_len": 256.0,
                "training_max_tokens_per_gpu": 1024.0,
                "training_num_epochs": 1.0,
                "training_device": "cpu",
                "training_envs": "",
                "training_lora_r": 8.0,
                "training_lora_alpha": 16.0,
            }
        },
        "outputs": {
            "artifacts": outputs_artifacts,
            "parameters": { "Output": { "outputFile": work.join("kfp/Output") } },
            "outputFile": work.join("kfp/executor_output.json"),
        }
    });
    let input_path = work.join("executor_input.json");
    std::fs::write(&input_path, input.to_string()).unwrap();
    let mut c = std::process::Command::new(BIN);
    c.args(["kfp", "--executor-input"]).arg(format!("@{}", input_path.display())).env("HF_HUB_OFFLINE", "1").env("HF_HOME", work.join("hf"));
    run_ok(c);
    let eo: Value = serde_json::from_slice(&std::fs::read(work.join("kfp/executor_output.json")).unwrap()).unwrap();
    assert_eq!(eo["parameterValues"]["Output"], "training completed");
    assert_eq!(std::fs::read_to_string(work.join("kfp/Output")).unwrap(), "training completed");
    for name in ["output_model", "output_metrics", "output_loss_chart"] {
        assert!(eo["artifacts"][name]["artifacts"][0]["uri"].is_string(), "{name} not listed: {eo}");
    }
    let meta = &eo["artifacts"]["output_metrics"]["artifacts"][0]["metadata"];
    assert!(meta["training_final_loss"].is_number() && meta["lora_r"] == 8.0, "{meta}");
    assert!(work.join("kfp/model/adapter/adapter_model.safetensors").is_file());
    assert!(work.join("kfp/model/model.safetensors").is_file());
    assert!(work.join("kfp/chart.html").is_file() && work.join("kfp/metrics").is_file());
    assert!(work.join("pvc/final_model/model.safetensors").is_file());
}

/// Builds guest plugins of the `plugins/` workspace for wasm32-wasip2 (debug) and returns the
/// folder of the `.wasm` files (`LORA_PLUGINS_WASM_TARGET` overrides the target dir).
#[cfg(feature = "plugins")]
fn build_guest_plugins(packages: &[&str]) -> std::path::PathBuf {
    let target = lora_plugins::testing::guest_target_dir(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")));
    lora_plugins::testing::build_guest_plugins(&repo_root(), &target, packages, false).unwrap_or_else(|e| panic!("{e}"))
}

/// A WASM scheduler and a WASM reporter stand in for the built-ins through the same traits: the
/// run's learning rates equal the native `cosine` schedule's, and the CSV reporter (granted one
/// folder) writes one row per step.
#[cfg(feature = "plugins")]
#[test]
fn wasm_scheduler_and_reporter_plugins_drive_a_run() {
    let wasm = build_guest_plugins(&["schedules", "csv-reporter"]);
    let base = temp_dir("plugins-base");
    let model = tiny_model(&base, DType::F32);
    let args = [SMALL, &["--training-num-epochs", "2", "--training-lr-scheduler", "cosine"]].concat();
    let native = temp_dir("plugins-native");
    run_ok(train_cmd(&native, &model, &capitals(), &args));

    let work = temp_dir("plugins-wasm");
    let csv_dir = work.join("csv");
    std::fs::create_dir_all(&csv_dir).unwrap();
    let plugins = format!("scheduler={},reporter={}", wasm.join("schedules.wasm").display(), wasm.join("csv_reporter.wasm").display());
    let config = serde_json::json!({"scheduler": {"settings": {"schedule": "cosine"}}, "csv_reporter": {"grants": {"dir": csv_dir}}}).to_string();
    let with_plugins = [args.as_slice(), &["--training-plugins", &plugins, "--training-plugin-config", &config]].concat();
    run_ok(train_cmd(&work, &model, &capitals(), &with_plugins));

    let lrs = |w: &std::path::Path| -> Vec<f64> {
        jsonl(&w.join("pvc/checkpoints/training_metrics.jsonl")).iter().filter_map(|r| r.get("learning_rate").and_then(Value::as_f64)).collect()
    };
    let (a, b) = (lrs(&native), lrs(&work));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "native cosine vs WASM cosine, value for value");
    let csv = std::fs::read_to_string(csv_dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 6, "header + one row per step:\n{csv}");
}

/// Gradient checkpointing (recomputing activations in backward) changes memory, never results:
/// the adapter bytes are the same with it on and off, and the run logs its memory plan.
#[test]
fn gradient_checkpointing_changes_memory_not_the_adapter() {
    let base = temp_dir("gc-base");
    let model = tiny_model(&base, DType::F32);
    let run = |setting: &str| {
        let work = temp_dir(&format!("gc-{setting}"));
        let args = [SMALL, &["--training-lora-dropout", "0.1", "--training-gradient-checkpointing", setting]].concat();
        let out = run_ok(train_cmd(&work, &model, &capitals(), &args));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (adapter_bytes(&work), stderr)
    };
    let (on, log_on) = run("true");
    let (off, log_off) = run("false");
    let (_, log_auto) = run("auto");
    assert!(on == off, "the adapter depends on gradient checkpointing");
    assert!(log_on.contains("gradient checkpointing on (training_gradient_checkpointing=true)"), "{log_on}");
    assert!(log_off.contains("gradient checkpointing off (training_gradient_checkpointing=false)"), "{log_off}");
    // A tiny model fits anywhere: auto keeps the activations.
    assert!(log_auto.contains("tokens: activations ~") && log_auto.contains("gradient checkpointing off (training_gradient_checkpointing=auto)"), "{log_auto}");
}

/// Bad input found during a run (not by parameter validation) exits 2 with the input hint and
/// names what and where: a folder that is not a model, a corrupt weights file, a malformed
/// record. Nothing is left in the output folder.
#[test]
fn bad_input_found_while_running_exits_2_naming_it() {
    let base = temp_dir("badinput-base");
    let model = tiny_model(&base, DType::F32);
    let fail = |work: &std::path::Path, model: &std::path::Path, data: &std::path::Path, needles: &[&str]| {
        let out = train_cmd(work, model, data, SMALL).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("hint: `--dry-run`"), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "missing `{n}` in: {stderr}");
        }
        assert!(!work.join("out/model/model.safetensors").exists());
    };
    let not_a_model = temp_dir("badinput-nomodel");
    std::fs::create_dir_all(not_a_model.join("m")).unwrap();
    fail(&not_a_model, &not_a_model.join("m"), &capitals(), &["has no config.json"]);

    let corrupt = temp_dir("badinput-corrupt");
    let broken = corrupt.join("m");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    let weights = broken.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    fail(&corrupt, &broken, &capitals(), &["model.safetensors"]);

    let bad_data = temp_dir("badinput-data");
    let data = bad_data.join("d.jsonl");
    let good = std::fs::read_to_string(capitals()).unwrap();
    std::fs::write(&data, format!("{}{{\"messages\": [oops\n", good)).unwrap();
    let line = good.lines().count() + 1;
    fail(&bad_data, &model, &data, &["d.jsonl", &line.to_string(), "invalid JSON"]);
}

/// A reporter granted one host (`grants.http`) reports a whole run over real HTTP: one `step`
/// event per optimizer step with the same numbers as `training_metrics.jsonl`, between `start`
/// (with the resolved parameters) and `finish`.
#[cfg(feature = "plugins")]
#[test]
fn a_webhook_reporter_reports_a_run_over_http() {
    let wasm = build_guest_plugins(&["webhook-reporter"]);
    let server = lora_plugins::testing::HttpEndpoint::start(200).unwrap();
    let base = temp_dir("webhook-base");
    let model = tiny_model(&base, DType::F32);
    let work = temp_dir("webhook-run");
    let plugins = format!("reporter={}", wasm.join("webhook_reporter.wasm").display());
    let config = serde_json::json!({"reporter": {
        "settings": {"url": format!("{}/lora", server.origin())},
        "grants": {"http": [server.origin()]}}})
    .to_string();
    let args = [SMALL, &["--training-num-epochs", "2", "--training-plugins", &plugins, "--training-plugin-config", &config]].concat();
    run_ok(train_cmd(&work, &model, &capitals(), &args));

    let got: Vec<Value> = server.requests().iter().map(|q| q.json()).collect();
    let events: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events.first(), Some(&"start"), "{events:?}");
    assert_eq!(events.last(), Some(&"finish"), "{events:?}");
    assert_eq!(got[0]["params"]["training_num_epochs"], 2, "{}", got[0]);
    let steps: Vec<&Value> = got.iter().filter(|e| e["event"] == "step").collect();
    let metrics: Vec<Value> = jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl")).into_iter().filter(|r| r.get("learning_rate").is_some()).collect();
    assert_eq!(steps.len(), 6);
    assert_eq!(steps.len(), metrics.len());
    for (e, m) in steps.iter().zip(&metrics) {
        assert_eq!(e["step"], m["step"]);
        assert_eq!(e["learning_rate"].as_f64(), m["learning_rate"].as_f64());
        assert_eq!(e["loss"].as_f64(), m["loss"].as_f64());
    }
}

/// A reporter that fails mid-run (its endpoint starts answering 500 at step 4) stops the run
/// with exit 1, naming the plugin, the call and the step; the checkpoints written before stay
/// complete, and once the endpoint is back the same command resumes and finishes with the same
/// adapter bytes as a run that was never interrupted.
#[cfg(feature = "plugins")]
#[test]
fn a_failing_reporter_stops_the_run_without_harming_checkpoints() {
    let wasm = build_guest_plugins(&["webhook-reporter"]);
    let server = lora_plugins::testing::HttpEndpoint::start(200).unwrap();
    let base = temp_dir("failrep-base");
    let model = tiny_model(&base, DType::F32);
    let plugins = format!("reporter={}", wasm.join("webhook_reporter.wasm").display());
    let config = serde_json::json!({"reporter": {
        "settings": {"url": server.origin(), "events": "start,step,finish"},
        "grants": {"http": [server.origin()]}}})
    .to_string();
    let args = [SMALL, &["--training-num-epochs", "2", "--training-save-steps", "1", "--training-plugins", &plugins, "--training-plugin-config", &config]].concat();

    let reference = temp_dir("failrep-ref");
    run_ok(train_cmd(&reference, &model, &capitals(), &args));

    let work = temp_dir("failrep-work");
    let before = server.requests().len();
    server.answer_from(before + 4, 500); // start, steps 1-3 delivered; step 4 refused
    let out = train_cmd(&work, &model, &capitals(), &args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for needle in ["plugin:webhook_reporter", "on_step", "HTTP 500", "step 4"] {
        assert!(stderr.contains(needle), "missing `{needle}`: {stderr}");
    }
    // The hint promises a resume, naming the checkpoint, because there is one.
    assert!(stderr.contains("running the same command again resumes from") && stderr.contains("checkpoint-3"), "{stderr}");
    let checkpoints = work.join("pvc/checkpoints");
    let mut saved: Vec<String> = std::fs::read_dir(&checkpoints).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("checkpoint-")).collect();
    saved.sort();
    assert!(saved.iter().any(|n| n == "checkpoint-3"), "{saved:?}");
    for c in &saved {
        let adapter = checkpoints.join(c).join("adapter_model.safetensors");
        assert!(adapter.is_file(), "{c} is complete");
    }
    assert!(!work.join("out/model/model.safetensors").exists(), "no merged model from a failed run");

    server.answer_from(server.requests().len(), 200);
    let out = run_ok(train_cmd(&work, &model, &capitals(), &args));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    assert!(adapter_bytes(&work) == adapter_bytes(&reference), "the resumed run's adapter differs");
}

/// The built-in `cosine` schedule and the example WASM scheduler's `cosine` give the same bits at
/// every step, for run shapes from one step to thousands, with and without warmup.
#[cfg(feature = "plugins")]
#[test]
fn builtin_and_wasm_cosine_schedules_are_bit_identical() {
    use lora_api::{ScheduleContext, Scheduler};
    let wasm = build_guest_plugins(&["schedules"]).join("schedules.wasm");
    let opts = lora_plugins::PluginOptions { cache_dir: None, ..Default::default() };
    let mut compared = 0;
    for (warmup, total) in [(0, 1), (1, 1), (3, 10), (10, 1000), (0, 37), (64, 5000), (7, 7)] {
        let ctx = ScheduleContext { base_lr: 3e-4, warmup_steps: warmup, total_steps: total, num_epochs: 1, steps_per_epoch: total, settings: Default::default() };
        let mut builtin = lora::schedule::BuiltinScheduler::new("cosine", &ctx).unwrap();
        let mut plugin = lora_plugins::load_scheduler(&wasm, &opts, ctx.clone()).unwrap();
        for step in 0..total + 2 {
            let (a, b) = (builtin.learning_rate(step).unwrap(), plugin.learning_rate(step).unwrap());
            assert_eq!(a.to_bits(), b.to_bits(), "warmup {warmup}, total {total}, step {step}: built-in {a:e}, WASM {b:e}");
            compared += 1;
        }
    }
    assert!(compared > 6000);
}

/// `training_base_model` as a hub id: downloaded from a hub on loopback (`HF_ENDPOINT`) into the
/// standard cache under `HF_HOME`, trained on, and named in the adapter config; a second run
/// reuses the cache (no file downloads), and `HF_HUB_OFFLINE=1` works from the cache alone.
#[test]
fn a_hub_model_id_is_downloaded_into_the_hf_cache_and_reused() {
    let work = temp_dir("hub");
    let model = tiny_model(&work.join("served"), DType::F32);
    let hub = fake_hub::serve("lora-test/tiny-llama", &model);
    let args = [SMALL, &["--training-num-epochs", "1"]].concat();
    let run = |offline: bool, endpoint: &str| {
        let mut c = train_cmd(&work, std::path::Path::new("lora-test/tiny-llama"), &capitals(), &args);
        c.env("HF_ENDPOINT", endpoint).env("HF_HUB_OFFLINE", if offline { "1" } else { "0" }).env_remove("HF_HUB_CACHE");
        run_ok(c)
    };
    run(false, &hub.endpoint);
    let downloaded = hub.downloads.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(downloaded, 6, "config, tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json + the LFS weights");
    let snapshot = work.join("hf/hub/models--lora-test--tiny-llama/snapshots").join(fake_hub::COMMIT);
    assert!(snapshot.join("model.safetensors").is_file() && snapshot.join("chat_template.jinja").is_file());
    let cfg: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "lora-test/tiny-llama");
    let first = adapter_bytes(&work);
    // Same run again: cache reuse (the run itself resumes as complete).
    run(false, &hub.endpoint);
    assert_eq!(hub.downloads.load(std::sync::atomic::Ordering::SeqCst), downloaded, "files downloaded again");
    // Offline, with an endpoint nobody listens on.
    run(true, "http://127.0.0.1:9");
    assert!(adapter_bytes(&work) == first);
}

/// A WASM preprocessor (support tickets → redacted chat samples) feeds the run through the same
/// `Preprocessor` trait as the built-in formats; the run manifest records the plugin by hash. A
/// plugin that traps fails the run with exit 1, naming the plugin and the call.
#[cfg(feature = "plugins")]
#[test]
fn a_wasm_preprocessor_feeds_the_run_and_a_trapping_one_fails_it_by_name() {
    let wasm = build_guest_plugins(&["ticket-redactor", "hostile-preprocessor"]);
    let base = temp_dir("prep-base");
    let model = tiny_model(&base, DType::F32);
    let tickets = repo_root().join("examples/data/tickets.jsonl");
    let work = temp_dir("prep");
    let plugin = format!("preprocessor={}", wasm.join("ticket_redactor.wasm").display());
    let args = [&["--training-effective-batch-size", "4", "--training-num-epochs", "1", "--training-plugins"], &[plugin.as_str()][..]].concat();
    let out = run_ok(train_cmd(&work, &model, &tickets, &args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 8 tickets, one without an agent reply (dropped by the plugin): 7 samples, 2 steps.
    assert!(stderr.contains("8 records → 7 training samples"), "{stderr}");
    let manifest: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/run_manifest.json")).unwrap()).unwrap();
    assert!(manifest["plugins"].as_object().unwrap().keys().any(|k| k.starts_with("preprocessor=")), "{manifest}");

    let hostile = temp_dir("prep-hostile");
    let plugin = format!("preprocessor={}", wasm.join("hostile_preprocessor.wasm").display());
    let config = r#"{"preprocessor": {"settings": {"attack": "panic"}}}"#;
    let args = [&["--training-effective-batch-size", "4", "--training-plugins"], &[plugin.as_str(), "--training-plugin-config", config][..]].concat();
    let out = train_cmd(&hostile, &model, &tickets, &args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("hostile_preprocessor") || stderr.contains("hostile-preprocessor"), "names the plugin: {stderr}");
    assert!(stderr.contains("process_batch") || stderr.contains("process-batch"), "names the call: {stderr}");
    assert!(stderr.contains("hint: an extension failed"), "the hint says what to fix, not just to run again: {stderr}");
    assert!(stderr.contains("the run starts from the beginning") && !stderr.contains("resumes from"), "no checkpoint, no resume promised: {stderr}");
    assert!(!hostile.join("out/model").exists(), "no output after a failed run");
}

/// `training_checkpoint_at_epoch`: a checkpoint at each epoch end (here without step checkpoints).
#[test]
fn checkpoint_at_epoch_saves_at_each_epoch_end() {
    let work = temp_dir("at-epoch");
    let model = tiny_model(&work.join("base"), DType::F32);
    let args = [SMALL, &["--training-num-epochs", "3", "--training-save-steps", "1000", "--training-checkpoint-at-epoch", "true", "--training-save-total-limit", "5"]].concat();
    run_ok(train_cmd(&work, &model, &capitals(), &args));
    let steps: Vec<u64> = lora::checkpoint::list(&work.join("pvc/checkpoints")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![3, 6, 9], "epoch ends of 3 steps each (the last is also the final checkpoint)");
}

/// Writes the tiny model into `LORA_TINY_MODEL_DIR` for stages that run lora elsewhere
/// (tests/ci.d/70-image.sh trains with it inside the container image).
#[test]
#[ignore = "a fixture writer: run by tests/ci.d/70-image.sh"]
fn write_tiny_model_fixture() {
    let dir = std::path::PathBuf::from(std::env::var("LORA_TINY_MODEL_DIR").expect("set LORA_TINY_MODEL_DIR"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    tiny_model(&dir, DType::F32);
}
