//! Merged-model trust (issue 15): the merged weights are evaluated on the eval split like the
//! adapter, both losses are in the metrics, and `training_merged_dtype=float32` writes a merged
//! model that keeps all of the adapter's update.

use super::common::*;
use lora_engine::DType;
use serde_json::Value;

fn metrics(work: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(work.join("out/metrics.json")).unwrap()).unwrap()
}

/// The dtype recorded in a safetensors header for `tensor`.
fn stored_dtype(file: &std::path::Path, tensor: &str) -> String {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header[tensor]["dtype"].as_str().unwrap().to_string()
}

#[test]
fn the_merged_model_is_evaluated_and_float32_keeps_the_whole_update() {
    let work = temp_dir("merged");
    let model = learnable_model_in(&work.join("base"), 8.0, DType::BF16);
    let args = ["--training-effective-batch-size", "8", "--training-lr-warmup-steps", "1", "--training-num-epochs", "4", "--training-learning-rate", "5e-3", "--training-validation-split", "0.25"];
    let out = run_ok(train_cmd(&work, &model, &capitals(), &args));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let m = metrics(&work);
    let (adapter, merged) = (m["training_eval_loss"].as_f64().unwrap(), m["training_merged_eval_loss"].as_f64().unwrap());
    assert!(stderr.contains("merged model eval_loss"), "{stderr}");
    assert!(m["training_merged_kept_gain"].is_number(), "{m}");
    assert_eq!(stored_dtype(&work.join("out/model/model.safetensors"), "model.layers.0.self_attn.q_proj.weight"), "BF16");
    // The eval before the first step is in the history: the chart shows before → after.
    let rows: Vec<Value> = std::fs::read_to_string(work.join("pvc/checkpoints/training_metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first_eval = rows.iter().find(|r| r.get("eval_loss").is_some()).unwrap();
    assert_eq!(first_eval["step"], 0, "{first_eval}");
    assert!(first_eval["eval_loss"].as_f64().unwrap() > adapter, "training lowered the eval loss");
    let chart = std::fs::read_to_string(work.join("out/loss_chart.html")).unwrap();
    assert!(chart.contains("merged model eval") && chart.contains(&format!("merged model {merged:.3}")), "the chart shows the merged eval");

    // float32: a rerun with only the merged dtype changed resumes the finished run (the
    // parameter does not change training) and rewrites the merged model in float32.
    let f32_args = [&args[..], &["--training-merged-dtype", "float32"]].concat();
    let out = run_ok(train_cmd(&work, &model, &capitals(), &f32_args));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"), "{}", String::from_utf8_lossy(&out.stderr));
    let m32 = metrics(&work);
    let merged32 = m32["training_merged_eval_loss"].as_f64().unwrap();
    assert_eq!(stored_dtype(&work.join("out/model/model.safetensors"), "model.layers.0.self_attn.q_proj.weight"), "F32");
    let cfg: Value = serde_json::from_slice(&std::fs::read(work.join("out/model/config.json")).unwrap()).unwrap();
    let dtype = if cfg["torch_dtype"].is_string() { &cfg["torch_dtype"] } else { &cfg["dtype"] };
    assert_eq!(dtype, "float32", "{cfg}");
    assert!((merged32 - adapter).abs() <= 1e-3 * adapter, "float32 merge {merged32} vs adapter {adapter} (bf16 merge {merged})");
    assert!((merged32 - adapter).abs() <= (merged - adapter).abs() + 1e-6, "float32 is at least as close as bf16");

    let bad = train_cmd(&work, &model, &capitals(), &[&args[..], &["--training-merged-dtype", "fp8"]].concat()).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("training_merged_dtype"), "{}", String::from_utf8_lossy(&bad.stderr));
    let _ = std::fs::remove_dir_all(&work);
}
