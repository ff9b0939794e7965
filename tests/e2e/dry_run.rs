//! `--dry-run` is everything but training (issue 15): it resolves the model, reads the whole
//! dataset through the run's own code, and prints a plan whose counts are what the run then does.

use super::common::*;
use lora_engine::DType;
use serde_json::Value;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `error:` line and its causes: what a person reads, without the hint.
fn error_lines(o: &std::process::Output) -> Vec<String> {
    stderr(o).lines().filter(|l| l.starts_with("error:") || l.starts_with("  caused by:")).map(String::from).collect()
}

#[test]
fn a_wrongly_shaped_dataset_fails_the_dry_run_as_it_fails_the_run() {
    let work = temp_dir("dry-tickets");
    let model = tiny_model(&work.join("base"), DType::F32);
    let tickets = repo_root().join("examples/data/tickets.jsonl");
    let mut dry = train_cmd(&work, &model, &tickets, &["--dry-run"]);
    let dry = dry.output().unwrap();
    assert!(!work.join("out").exists() && !work.join("pvc").exists(), "the dry run wrote nothing");
    let run = train_cmd(&work, &model, &tickets, &[]).output().unwrap();
    assert_eq!(dry.status.code(), Some(2), "{}", stderr(&dry));
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    let (dry_err, run_err) = (error_lines(&dry), error_lines(&run));
    assert!(dry_err.iter().any(|l| l.contains("tickets.jsonl") && l.contains("record 1")), "{dry_err:?}");
    assert_eq!(dry_err, run_err);
    assert!(stderr(&dry).contains("nothing was trained or written"), "{}", stderr(&dry));
    // The run did not get to train: it does not promise a resume.
    assert!(!stderr(&run).contains("resumes"), "{}", stderr(&run));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn the_dry_run_counts_are_what_the_run_does() {
    let work = temp_dir("dry-counts");
    let model = tiny_model(&work.join("base"), DType::F32);
    let args = ["--training-effective-batch-size", "8", "--training-lr-warmup-steps", "1", "--training-num-epochs", "2", "--training-validation-split", "0.25"];
    let dry = run_ok(train_cmd(&work, &model, &capitals(), &[&args[..], &["--dry-run", "--json"]].concat()));
    assert!(!work.join("out").exists() && !work.join("pvc").exists(), "the dry run wrote nothing");
    let plan: Value = serde_json::from_slice(&dry.stdout).unwrap();
    let t = &plan["training"];
    assert_eq!(t["records"], 24, "{t}");
    assert_eq!(t["train_samples"], 18, "{t}");
    assert_eq!(t["validation_samples"], 6, "{t}");
    assert_eq!(t["steps_per_epoch"], 3, "{t}");
    assert_eq!(t["total_steps"], 6, "{t}");
    assert_eq!(plan["model"]["weights_present"], true);
    assert!(plan["memory"]["activation_bytes_kept"].as_u64().unwrap() > plan["memory"]["activation_bytes_recomputed"].as_u64().unwrap());

    // The text form says the same in words.
    let text = String::from_utf8_lossy(&run_ok(train_cmd(&work, &model, &capitals(), &[&args[..], &["--dry-run"]].concat())).stdout).into_owned();
    for want in ["records: 24", "2 epochs of 3 optimizer steps = 6 steps", "loss chart", "training_metrics.jsonl", "gradient checkpointing"] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }

    run_ok(train_cmd(&work, &model, &capitals(), &args));
    let metrics: Value = serde_json::from_slice(&std::fs::read(work.join("out/metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["training_steps"].as_f64(), t["total_steps"].as_f64(), "{metrics}");
    let epochs = plan["data"]["epochs"].as_array().unwrap();
    let tokens: u64 = epochs.iter().map(|e| e["tokens"].as_u64().unwrap()).sum();
    let trained: u64 = epochs.iter().map(|e| e["trained_tokens"].as_u64().unwrap()).sum();
    assert_eq!(metrics["training_tokens"].as_f64(), Some(tokens as f64), "{metrics}");
    assert_eq!(metrics["training_trained_tokens"].as_f64(), Some(trained as f64), "{metrics}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn an_unreachable_hub_fails_the_dry_run_saying_so() {
    let work = temp_dir("dry-hub");
    // Not cached, offline: the run's own error, exit 2.
    let mut c = train_cmd(&work, std::path::Path::new("org/not-cached"), &capitals(), &["--dry-run"]);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("HF_HUB_OFFLINE is set and the model is not in the cache"), "{}", stderr(&out));
    // Online, with a hub that does not answer: says it cannot reach it, non-zero.
    let mut c = train_cmd(&work, std::path::Path::new("org/not-cached"), &capitals(), &["--dry-run"]);
    c.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", "http://127.0.0.1:9");
    let out = c.output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach the Hugging Face hub at http://127.0.0.1:9"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("resumes"), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&work);
}

/// A hub id not yet cached: the dry run fetches the config and tokenizer files only (5 small
/// files, no weights) to read the data as the run will; the run then downloads only the weights,
/// and a partial snapshot is never taken for a cached model (offline it is still "not cached").
#[test]
fn a_hub_model_is_planned_without_downloading_its_weights() {
    let work = temp_dir("dry-hub-plan");
    let model = tiny_model(&work.join("served"), DType::F32);
    let hub = fake_hub::serve("lora-test/tiny-llama", &model);
    let id = std::path::Path::new("lora-test/tiny-llama");
    let cmd = |extra: &[&str], offline: bool| {
        let args = [&["--training-effective-batch-size", "8", "--training-num-epochs", "1"][..], extra].concat();
        let mut c = train_cmd(&work, id, &capitals(), &args);
        c.env("HF_ENDPOINT", &hub.endpoint).env("HF_HUB_OFFLINE", if offline { "1" } else { "0" }).env_remove("HF_HUB_CACHE");
        c
    };
    let dry = run_ok(cmd(&["--dry-run", "--json"], false));
    let plan: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(plan["model"]["weights_present"], false, "{}", plan["model"]);
    assert_eq!(plan["training"]["total_steps"], 3);
    assert_eq!(hub.downloads.load(std::sync::atomic::Ordering::SeqCst), 5, "config and tokenizer files only");
    let snapshot = work.join("hf/hub/models--lora-test--tiny-llama/snapshots").join(fake_hub::COMMIT);
    assert!(!snapshot.join("model.safetensors").exists());
    let offline = cmd(&["--dry-run"], true).output().unwrap();
    assert_eq!(offline.status.code(), Some(2), "{}", stderr(&offline));
    assert!(stderr(&offline).contains("not in the cache"), "{}", stderr(&offline));
    run_ok(cmd(&[], false));
    assert_eq!(hub.downloads.load(std::sync::atomic::Ordering::SeqCst), 6, "the run downloads only the weights");
    let _ = std::fs::remove_dir_all(&work);
}

/// `--dry-run` names the model family, the decoder switches its config turns on and the LoRA
/// targets (issue 19): a SmolLM3 with a no-RoPE layer, tied embeddings and GQA.
#[test]
fn the_dry_run_shows_the_family_its_switches_and_the_lora_targets() {
    let work = temp_dir("dry-family");
    let cfg = lora_engine::ModelConfig {
        arch: lora_engine::Arch::SmolLM3,
        tie_word_embeddings: true,
        nope_layers: vec![false, true],
        ..lora_engine::ModelConfig::tiny_llama(49152)
    };
    let model = tiny_model_of(&work.join("base"), &cfg, DType::F32);
    let args = ["--training-lora-target-modules", "q_proj,down_proj", "--dry-run"];
    let plan: Value = serde_json::from_slice(&run_ok(train_cmd(&work, &model, &capitals(), &[&args[..], &["--json"]].concat())).stdout).unwrap();
    let a = &plan["architecture"];
    assert_eq!(a["family"], "smollm3", "{a}");
    assert_eq!(a["architecture"], "SmolLM3ForCausalLM", "{a}");
    assert_eq!(a["switches"], serde_json::json!(["GQA 4/2", "tied embeddings", "no RoPE on layers 1"]), "{a}");
    assert_eq!(a["lora_targets"], serde_json::json!(["q_proj", "down_proj"]), "{a}");
    let text = String::from_utf8_lossy(&run_ok(train_cmd(&work, &model, &capitals(), &args)).stdout).into_owned();
    let want = "architecture: smollm3 (SmolLM3ForCausalLM), 2 layers; switches: GQA 4/2, tied embeddings, no RoPE on layers 1; LoRA on q_proj, down_proj";
    assert!(text.contains(want), "`{want}` missing from:\n{text}");
}

/// Gemma 3's switches in `--dry-run`: its norms, GeGLU, scaled embeddings and two RoPE bases,
/// and which layer slides.
#[test]
fn the_dry_run_shows_gemma3s_switches() {
    let work = temp_dir("dry-gemma3");
    let cfg = tiny_gemma3(49152);
    let model = tiny_model_of(&work.join("base"), &cfg, DType::F32);
    let plan: Value = serde_json::from_slice(&run_ok(train_cmd(&work, &model, &capitals(), &["--dry-run", "--json"])).stdout).unwrap();
    let a = &plan["architecture"];
    assert_eq!(a["architecture"], "Gemma3ForCausalLM", "{a}");
    let want = [
        "GQA 4/2",
        "q/k RMSNorm",
        "(1+w) RMSNorm in f32, norms after attention and MLP",
        "GeGLU (gelu_pytorch_tanh)",
        "embeddings x 8",
        "RoPE base 100 on sliding layers, 10000 on full layers",
        "tied embeddings",
        "sliding window 6 on layers 0",
    ];
    assert_eq!(a["switches"], serde_json::json!(want), "{a}");
}

/// Phi-3 and Granite 4 dense in `--dry-run`: their fused modules as switches and LoRA targets
/// under their own names; a split name (`q_proj`) on Phi-3 is refused naming the valid ones.
#[test]
fn the_dry_run_shows_phi3_and_granite4_with_their_fused_modules() {
    let work = temp_dir("dry-phi3");
    let llama = lora_engine::ModelConfig::tiny_llama(49152);
    let phi3 = lora_engine::ModelConfig { arch: lora_engine::Arch::Phi3, layout: lora_engine::Layout::Phi3, rotary_dim: 12, ..llama.clone() };
    let model = tiny_model_of(&work.join("base"), &phi3, DType::F32);
    let args = ["--training-lora-target-modules", "qkv_proj,gate_up_proj", "--dry-run", "--json"];
    let plan: Value = serde_json::from_slice(&run_ok(train_cmd(&work, &model, &capitals(), &args)).stdout).unwrap();
    let a = &plan["architecture"];
    assert_eq!((&a["family"], &a["architecture"]), (&Value::from("phi3"), &Value::from("Phi3ForCausalLM")), "{a}");
    assert_eq!(a["switches"], serde_json::json!(["GQA 4/2", "fused qkv_proj (q | k | v) and gate_up_proj (gate | up)", "partial rotary: 12 of 16 head dims"]), "{a}");
    assert_eq!(a["lora_targets"], serde_json::json!(["qkv_proj", "gate_up_proj"]), "{a}");
    let out = train_cmd(&work, &model, &capitals(), &["--training-lora-target-modules", "q_proj", "--dry-run"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`q_proj` is not an adaptable module of this model") && err.contains("qkv_proj, o_proj, gate_up_proj, down_proj"), "{err}");

    let work = temp_dir("dry-granite4");
    let g4 = lora_engine::ModelConfig { arch: lora_engine::Arch::Granite4, layout: lora_engine::Layout::Granite4, residual_multiplier: 0.5, ..llama };
    let model = tiny_model_of(&work.join("base"), &g4, DType::F32);
    let plan: Value = serde_json::from_slice(&run_ok(train_cmd(&work, &model, &capitals(), &["--dry-run", "--json"])).stdout).unwrap();
    let a = &plan["architecture"];
    assert_eq!((&a["family"], &a["architecture"]), (&Value::from("granitemoehybrid"), &Value::from("GraniteMoeHybridForCausalLM")), "{a}");
    let sw: Vec<&str> = a["switches"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(sw.contains(&"fused shared_mlp.input_linear (gate | up), shared_mlp.output_linear") && sw.iter().any(|s| s.starts_with("Granite multipliers")), "{a}");
    let targets = a["lora_targets"].as_array().unwrap();
    assert!(targets.contains(&Value::from("input_linear")) && !targets.contains(&Value::from("up_proj")), "{a}");
}

/// Qwen3-MoE in `--dry-run`: the experts (count, top-k, dense layers) as a switch and the 3-D
/// expert parameters among the LoRA targets; `all-linear` and `gate_proj` are refused there,
/// naming what to write instead.
#[test]
fn the_dry_run_shows_qwen3_moe_experts_and_expert_targets() {
    let work = temp_dir("dry-moe");
    let llama = lora_engine::ModelConfig::tiny_llama(49152);
    let moe = lora_engine::config::MoeConfig {
        num_experts: 4,
        top_k: 2,
        moe_intermediate_size: 32,
        norm_topk_prob: false,
        sparse_layers: vec![false, true],
        aux_loss_coef: 0.01,
        output_router_logits: true,
        router_aux_loss_coef: 0.01,
        decoder_sparse_step: 1,
        mlp_only_layers: vec![0],
    };
    let cfg = lora_engine::ModelConfig { arch: lora_engine::Arch::Qwen3Moe, qk_norm: true, moe: Some(moe), ..llama };
    let model = tiny_model_of(&work.join("base"), &cfg, DType::F32);
    let args = ["--training-lora-target-modules", "q_proj,o_proj,mlp.experts.down_proj", "--dry-run", "--json"];
    let plan: Value = serde_json::from_slice(&run_ok(train_cmd(&work, &model, &capitals(), &args)).stdout).unwrap();
    let a = &plan["architecture"];
    assert_eq!((&a["family"], &a["architecture"]), (&Value::from("qwen3_moe"), &Value::from("Qwen3MoeForCausalLM")), "{a}");
    assert_eq!(
        a["switches"],
        serde_json::json!(["GQA 4/2", "q/k RMSNorm", "MoE: 4 experts of MLP 32, top-2 (router frozen), dense MLP on layers 0", "router load-balancing loss x0.01"]),
        "{a}"
    );
    assert_eq!(a["lora_targets"], serde_json::json!(["q_proj", "o_proj", "mlp.experts.down_proj"]), "{a}");
    for (targets, want) in [("all-linear", "all-linear is not supported here"), ("q_proj,gate_proj", "`gate_proj` is not supported")] {
        let out = train_cmd(&work, &model, &capitals(), &["--training-lora-target-modules", targets, "--dry-run"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want) && err.contains("mlp.experts.gate_up_proj, mlp.experts.down_proj"), "{targets}: {err}");
    }
}
