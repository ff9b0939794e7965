//! Behaviour of the CPU engine beyond the goldens: packed-row isolation, gradient accumulation,
//! determinism (also across thread counts), dropout as a true gradient, resumable state, and
//! clear errors for bad model folders.

mod common;

use std::path::Path;

use lora_engine::testing::write_random_model;
use lora_engine::{AdapterConfig, Batch, DType, LoadOptions, Model, ModelConfig, NamedTensor, OptimConfig, Trainer};

fn tiny_dir(dir: &Path, dtype: DType) -> ModelConfig {
    let cfg = ModelConfig::tiny_llama(64);
    write_random_model(dir, &cfg, dtype, 5).unwrap();
    cfg
}

fn trainer(dir: &Path, adapter: AdapterConfig) -> Trainer {
    let model = Model::load(dir, &LoadOptions::cpu()).unwrap();
    let mut tr = Trainer::new(model, adapter, OptimConfig::default(), 11).unwrap();
    // Non-zero B so that every adapter gradient is informative.
    let mut ts = tr.adapter_tensors().unwrap();
    for t in ts.iter_mut().filter(|t| t.name.contains("lora_B")) {
        for (i, x) in t.data.iter_mut().enumerate() {
            *x = ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.2;
        }
    }
    tr.set_adapter_tensors(&ts).unwrap();
    tr
}

fn doc(seed: u32, len: usize) -> (Vec<u32>, Vec<bool>) {
    let ids = (0..len).map(|i| seed.wrapping_mul(31).wrapping_add(i as u32 * 17) % 64).collect();
    let mask = (0..len).map(|i| !(i as u32 + seed).is_multiple_of(3)).collect();
    (ids, mask)
}

fn batch(docs: &[(Vec<u32>, Vec<bool>)]) -> Batch {
    let mut b = Batch::default();
    for (ids, m) in docs {
        b.input_ids.extend(ids);
        b.train_mask.extend(m);
        b.seq_lens.push(ids.len() as u32);
    }
    b
}

fn max_rel_diff(a: &[NamedTensor], b: &[NamedTensor]) -> f64 {
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name, y.name);
        let scale = y.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) as f64;
        for (p, q) in x.data.iter().zip(&y.data) {
            worst = worst.max((p - q).abs() as f64 / scale);
        }
    }
    worst
}

#[test]
fn a_document_has_the_same_loss_alone_or_packed_with_others() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_dir(tmp.path(), DType::F32);
    let tr = trainer(tmp.path(), AdapterConfig::default());
    let (a, b, c) = (doc(1, 37), doc(2, 80), doc(3, 5));
    let (alone, n_alone) = tr.eval_loss(&batch(std::slice::from_ref(&b))).unwrap();
    let (packed, n_packed) = tr.eval_loss(&batch(&[a.clone(), b.clone(), c.clone()])).unwrap();
    let (la, _) = tr.eval_loss(&batch(&[a])).unwrap();
    let (lc, _) = tr.eval_loss(&batch(&[c])).unwrap();
    assert!(n_packed > n_alone);
    let rel = ((packed - la - lc) - alone).abs() / alone;
    assert!(rel < 1e-5, "doc loss alone {alone}, in a pack {}, rel diff {rel:e}", packed - la - lc);
}

#[test]
fn four_accumulated_micro_batches_equal_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_dir(tmp.path(), DType::F32);
    let adapter = AdapterConfig { use_dora: true, ..AdapterConfig::default() };
    let docs: Vec<_> = (0..8).map(|i| doc(i, 10 + 7 * i as usize)).collect();
    let full = batch(&docs);
    let mut one = trainer(tmp.path(), adapter.clone());
    let st = one.forward_backward(&full, 1.0).unwrap();
    let denom = st.trained_tokens as f32;
    one.zero_grad().unwrap();
    one.forward_backward(&full, denom).unwrap();
    let g_one = one.adapter_grads().unwrap();
    let mut acc = trainer(tmp.path(), adapter);
    let mut seen = 0;
    for chunk in docs.chunks(2) {
        seen += acc.forward_backward(&batch(chunk), denom).unwrap().trained_tokens;
    }
    assert_eq!(seen, st.trained_tokens);
    let g_acc = acc.adapter_grads().unwrap();
    let d = max_rel_diff(&g_acc, &g_one);
    assert!(d < 1e-5, "accumulated gradients differ from the one-batch gradients by {d:e} (relative to max)");
    let s1 = one.optimizer_step(1e-3).unwrap();
    let s2 = acc.optimizer_step(1e-3).unwrap();
    assert!((s1.grad_norm - s2.grad_norm).abs() / s1.grad_norm < 1e-5);
}

fn train_steps(dir: &Path, steps: usize) -> Vec<NamedTensor> {
    train_steps_with(dir, steps, false, false)
}

fn train_steps_with(dir: &Path, steps: usize, recompute: bool, dora: bool) -> Vec<NamedTensor> {
    let adapter = AdapterConfig { lora_dropout: 0.1, use_rslora: true, use_dora: dora, ..AdapterConfig::default() };
    let mut tr = trainer(dir, adapter);
    tr.recompute = recompute;
    let docs: Vec<_> = (0..6).map(|i| doc(i, 100 + 13 * i as usize)).collect();
    for _ in 0..steps {
        let b = batch(&docs);
        let n = b.train_mask.len() as f32;
        tr.forward_backward(&b, n).unwrap();
        tr.optimizer_step(2e-3).unwrap();
    }
    tr.adapter_tensors().unwrap()
}

fn bits(ts: &[NamedTensor]) -> Vec<u32> {
    ts.iter().flat_map(|t| t.data.iter().map(|x| x.to_bits())).collect()
}

/// The crate docs claim bit-identical results for any thread count.
#[test]
fn training_is_bit_identical_run_to_run_and_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_dir(tmp.path(), DType::BF16);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| bits(&train_steps(tmp.path(), 3)))
    };
    let one = run(1);
    assert_eq!(one, run(1), "two runs on 1 thread differ");
    assert_eq!(one, run(2), "1 thread and 2 threads differ");
    assert_eq!(one, run(3), "1 thread and 3 threads differ");
}

/// The run switches recompute on when activations would not fit, so it must not change the
/// result: same adapter bits with and without it (dropout on, LoRA and DoRA), and the memory
/// estimate the run plans with is smaller with it (2 layers here; the saving grows with depth).
#[test]
fn recompute_changes_memory_not_results() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_dir(tmp.path(), DType::F32);
    for dora in [false, true] {
        assert_eq!(
            bits(&train_steps_with(tmp.path(), 2, false, dora)),
            bits(&train_steps_with(tmp.path(), 2, true, dora)),
            "recompute changed the adapter (dora {dora})"
        );
    }
    let tr = trainer(tmp.path(), AdapterConfig::default());
    let (kept, recomputed) = (tr.activation_bytes(4096, false), tr.activation_bytes(4096, true));
    assert!(recomputed < kept, "{recomputed} vs {kept}");
    assert_eq!(tr.activation_bytes(8192, false), 2 * kept, "linear in tokens");
}

/// With dropout and DoRA, the analytic gradient equals a finite difference of the loss under the
/// same dropout masks (the state's micro-batch counter replays them).
#[test]
fn dropout_and_dora_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_dir(tmp.path(), DType::F32);
    let adapter = AdapterConfig { lora_dropout: 0.3, use_dora: true, r: 4, lora_alpha: 8.0, ..AdapterConfig::default() };
    let mut tr = trainer(tmp.path(), adapter);
    let b = batch(&[doc(4, 30), doc(5, 21)]);
    let state = tr.save_state().unwrap();
    tr.forward_backward(&b, 1.0).unwrap();
    let grads = tr.adapter_grads().unwrap();
    let base = tr.adapter_tensors().unwrap();
    let mut checked = 0;
    for name in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
        "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector",
    ] {
        let gi = grads.iter().find(|g| g.name == name).unwrap();
        let idx = (0..gi.data.len()).max_by(|&i, &j| gi.data[i].abs().total_cmp(&gi.data[j].abs())).unwrap();
        let loss_at = |delta: f32, tr: &mut Trainer| {
            tr.load_state(&state).unwrap();
            let mut ts = base.clone();
            ts.iter_mut().find(|t| t.name == name).unwrap().data[idx] += delta;
            tr.set_adapter_tensors(&ts).unwrap();
            let l = tr.forward_backward(&b, 1.0).unwrap().loss_sum;
            tr.zero_grad().unwrap();
            l
        };
        let h = 1e-2f32;
        let fd = (loss_at(h, &mut tr) - loss_at(-h, &mut tr)) / (2.0 * h as f64);
        let an = gi.data[idx] as f64;
        assert!((fd - an).abs() <= 0.02 * an.abs() + 1e-3, "{name}[{idx}]: analytic {an}, finite difference {fd}");
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn saved_state_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_dir(tmp.path(), DType::F32);
    let adapter = AdapterConfig { lora_dropout: 0.2, ..AdapterConfig::default() };
    let b = batch(&[doc(7, 40), doc(8, 33)]);
    let step = |tr: &mut Trainer| {
        tr.forward_backward(&b, 50.0).unwrap();
        tr.optimizer_step(1e-3).unwrap();
    };
    let mut a = trainer(tmp.path(), adapter.clone());
    step(&mut a);
    let saved = a.save_state().unwrap();
    step(&mut a);
    step(&mut a);
    let mut r = trainer(tmp.path(), adapter);
    r.load_state(&saved).unwrap();
    step(&mut r);
    step(&mut r);
    assert_eq!(bits(&a.adapter_tensors().unwrap()), bits(&r.adapter_tensors().unwrap()));
    assert_eq!(r.step(), 3);
}

#[test]
fn bad_model_folders_fail_with_errors_that_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tiny_dir(dir, DType::F32);
    let cfg_path = dir.join("config.json");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    let load_err = || Model::load(dir, &LoadOptions::cpu()).err().map(|e| e.to_string()).unwrap_or_default();

    std::fs::write(&cfg_path, good.replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap();
    let e = load_err();
    assert!(e.contains("GPT2LMHeadModel") && e.contains("Qwen3ForCausalLM"), "{e}");

    std::fs::write(&cfg_path, good.replace("\"rope_scaling\": null", "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}")).unwrap();
    let e = load_err();
    assert!(e.contains("yarn"), "{e}");

    std::fs::write(&cfg_path, good.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96")).unwrap();
    let e = load_err();
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[96, 64]") && e.contains("[128, 64]"), "{e}");

    std::fs::write(&cfg_path, &good).unwrap();
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err();
    assert!(e.contains("model.safetensors") && (e.contains("truncated") || e.contains("invalid")), "{e}");

    std::fs::remove_file(&st).unwrap();
    let e = load_err();
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn bad_batches_and_settings_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_dir(tmp.path(), DType::F32);
    let mut tr = trainer(tmp.path(), AdapterConfig::default());
    let mut b = batch(&[doc(1, 10)]);
    b.input_ids[3] = 999;
    let e = tr.forward_backward(&b, 1.0).unwrap_err().to_string();
    assert!(e.contains("999") && e.contains("position 3"), "{e}");
    let mut b = batch(&[doc(1, 10)]);
    b.seq_lens = vec![4, 4];
    assert!(tr.forward_backward(&b, 1.0).unwrap_err().to_string().contains("seq_lens"));
    let e = tr.forward_backward(&batch(&[doc(1, 10)]), 0.0).unwrap_err().to_string();
    assert!(e.contains("loss_denominator"), "{e}");

    let model = Model::load(tmp.path(), &LoadOptions::cpu()).unwrap();
    let bad = AdapterConfig { target_modules: vec!["lm_head".into()], ..AdapterConfig::default() };
    let e = Trainer::new(model, bad, OptimConfig::default(), 0).err().unwrap().to_string();
    assert!(e.contains("lm_head") && e.contains("never adapted"), "{e}");
}

#[test]
fn sharded_weights_load_the_same_model_as_one_file() {
    use lora_engine::weights::{OutTensor, WeightFiles, write_safetensors};
    let tmp = tempfile::tempdir().unwrap();
    let (one, sharded) = (tmp.path().join("one"), tmp.path().join("sharded"));
    tiny_dir(&one, DType::BF16);
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(one.join("config.json"), sharded.join("config.json")).unwrap();
    let files = WeightFiles::open(&one).unwrap();
    let names = files.names();
    let mut map = serde_json::Map::new();
    for (si, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", si + 1);
        let ts: Vec<OutTensor> = part
            .iter()
            .map(|n| {
                let shape = files.shape(n).unwrap();
                OutTensor { name: n.clone(), data: files.get(n, &shape).unwrap().0.to_f32(), shape }
            })
            .collect();
        write_safetensors(&sharded.join(&file), &ts, DType::BF16, None).unwrap();
        for n in part {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let b = batch(&[doc(1, 20), doc(2, 9)]);
    let logits = |dir: &Path| {
        let m = Model::load(dir, &LoadOptions::cpu()).unwrap();
        assert_eq!(m.file_dtype, DType::BF16);
        Trainer::new(m, AdapterConfig::default(), OptimConfig::default(), 0).unwrap().logits(&b).unwrap()
    };
    assert_eq!(logits(&one), logits(&sharded));
}

/// Mistral's sliding window is honoured (it used to refuse documents longer than the window):
/// the same weights with and without a window of 6 give the same logits for the first 6 tokens
/// of each document, and different ones after.
#[test]
fn a_sliding_window_changes_only_what_lies_past_it() {
    let logits = |window: Option<usize>| {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ModelConfig { arch: lora_engine::Arch::Mistral, sliding_window: window, ..ModelConfig::tiny_llama(64) };
        write_random_model(tmp.path(), &cfg, DType::F32, 1).unwrap();
        let m = Model::load(tmp.path(), &LoadOptions::cpu()).unwrap();
        assert_eq!(m.cfg.sliding_window, window);
        let tr = Trainer::new(m, AdapterConfig::default(), OptimConfig::default(), 0).unwrap();
        tr.logits(&batch(&[doc(1, 17), doc(2, 5), doc(3, 9)])).unwrap()
    };
    let (full, windowed) = (logits(None), logits(Some(6)));
    let rows = |l: &[f32], r: std::ops::Range<usize>| l[r.start * 64..r.end * 64].to_vec();
    for (start, len) in [(0, 17), (17, 5), (22, 9)] {
        let near = start..start + len.min(6);
        let d = rows(&full, near.clone()).iter().zip(rows(&windowed, near)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-6, "document at {start}: the first 6 tokens differ by {d}");
        if len > 6 {
            let far = start + 6..start + len;
            let d = rows(&full, far.clone()).iter().zip(rows(&windowed, far)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d > 1e-4, "document at {start}: tokens past the window are unchanged ({d})");
        }
    }
}
