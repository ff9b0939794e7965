//! `lora train` with 4-bit and 8-bit quantized base weights: what is written (a 16-bit merged
//! model folded into the original weights, bit for bit; the PEFT adapter as for any run; the
//! quantization in the manifest and the dry run), a bitsandbytes checkpoint as the base model,
//! and the refusals.

use std::path::Path;

use lora_engine::quant::bnb;
use lora_engine::weights::WeightFiles;
use lora_engine::{DType, QuantConfig};
use serde_json::Value;

use crate::common::*;
use crate::{SMALL, jsonl};

fn manifest(work: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(work.join("out/model/run_manifest.json")).unwrap()).unwrap()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Every adapted weight of the merged model is `bf16(f32(W16 + s·B·A))` of the base's 16-bit
/// `W16` (the sum exact, rounded once to f32, then to bf16); every other tensor is the base's,
/// byte for byte; no quantization tensor or config is left.
fn assert_merged_into_16bit(base: &Path, out: &Path, scale: f64) -> usize {
    let (b, m) = (WeightFiles::open(base).unwrap(), WeightFiles::open(out).unwrap());
    assert_eq!(b.names(), m.names(), "the merged model has the base's tensors");
    let adapter_path = out.join("adapter/adapter_model.safetensors");
    let adapter = lora::checkpoint::decode_safetensors(&std::fs::read(&adapter_path).unwrap(), &adapter_path).unwrap();
    let mut merged = 0;
    for name in b.names() {
        let shape = b.shape(&name).unwrap();
        let prefix = format!("base_model.model.{}", name.strip_suffix(".weight").unwrap_or(&name));
        let (wa, wb) = (b.raw(&name).unwrap(), m.raw(&name).unwrap());
        let lora_a = adapter.iter().find(|t| t.name == format!("{prefix}.lora_A.weight"));
        let Some(lora_a) = lora_a else {
            assert!(wa.bytes == wb.bytes, "{name}: not adapted, yet changed");
            continue;
        };
        let lora_b = adapter.iter().find(|t| t.name == format!("{prefix}.lora_B.weight")).unwrap();
        let (o, i, r) = (shape[0], shape[1], lora_a.shape[0]);
        let w = b.get(&name, &shape).unwrap().0.to_f32();
        let got = m.get(&name, &shape).unwrap().0.to_f32();
        assert_eq!(m.float_dtype(&name), Some(DType::BF16), "{name}: the base dtype");
        for row in 0..o {
            for col in 0..i {
                let d: f64 = (0..r).map(|k| lora_b.data[row * r + k] as f64 * lora_a.data[k * i + col] as f64).sum();
                let want = half::bf16::from_f32((w[row * i + col] as f64 + scale * d) as f32).to_f32();
                assert_eq!(got[row * i + col].to_bits(), want.to_bits(), "{name}[{row}, {col}]");
            }
        }
        merged += 1;
    }
    let cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none(), "the merged model is a plain 16-bit model");
    merged
}

/// QLoRA on the e2e tiny model (bf16): the run logs and records how the projections were held,
/// the adapter config is the one any run writes, and the merged model is folded into the
/// original 16-bit weights bit for bit.
#[test]
fn qlora_run_merges_into_the_original_16bit_weights_and_records_the_quantization() {
    let work = temp_dir("qlora");
    let model = tiny_model(&work.join("base"), DType::BF16);
    let args = [SMALL, &["--training-num-epochs", "1", "--training-lora-load-in-4bit", "true"]].concat();
    let out = run_ok(train_cmd(&work, &model, &capitals(), &args));
    let log = stderr_of(&out);
    assert!(log.contains("projections held 4-bit nf4, double quant, blocksize 64, compute bfloat16 (quantized at load from bfloat16 weights)"), "{log}");
    assert!(log.contains("folded into the original 16-bit weights"), "{log}");
    assert_eq!(assert_merged_into_16bit(&model, &work.join("out/model"), 2.0), 14, "all seven projections of both layers");

    let q = &manifest(&work)["quantization"];
    assert_eq!((q["bits"].as_u64(), q["quant_type"].as_str(), q["double_quant"].as_bool()), (Some(4), Some("nf4"), Some(true)), "{q}");
    assert_eq!((q["compute_dtype"].as_str(), q["source"].as_str(), q["merge_base"].as_str()), (Some("bfloat16"), Some("quantized_at_load"), Some("original 16-bit weights")));
    // 0.5 bytes of codes, 1/64 of absmax codes, and per matrix a 1 KiB nested map: 0.71 on
    // these 64x64 matrices, 0.518 on SmolLM2-135M's (`lora bench --load-in-4bit`).
    let per = q["bytes_per_quantized_param"].as_f64().unwrap();
    assert!((0.5..0.75).contains(&per), "{per}");
    let params = &manifest(&work)["params"];
    assert_eq!(params["training_lora_load_in_4bit"], true);
    assert_eq!((params["training_lora_bnb_4bit_quant_type"].as_str(), params["training_lora_bnb_4bit_compute_dtype"].as_str()), (Some("nf4"), Some("bfloat16")));

    // The adapter config is the one a 16-bit run writes (PEFT records nothing of QLoRA).
    let plain = temp_dir("qlora-plain");
    run_ok(train_cmd(&plain, &model, &capitals(), &[SMALL, &["--training-num-epochs", "1"]].concat()));
    let cfg = |w: &Path| -> Value { serde_json::from_slice(&std::fs::read(w.join("out/model/adapter/adapter_config.json")).unwrap()).unwrap() };
    assert_eq!(cfg(&work), cfg(&plain));
    assert!(adapter_bytes(&work) != adapter_bytes(&plain), "training saw the quantized weights");

    // Changing a 4-bit setting is a different run: no silent resume.
    let changed = [args.as_slice(), &["--training-lora-bnb-4bit-compute-dtype", "float32"]].concat();
    let out = train_cmd(&work, &model, &capitals(), &changed).output().unwrap();
    let log = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    // Named as the flag a `lora train` user types (issue 15).
    assert!(log.contains("--training-lora-bnb-4bit-compute-dtype: \"bfloat16\" → \"float32\""), "{log}");
}

/// fp4 without double quant and 8-bit train too, each recorded as it was run; 8-bit says that
/// only the weights are quantized.
#[test]
fn fp4_and_8bit_runs_train_and_say_what_they_held() {
    let base = temp_dir("q-other-base");
    let model = tiny_model(&base, DType::BF16);
    for (name, extra, needle) in [
        ("fp4", &["--training-lora-load-in-4bit", "true", "--training-lora-bnb-4bit-quant-type", "fp4", "--training-lora-bnb-4bit-use-double-quant", "false"][..], "4-bit fp4, blocksize 64, compute bfloat16"),
        ("int8", &["--training-lora-load-in-8bit", "true"][..], "8-bit int8 weight-only (activations are not quantized)"),
    ] {
        let work = temp_dir(&format!("q-{name}"));
        let out = run_ok(train_cmd(&work, &model, &capitals(), &[SMALL, &["--training-num-epochs", "1"], extra].concat()));
        assert!(stderr_of(&out).contains(needle), "{name}: {}", stderr_of(&out));
        let rows = jsonl(&work.join("pvc/checkpoints/training_metrics.jsonl"));
        assert!(rows.iter().filter_map(|r| r.get("loss").and_then(Value::as_f64)).all(f64::is_finite));
        let q = &manifest(&work)["quantization"];
        if name == "int8" {
            assert!(q["activations"].as_str().unwrap().contains("LLM.int8"), "{q}");
            assert!(q["quant_type"].is_null());
        } else {
            assert_eq!((q["quant_type"].as_str(), q["double_quant"].as_bool()), (Some("fp4"), Some(false)));
        }
        assert_merged_into_16bit(&model, &work.join("out/model"), 2.0);
    }
}

/// A bitsandbytes 4-bit checkpoint as the base model trains with the 4-bit switch (its stored
/// settings apply), and the merged model is folded into its dequantized weights, said in the
/// log and the manifest; without the switch, or with a contradicting setting, the run stops
/// before training, naming what to change (exit 2, the input hint).
#[test]
fn a_bitsandbytes_checkpoint_trains_and_merges_onto_its_dequantized_weights() {
    let work = temp_dir("q-ckpt");
    let model16 = tiny_model(&work.join("base16"), DType::BF16);
    let ckpt = work.join("base4");
    bnb::write_checkpoint(&model16, &ckpt, &QuantConfig::FourBit { quant_type: Some(lora_engine::QuantType::Fp4), double_quant: Some(true), compute_dtype: None }).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        std::fs::copy(model16.join(f), ckpt.join(f)).unwrap();
    }
    let fail = |extra: &[&str], needles: &[&str]| {
        let w = temp_dir("q-ckpt-fail");
        let out = train_cmd(&w, &ckpt, &capitals(), &[SMALL, extra].concat()).output().unwrap();
        let log = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{log}");
        assert!(needles.iter().all(|n| log.contains(n)) && log.contains("hint: `--dry-run`"), "{needles:?}: {log}");
        assert!(!w.join("out/model").exists());
    };
    fail(&[], &["bitsandbytes 4-bit checkpoint", "training_lora_load_in_4bit=true"]);
    fail(&["--training-lora-load-in-4bit", "true", "--training-lora-bnb-4bit-quant-type", "nf4"], &["bnb_4bit_quant_type=nf4", "stores fp4"]);
    fail(&["--training-lora-load-in-8bit", "true"], &["4-bit checkpoint", "training_lora_load_in_4bit=true"]);

    let run = temp_dir("q-ckpt-run");
    let out = run_ok(train_cmd(&run, &ckpt, &capitals(), &[SMALL, &["--training-num-epochs", "1", "--training-lora-load-in-4bit", "true"]].concat()));
    let log = stderr_of(&out);
    assert!(log.contains("4-bit fp4, double quant") && log.contains("read from a bitsandbytes checkpoint"), "{log}");
    assert!(log.contains("folded into its dequantized weights"), "{log}");
    let q = &manifest(&run)["quantization"];
    assert_eq!((q["source"].as_str(), q["merge_base"].as_str()), (Some("checkpoint"), Some("dequantized weights (the base is a bitsandbytes checkpoint)")), "{q}");
    // The merged model is a plain 16-bit model with the 16-bit model's tensor names: each
    // projection the dequantized weight (plus the adapter), no quantization tensors.
    let merged = WeightFiles::open(&run.join("out/model")).unwrap();
    assert_eq!(merged.names(), WeightFiles::open(&model16).unwrap().names());
    let m = lora_engine::Model::load(&ckpt, &lora_engine::LoadOptions::cpu().with_quant(Some(QuantConfig::four_bit()))).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let dq_bf16: Vec<f32> = m.dequantized_linears().unwrap().into_iter().find(|(n, _)| n == name).unwrap().1;
    let got = merged.get(name, &[64, 64]).unwrap().0.to_f32();
    let moved = got.iter().zip(&dq_bf16).filter(|(a, b)| a != b).count();
    assert!(moved > 0 && merged.float_dtype(name) == Some(DType::BF16), "the adapter is folded in, in bf16");
    let max = got.iter().zip(&dq_bf16).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max < 0.05, "merged onto the dequantized weight: max change {max}");
    let cfg: Value = serde_json::from_slice(&std::fs::read(run.join("out/model/config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
}

/// `--dry-run` shows the resolved quantization, what the base model is and where the merge goes,
/// and refuses a checkpoint that contradicts the settings, before anything runs.
#[test]
fn dry_run_shows_the_quantization_plan() {
    let work = temp_dir("q-dry");
    let model = tiny_model(&work.join("base"), DType::BF16);
    let dry = |m: &Path, extra: &[&str]| {
        let mut c = train_cmd(&work, m, &capitals(), extra);
        c.args(["--dry-run", "--json"]);
        c.output().unwrap()
    };
    let out = dry(&model, &["--training-lora-load-in-4bit", "true", "--training-lora-bnb-4bit-compute-dtype", "torch.float16"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let q = &plan["quantization"];
    assert_eq!((q["bits"].as_u64(), q["quant_type"].as_str(), q["double_quant"].as_bool(), q["compute_dtype"].as_str()), (Some(4), Some("nf4"), Some(true), Some("float16")), "{q}");
    assert!(q["base_model"].as_str().unwrap().contains("quantized at load") && q["merged_model"].as_str().unwrap().contains("original 16-bit"), "{q}");
    assert_eq!(plan["parameters"]["training_lora_bnb_4bit_compute_dtype"]["value"], "float16");
    let out = dry(&model, &[]);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(plan["quantization"].is_null());

    let ckpt = work.join("base8");
    bnb::write_checkpoint(&model, &ckpt, &QuantConfig::EightBit).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(model.join(f), ckpt.join(f)).unwrap();
    }
    let out = dry(&ckpt, &["--training-lora-load-in-8bit", "true"]);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(plan["quantization"]["base_model"].as_str().unwrap().contains("bitsandbytes checkpoint"), "{plan}");
    let out = dry(&ckpt, &["--training-lora-load-in-4bit", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("8-bit checkpoint"), "{}", stderr_of(&out));
}
