//! Quantized base weights against bitsandbytes 0.50.2: the goldens written by
//! `tests/engine/quant/make_goldens.py` (formats byte for byte and dequantization bit for bit,
//! checkpoints transformers wrote on CPU, one QLoRA step of PEFT over a 4-bit base).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lora_engine::quant::{Absmax, DoubleQuant, Quant4, Quant8, QuantType};
use lora_engine::{DType, ModelConfig};
use safetensors::{Dtype, SafeTensors};

fn quant_dir() -> PathBuf {
    common::repo_root().join("tests/engine/quant/golden")
}

/// A golden tensor: dtype, shape and raw little-endian bytes.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Raw {
    fn f32s(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => self.bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            d => panic!("not floats: {d:?}"),
        }
    }
}

fn read_raw(path: &Path) -> HashMap<String, Raw> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, Raw { dtype: v.dtype(), shape: v.shape().to_vec(), bytes: v.data().to_vec() })).collect()
}

/// The e2e tiny model (`tests/e2e/common::tiny_model`'s weights) into `LORA_E2E_MODEL_DIR`, for
/// `make_goldens.py`.
#[test]
#[ignore = "fixture for tests/engine/quant/make_goldens.py"]
fn e2e_model_fixture() {
    let dir = PathBuf::from(std::env::var("LORA_E2E_MODEL_DIR").expect("set LORA_E2E_MODEL_DIR"));
    lora_engine::testing::write_random_model(&dir, &ModelConfig::tiny_llama(49152), DType::BF16, 7).unwrap();
}

/// `(golden tensors, variant names)` of formats.safetensors.
fn formats() -> HashMap<String, Raw> {
    read_raw(&quant_dir().join("formats.safetensors"))
}

fn first_mismatch<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: {} of {} differ, first at [{i}]: got {:?} want {:?}",
            got.iter().zip(want).filter(|(a, b)| a != b).count(),
            got.len(),
            got[i],
            want[i]
        )),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| half::bf16::from_f32(*x).to_bits()).collect()
}

/// Our quantizer's packed codes, absmax, double-quant codes and nested absmax equal the goldens
/// byte for byte (nf4/fp4 x double quant, 8-bit), and our decoder's values (host and the CPU
/// backend's op) equal bitsandbytes' dequantization bit for bit, on three real tensors of the
/// e2e model (a partial nested block, a partial 4-bit block, an odd count).
#[test]
fn formats_match_bitsandbytes_byte_for_byte() {
    let g = formats();
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(quant_dir().join("formats.json")).unwrap()).unwrap();
    let mut errs = Vec::new();
    let mut checked = 0;
    for name in ["q_proj", "embed", "odd"] {
        let input = &g[&format!("{name}.input")];
        let w = input.f32s();
        let shape = input.shape.clone();
        for (t, tag) in [(QuantType::Nf4, "nf4"), (QuantType::Fp4, "fp4")] {
            for dq in [false, true] {
                let v = format!("{name}.{tag}{}", if dq { "_dq" } else { "" });
                let ours = Quant4::quantize(&w, &shape, t, 64, dq).unwrap();
                let mut check = |r: Result<(), String>| {
                    checked += 1;
                    if let Err(e) = r {
                        errs.push(format!("{v}: {e}"));
                    }
                };
                check(first_mismatch("packed", &ours.packed, &g[&format!("{v}.packed")].bytes));
                let golden = if dq {
                    let plain = Quant4::quantize(&w, &shape, t, 64, false).unwrap().absmax_f32();
                    let offset = g[&format!("{v}.offset")].f32s()[0];
                    // Codes given bitsandbytes' offset (its torch.mean); our own offset alongside.
                    let d = DoubleQuant::with_offset(&plain, offset);
                    check(first_mismatch("absmax codes", &d.codes, &g[&format!("{v}.absmax_codes")].bytes));
                    check(first_mismatch("nested absmax", &bits(&d.nested_absmax), &bits(&g[&format!("{v}.nested_absmax")].f32s())));
                    check(first_mismatch("nested map", &bits(&d.map), &bits(&g[&format!("{v}.nested_map")].f32s())));
                    let ours_offset = match &ours.absmax {
                        Absmax::Double(d) => d.offset,
                        Absmax::Plain(_) => unreachable!("double quant requested"),
                    };
                    assert_eq!(meta["variants"][&v]["offset_f64_mean"].as_f64().unwrap() as f32, ours_offset, "{v}: the script's f64 mean is ours");
                    println!("{v}: offset ours {ours_offset:e} vs bitsandbytes {offset:e} ({})", if ours_offset == offset { "equal" } else { "differ" });
                    Absmax::Double(d)
                } else {
                    check(first_mismatch("absmax", &bits(&ours.absmax_f32()), &bits(&g[&format!("{v}.absmax")].f32s())));
                    Absmax::Plain(g[&format!("{v}.absmax")].f32s())
                };
                // Decoding bitsandbytes' data.
                let q = Quant4 { quant_type: t, blocksize: 64, shape: shape.clone(), packed: g[&format!("{v}.packed")].bytes.clone(), absmax: golden };
                let bf16 = q.dequantize(DType::BF16);
                let want_bf16: Vec<u16> = g[&format!("{v}.dequant_bf16")].bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                check(first_mismatch("dequant bf16", &bf16_bits(&bf16), &want_bf16));
                if let Some(f) = g.get(&format!("{v}.dequant_f32")) {
                    check(first_mismatch("dequant f32", &bits(&q.dequantize(DType::F32)), &bits(&f.f32s())));
                }
                let be = lora_engine::cpu::CpuBackend::new();
                let dev = lora_engine::quant::QuantTensor::Four(q.clone()).upload(&be).unwrap();
                let mut out = lora_engine::Backend::zeros(&be, w.len(), DType::F32).unwrap();
                lora_engine::Backend::dequantize(&be, &dev, DType::BF16, &mut out).unwrap();
                check(first_mismatch("cpu backend dequant bf16", &bf16_bits(&lora_engine::Backend::download_f32(&be, &out).unwrap()), &want_bf16));
            }
        }
        let q8 = Quant8::quantize(&w, &shape).unwrap();
        let v = format!("{name}.int8");
        let cb: Vec<u8> = q8.cb.iter().map(|&c| c as u8).collect();
        let mut check = |r: Result<(), String>| {
            checked += 1;
            if let Err(e) = r {
                errs.push(format!("{v}: {e}"));
            }
        };
        check(first_mismatch("CB", &cb, &g[&format!("{v}.cb")].bytes));
        check(first_mismatch("SCB", &bits(&q8.scb), &bits(&g[&format!("{v}.scb")].f32s())));
        if let Some(d) = g.get(&format!("{v}.dequant_f32")) {
            check(first_mismatch("dequant", &bits(&q8.dequantize(DType::F32)), &bits(&d.f32s())));
        }
    }
    assert!(errs.is_empty(), "{} of {checked} checks failed:\n{}", errs.len(), errs.join("\n"));
    println!("{checked} byte-for-byte checks passed");
}

/// The golden inputs are the e2e tiny model's own tensors (so the goldens stay tied to the model
/// the end-to-end tests train).
#[test]
fn golden_inputs_are_tensors_of_the_e2e_model() {
    let dir = tempfile::tempdir().unwrap();
    lora_engine::testing::write_random_model(dir.path(), &ModelConfig::tiny_llama(49152), DType::BF16, 7).unwrap();
    let model = read_raw(&dir.path().join("model.safetensors"));
    let g = formats();
    let q = &model["model.layers.0.self_attn.q_proj.weight"].bytes;
    assert_eq!(&g["q_proj.input"].bytes, q);
    assert_eq!(g["embed.input"].bytes[..], model["model.embed_tokens.weight"].bytes[..260 * 64 * 2]);
    assert_eq!(g["odd.input"].bytes[..], model["model.layers.0.self_attn.k_proj.weight"].bytes[..65 * 2]);
}

use lora_engine::quant::bnb;
use lora_engine::{AdapterConfig, Batch, LoadOptions, Model, NamedTensor, OptimConfig, QuantConfig, QuantSource, Trainer};

const VARIANTS: [&str; 4] = ["nf4", "nf4_dq", "fp4_dq", "int8"];

fn ckpt(variant: &str) -> PathBuf {
    quant_dir().join("checkpoints").join(variant)
}

/// The switch each golden checkpoint needs, with every 4-bit setting left to the checkpoint.
fn switch(variant: &str) -> QuantConfig {
    if variant == "int8" { QuantConfig::EightBit } else { QuantConfig::four_bit() }
}

/// The settings transformers quantized `variant` with, spelled out.
fn settings(variant: &str) -> QuantConfig {
    match variant {
        "nf4" => QuantConfig::FourBit { quant_type: Some(QuantType::Nf4), double_quant: Some(false), compute_dtype: Some(DType::F32) },
        "nf4_dq" => QuantConfig::FourBit { quant_type: Some(QuantType::Nf4), double_quant: Some(true), compute_dtype: Some(DType::F32) },
        "fp4_dq" => QuantConfig::FourBit { quant_type: Some(QuantType::Fp4), double_quant: Some(true), compute_dtype: Some(DType::F32) },
        _ => QuantConfig::EightBit,
    }
}

fn load(dir: &Path, q: QuantConfig) -> lora_engine::Result<Model> {
    Model::load(dir, &LoadOptions::cpu().with_quant(Some(q)))
}

fn small_batch() -> Batch {
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 64).collect();
    Batch { train_mask: vec![true; ids.len()], seq_lens: vec![13, 11], input_ids: ids }
}

/// The checkpoints transformers wrote on CPU load (their quantized tensors as stored) and train:
/// the loss of a fixed batch goes down over a few steps.
#[test]
fn bnb_checkpoints_written_by_transformers_load_and_train() {
    for v in VARIANTS {
        let model = load(&ckpt(v), switch(v)).unwrap_or_else(|e| panic!("{v}: {e}"));
        let info = model.quant.clone().unwrap();
        assert_eq!(info.source, QuantSource::Checkpoint, "{v}");
        assert_eq!(info.bits, if v == "int8" { 8 } else { 4 }, "{v}");
        assert_eq!(info.double_quant, v.ends_with("_dq"), "{v}");
        assert_eq!(info.linear_params, 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3, "{v}: every projection is quantized");
        // One f32 buffer per distinct projection size (q/o, k/v, the MLP's), in the memory plan.
        assert_eq!(model.dequant_scratch_bytes(), (64 * 64 + 32 * 64 + 128 * 64) * 4, "{v}");
        let mut tr = Trainer::new(model, AdapterConfig { r: 4, ..AdapterConfig::default() }, OptimConfig::default(), 1).unwrap();
        let batch = small_batch();
        let n = batch.train_mask.len() as f32 - 2.0;
        let mut losses = Vec::new();
        for _ in 0..4 {
            losses.push(tr.forward_backward(&batch, n).unwrap().loss_sum / n as f64);
            tr.optimizer_step(1e-2).unwrap();
        }
        println!("{v}: {}; losses {losses:?}", info.describe());
        assert!(losses.iter().all(|l| l.is_finite()) && losses[3] < losses[0], "{v}: {losses:?}");
    }
}

/// Whether `x` (a weight divided by its block's absmax) lies within `ulps` of a decision
/// boundary of `code` (the midpoint of two neighbouring code values), or both codes are zeros of
/// either sign: the two places where bitsandbytes' CPU path and its CUDA kernel (which this
/// engine follows) may pick different 4-bit codes.
fn cpu_cuda_window(x: f32, code: &[f32; 16], ours: u8, theirs: u8, ulps: u32) -> bool {
    if code[ours as usize] == 0.0 && code[theirs as usize] == 0.0 {
        return true;
    }
    let mut sorted = *code;
    sorted.sort_by(f32::total_cmp);
    sorted.windows(2).any(|w| {
        let mid = (w[0] + w[1]) / 2.0;
        (mid.abs().to_bits() as i64 - x.abs().to_bits() as i64).unsigned_abs() <= ulps as u64 && (mid < 0.0) == (x < 0.0)
    })
}

/// transformers quantized the 16-bit source on CPU; our quantization of it holds the same
/// tensors: byte for byte for nf4 and int8 (our whole model.safetensors equals transformers'),
/// and with double quant byte for byte given transformers' offset (its `torch.mean` rounds in
/// another order than our f64 sum: 1 ulp apart at most). FP4 codes differ only where bitsandbytes'
/// CPU path and its CUDA kernel do (see tests/engine/quant/make_goldens.py).
#[test]
fn bnb_checkpoints_written_by_transformers_hold_our_quantization() {
    let source = WeightFilesOf::open(&ckpt("source"));
    let out = tempfile::tempdir().unwrap();
    for v in VARIANTS {
        let theirs_files = lora_engine::weights::WeightFiles::open(&ckpt(v)).unwrap();
        let cfg = bnb::read_config(&ckpt(v)).unwrap().unwrap();
        let (mut windows, mut offsets_off) = (0, 0);
        for m in lora_engine::Module::ALL {
            let prefix = format!("model.layers.0.{}", m.path());
            let w = source.f32s(&format!("{prefix}.weight"));
            let shape = source.shape(&format!("{prefix}.weight"));
            let (theirs, _) = bnb::read_linear(&theirs_files, &prefix, (shape[0], shape[1]), &cfg).unwrap();
            match theirs {
                lora_engine::quant::QuantTensor::Eight(t) => {
                    let ours = Quant8::quantize(&w, &shape).unwrap();
                    assert!(ours == t, "{v} {prefix}: int8 CB/SCB differ");
                }
                lora_engine::quant::QuantTensor::Four(t) => {
                    let ours = Quant4::quantize(&w, &shape, t.quant_type, 64, false).unwrap();
                    let plain = ours.absmax_f32();
                    for (i, (a, b)) in ours.packed.iter().zip(&t.packed).enumerate() {
                        for (shift, e) in [(4, 2 * i), (0, 2 * i + 1)] {
                            let (qa, qb) = ((a >> shift) & 15, (b >> shift) & 15);
                            if qa != qb && e < w.len() {
                                let x = w[e] * (1.0 / plain[e / 64]);
                                assert!(cpu_cuda_window(x, t.quant_type.code_book(), qa, qb, 15), "{v} {prefix}[{e}]: x {x}: ours {qa} vs {qb}");
                                windows += 1;
                            }
                        }
                    }
                    match &t.absmax {
                        Absmax::Plain(a) => assert_eq!(bits(a), bits(&plain), "{v} {prefix}: absmax"),
                        Absmax::Double(d) => {
                            let own = DoubleQuant::mean(&plain);
                            let ulps = (own.to_bits() as i64 - d.offset.to_bits() as i64).abs();
                            assert!(ulps <= 1, "{v} {prefix}: offset {own} vs transformers' {}", d.offset);
                            offsets_off += (ulps != 0) as usize;
                            let given = DoubleQuant::with_offset(&plain, d.offset);
                            assert!(given == *d, "{v} {prefix}: double quant given transformers' offset differs");
                        }
                    }
                }
            }
        }
        println!("{v}: 7 projections, {windows} FP4 codes in CPU/CUDA windows, {offsets_off} offsets 1 ulp from our mean");
        if v == "nf4" || v == "int8" {
            let dir = out.path().join(v);
            bnb::write_checkpoint(&ckpt("source"), &dir, &settings(v)).unwrap();
            let (a, b) = (std::fs::read(dir.join("model.safetensors")).unwrap(), std::fs::read(ckpt(v).join("model.safetensors")).unwrap());
            assert!(a == b, "{v}: our model.safetensors differs from transformers' ({} vs {} bytes)", a.len(), b.len());
        }
        let dir = out.path().join(format!("{v}-cfg"));
        bnb::write_checkpoint(&ckpt("source"), &dir, &settings(v)).unwrap();
        let cfg = |d: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap() };
        assert_eq!(cfg(&dir)["quantization_config"], cfg(&ckpt(v))["quantization_config"], "{v}: quantization_config key for key");
        // Our own checkpoint loads back to the weights we quantized.
        let back = load(&dir, switch(v)).unwrap();
        let direct = load(&ckpt("source"), settings(v)).unwrap();
        for ((n, a), (_, b)) in back.dequantized_linears().unwrap().iter().zip(&direct.dequantized_linears().unwrap()) {
            first_mismatch(&format!("{v} {n} round trip"), &bits(a), &bits(b)).unwrap();
        }
    }
}

/// Float tensors of a golden model folder.
struct WeightFilesOf(HashMap<String, Raw>);

impl WeightFilesOf {
    fn open(dir: &Path) -> Self {
        WeightFilesOf(read_raw(&dir.join("model.safetensors")))
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        self.0[name].f32s()
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.0[name].shape.clone()
    }
}

fn tensors_of(step: &HashMap<String, Raw>, case: &str, kind: &str, names: &[String]) -> Vec<NamedTensor> {
    names
        .iter()
        .map(|n| {
            let r = &step[&format!("{case}.{kind}.{n}")];
            NamedTensor { name: n.clone(), shape: r.shape.clone(), data: r.f32s() }
        })
        .collect()
}

/// One QLoRA step: PEFT + bitsandbytes on CPU vs this engine over the same 4-bit base (the
/// nf4 double-quant checkpoint, compute dtype float32): loss and every LoRA gradient, LoRA and
/// DoRA, within 1e-5 of the largest magnitude of each tensor.
#[test]
fn qlora_step_matches_peft_over_the_same_4bit_base() {
    let step = read_raw(&quant_dir().join("step.safetensors"));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(quant_dir().join("step.json")).unwrap()).unwrap();
    let ints = |n: &str| -> Vec<i64> { step[n].bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect() };
    let batch = Batch {
        input_ids: ints("input_ids").iter().map(|&x| x as u32).collect(),
        train_mask: ints("train_mask").iter().map(|&x| x != 0).collect(),
        seq_lens: ints("seq_lens").iter().map(|&x| x as u32).collect(),
    };
    let mut worst = 0f64;
    let mut errs = Vec::new();
    for case in ["lora", "dora"] {
        let m = &meta["cases"][case];
        let names: Vec<String> = m["param_names"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
        let model = load(&ckpt("nf4_dq"), QuantConfig::four_bit()).unwrap();
        assert_eq!(model.quant.as_ref().unwrap().compute_dtype, DType::F32, "the checkpoint's bnb_4bit_compute_dtype");
        let acfg = AdapterConfig { r: 4, lora_alpha: 8.0, use_dora: m["use_dora"].as_bool().unwrap(), init_seed: 1, ..AdapterConfig::default() };
        let mut tr = Trainer::new(model, acfg, OptimConfig::default(), 0).unwrap();
        tr.set_adapter_tensors(&tensors_of(&step, case, "init", &names)).unwrap();
        let n = m["trained_tokens"].as_u64().unwrap() as f32;
        let st = tr.forward_backward(&batch, n).unwrap();
        assert_eq!(st.trained_tokens as f32, n);
        let (loss, want) = (st.loss_sum / n as f64, m["loss"].as_f64().unwrap());
        let rel = (loss - want).abs() / want.abs();
        println!("{case}: loss {loss:.7} vs PEFT {want:.7}: relative {rel:.2e}");
        worst = worst.max(rel);
        if rel > 1e-5 {
            errs.push(format!("{case} loss: {loss} vs {want}"));
        }
        let grads: HashMap<String, Vec<f32>> = tr.adapter_grads().unwrap().into_iter().map(|t| (t.name, t.data)).collect();
        let mut case_worst = 0f64;
        for w in tensors_of(&step, case, "grad", &names) {
            let got = &grads[&w.name];
            let scale = w.data.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
            let err = got.iter().zip(&w.data).fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
            let rel = err / scale.max(1e-30);
            case_worst = case_worst.max(rel);
            if rel > 1e-5 {
                errs.push(format!("{case} grad {}: max error {err:.3e} of max |grad| {scale:.3e} ({rel:.2e})", w.name));
            }
        }
        println!("{case}: {} gradients, worst max-error / max-|grad| {case_worst:.2e}", names.len());
        worst = worst.max(case_worst);
    }
    println!("worst relative error {worst:.2e}");
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

/// A copy of checkpoint `v` with its tensors changed by `edit` (and config.json by `edit_cfg`).
fn broken_copy(v: &str, edit: impl FnOnce(&mut HashMap<String, Raw>), edit_cfg: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut t = read_raw(&ckpt(v).join("model.safetensors"));
    edit(&mut t);
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        t.iter().map(|(n, r)| (n.clone(), safetensors::tensor::TensorView::new(r.dtype, r.shape.clone(), &r.bytes).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(ckpt(v).join("config.json")).unwrap()).unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn raw_bytes(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Raw {
    Raw { dtype, shape, bytes }
}

/// Wrong or inconsistent quantization data is an error naming the tensor (or the setting), never
/// a panic or a silently wrong weight.
#[test]
fn broken_or_inconsistent_checkpoints_are_refused_by_name() {
    let q = "model.layers.0.self_attn.q_proj.weight";
    let no_cfg = |_: &mut serde_json::Value| {};
    let cases: Vec<(&str, tempfile::TempDir, QuantConfig, Vec<&str>)> = vec![
        ("custom quant_map", broken_copy("nf4_dq", |t| t.get_mut(&format!("{q}.quant_map")).unwrap().bytes[4] ^= 1, no_cfg), QuantConfig::four_bit(), vec![".quant_map", "code book"]),
        ("short absmax", broken_copy("nf4", |t| {
            let a = t.get_mut(&format!("{q}.absmax")).unwrap();
            a.bytes.truncate(a.bytes.len() - 4);
            a.shape = vec![a.shape[0] - 1];
        }, no_cfg), QuantConfig::four_bit(), vec![".absmax", "expected 64 elements"]),
        ("quant_state shape", broken_copy("nf4_dq", |t| {
            let k = format!("{q}.quant_state.bitsandbytes__nf4");
            let text = String::from_utf8(t[&k].bytes.clone()).unwrap().replace("[64, 64]", "[64, 32]");
            t.insert(k, raw_bytes(Dtype::U8, vec![text.len()], text.into_bytes()));
        }, no_cfg), QuantConfig::four_bit(), vec!["quant_state.bitsandbytes__nf4", "shape"]),
        ("quant_state not json", broken_copy("nf4", |t| {
            t.insert(format!("{q}.quant_state.bitsandbytes__nf4"), raw_bytes(Dtype::U8, vec![3], b"{x}".to_vec()));
        }, no_cfg), QuantConfig::four_bit(), vec!["quant_state.bitsandbytes__nf4", "JSON"]),
        ("missing quant_state", broken_copy("nf4", |t| {
            t.remove(&format!("{q}.quant_state.bitsandbytes__nf4"));
        }, no_cfg), QuantConfig::four_bit(), vec![q, "quant_state"]),
        ("nan nested absmax", broken_copy("nf4_dq", |t| {
            t.get_mut(&format!("{q}.nested_absmax")).unwrap().bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }, no_cfg), QuantConfig::four_bit(), vec![".nested_absmax", "NaN"]),
        ("config without double quant", broken_copy("nf4_dq", |_| {}, |c| c["quantization_config"]["bnb_4bit_use_double_quant"] = false.into()),
            QuantConfig::four_bit(), vec!["double quantization", "bnb_4bit_use_double_quant"]),
        ("another method", broken_copy("nf4", |_| {}, |c| c["quantization_config"]["quant_method"] = "gptq".into()), QuantConfig::four_bit(), vec!["gptq", "bitsandbytes"]),
        ("int8 layout", broken_copy("int8", |t| {
            t.insert(format!("{q}_format"), raw_bytes(Dtype::U8, vec![], vec![1]));
        }, no_cfg), QuantConfig::EightBit, vec!["weight_format", "row-major"]),
    ];
    for (what, dir, qc, needles) in cases {
        let e = match load(dir.path(), qc) {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(needles.iter().all(|n| e.contains(n)), "{what}: {e}");
    }
    // The switches must match the checkpoint.
    for (v, qc, needles) in [
        ("nf4", None, vec!["4-bit checkpoint", "training_lora_load_in_4bit=true"]),
        ("int8", Some(QuantConfig::four_bit()), vec!["8-bit checkpoint", "training_lora_load_in_8bit=true"]),
        ("nf4", Some(QuantConfig::EightBit), vec!["4-bit checkpoint", "training_lora_load_in_4bit=true"]),
        ("nf4", Some(QuantConfig::FourBit { quant_type: Some(QuantType::Fp4), double_quant: None, compute_dtype: None }), vec!["bnb_4bit_quant_type=fp4", "stores nf4"]),
        ("nf4", Some(QuantConfig::FourBit { quant_type: None, double_quant: Some(true), compute_dtype: None }), vec!["bnb_4bit_use_double_quant=true", "without"]),
    ] {
        let e = Model::load(&ckpt(v), &LoadOptions::cpu().with_quant(qc)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(needles.iter().all(|n| e.contains(n)), "{v} {qc:?}: {e}");
    }
}
