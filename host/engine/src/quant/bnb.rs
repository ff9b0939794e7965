//! bitsandbytes checkpoints as transformers saves them (`save_pretrained` of a model loaded with
//! a `BitsAndBytesConfig`), read and written.
//!
//! `config.json` carries `quantization_config` (`quant_method: "bitsandbytes"`, `load_in_4bit` or
//! `load_in_8bit`, `bnb_4bit_*`). Each quantized linear `<m>` (every decoder projection; the
//! embeddings, norms and output head stay 16-bit) is stored as:
//! - 4-bit: `<m>.weight` U8 `[ceil(n/2), 1]` (packed codes), `<m>.weight.absmax` (F32 per block, or
//!   U8 codes with double quant), `<m>.weight.quant_map` F32 `[16]`, with double quant
//!   `<m>.weight.nested_absmax` F32 and `<m>.weight.nested_quant_map` F32 `[256]`, and
//!   `<m>.weight.quant_state.bitsandbytes__nf4|fp4`: U8 bytes of a JSON object (`quant_type`,
//!   `blocksize`, `dtype`, `shape`, and `nested_blocksize`, `nested_dtype`, `nested_offset`);
//! - 8-bit: `<m>.weight` I8 `[out, in]`, `<m>.SCB` F32 `[out]`, `<m>.weight_format` U8 scalar (0:
//!   row-major).
//!
//! Every piece is checked against the others and against the layer's shape; anything wrong or
//! inconsistent is an error naming the file and tensor.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype as StDtype;
use serde_json::{Map, Value, json};

use super::{Absmax, BLOCKSIZES, DEFAULT_BLOCKSIZE, DoubleQuant, NESTED_BLOCKSIZE, Quant4, Quant8, QuantConfig, QuantTensor, QuantType};
use crate::backend::DType;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::Module;
use crate::weights::{RawTensor, WeightFiles};

/// The bitsandbytes `quantization_config` of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbConfig {
    pub load_in_4bit: bool,
    pub load_in_8bit: bool,
    pub quant_type: QuantType,
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`, when the checkpoint names one.
    pub compute_dtype: Option<DType>,
}

/// `bfloat16`, `float16`, `float32` (with or without a `torch.` prefix) as a dtype.
pub fn parse_torch_dtype(s: &str) -> Option<DType> {
    match s.strip_prefix("torch.").unwrap_or(s) {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// The `quantization_config` of `dir/config.json` when it is a bitsandbytes one; `None` when the
/// folder has no quantization config (a 16-bit model). Other quantization methods are an error.
pub fn read_config(dir: &Path) -> Result<Option<BnbConfig>> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let Ok(v) = serde_json::from_str::<Value>(&text) else { return Ok(None) };
    let Some(q) = v.get("quantization_config") else { return Ok(None) };
    let bad = |msg: String| EngineError::Config { path: path.clone(), msg: format!("quantization_config: {msg}") };
    let q = q.as_object().ok_or_else(|| bad("is not an object".into()))?;
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "bitsandbytes" {
        return Err(EngineError::Unsupported(format!(
            "{}: quantization_config.quant_method {method:?}: only bitsandbytes 4-bit and 8-bit checkpoints are supported",
            path.display()
        )));
    }
    let flag = |k: &str| q.get(k).or_else(|| q.get(&format!("_{k}"))).and_then(Value::as_bool).unwrap_or(false);
    let (load_in_4bit, load_in_8bit) = (flag("load_in_4bit"), flag("load_in_8bit"));
    if load_in_4bit == load_in_8bit {
        return Err(bad(format!("load_in_4bit = {load_in_4bit} and load_in_8bit = {load_in_8bit}: exactly one must be true")));
    }
    // transformers' BitsAndBytesConfig default is fp4.
    let qt = q.get("bnb_4bit_quant_type").and_then(Value::as_str).unwrap_or("fp4");
    let quant_type = QuantType::parse(qt).ok_or_else(|| bad(format!("bnb_4bit_quant_type {qt:?} is not nf4 or fp4")))?;
    if let Some(s) = q.get("bnb_4bit_quant_storage").and_then(Value::as_str)
        && load_in_4bit
        && s != "uint8"
    {
        return Err(bad(format!("bnb_4bit_quant_storage {s:?}: only uint8 storage is supported")));
    }
    let compute_dtype = match q.get("bnb_4bit_compute_dtype") {
        Some(Value::String(s)) => Some(parse_torch_dtype(s).ok_or_else(|| bad(format!("bnb_4bit_compute_dtype {s:?} is not bfloat16, float16 or float32")))?),
        _ => None,
    };
    Ok(Some(BnbConfig {
        load_in_4bit,
        load_in_8bit,
        quant_type,
        double_quant: q.get("bnb_4bit_use_double_quant").and_then(Value::as_bool).unwrap_or(false),
        compute_dtype,
    }))
}

fn tensor_err(files: &WeightFiles, tensor: &str, msg: impl Into<String>) -> EngineError {
    EngineError::Weights { file: files.file_of(tensor), tensor: tensor.to_string(), msg: msg.into() }
}

fn need<'a>(files: &'a WeightFiles, name: &str, dtype: StDtype, numel: usize) -> Result<RawTensor<'a>> {
    let t = files.raw(name).ok_or_else(|| tensor_err(files, name, "missing (a bitsandbytes quantized linear needs it)"))?;
    if t.dtype != dtype {
        return Err(tensor_err(files, name, format!("is {:?}, expected {dtype:?}", t.dtype)));
    }
    let have: usize = t.shape.iter().product();
    if have != numel || t.bytes.len() != numel * dtype.bitsize() / 8 {
        return Err(tensor_err(files, name, format!("has shape {:?}, expected {numel} elements", t.shape)));
    }
    Ok(t)
}

fn f32s(files: &WeightFiles, name: &str, numel: usize) -> Result<Vec<f32>> {
    let t = need(files, name, StDtype::F32, numel)?;
    let v: Vec<f32> = t.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(tensor_err(files, name, format!("element {i} is {} (corrupt quantization data)", v[i])));
    }
    Ok(v)
}

/// Whether linear `prefix` (`model.layers.0.self_attn.q_proj`) is stored quantized.
pub fn is_quantized(files: &WeightFiles, prefix: &str) -> bool {
    files.raw(&format!("{prefix}.weight")).is_some_and(|t| matches!(t.dtype, StDtype::U8 | StDtype::I8))
}

/// Reads quantized linear `prefix` of shape `[out_f, in_f]`; returns it with the dtype the weight
/// had before quantization (the quant state's `dtype`; bf16 for 8-bit, which does not record it).
pub fn read_linear(files: &WeightFiles, prefix: &str, (out_f, in_f): (usize, usize), cfg: &BnbConfig) -> Result<(QuantTensor, DType)> {
    let n = out_f * in_f;
    let weight = format!("{prefix}.weight");
    if cfg.load_in_8bit {
        let cb = need(files, &weight, StDtype::I8, n)?;
        let scb = f32s(files, &format!("{prefix}.SCB"), out_f)?;
        let format_name = format!("{prefix}.weight_format");
        if let Some(f) = files.raw(&format_name)
            && f.bytes.iter().any(|&b| b != 0)
        {
            return Err(tensor_err(files, &format_name, format!("is {:?}: only the row-major int8 layout (0) is supported", f.bytes)));
        }
        let q = Quant8 { shape: vec![out_f, in_f], cb: cb.bytes.iter().map(|&b| b as i8).collect(), scb };
        return Ok((QuantTensor::Eight(q), DType::BF16));
    }
    let packed = need(files, &weight, StDtype::U8, n.div_ceil(2))?;
    // The quant state: exactly one `quant_state.bitsandbytes__<type>` tensor.
    let states: Vec<(QuantType, String)> = [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .map(|t| (t, format!("{weight}.quant_state.bitsandbytes__{}", t.name())))
        .filter(|(_, k)| files.raw(k).is_some())
        .collect();
    let (quant_type, state_name) = match states.as_slice() {
        [one] => one.clone(),
        [] => return Err(tensor_err(files, &weight, "is U8 (4-bit) but its quant_state.bitsandbytes__nf4|fp4 tensor is missing")),
        _ => return Err(tensor_err(files, &weight, "has both an nf4 and an fp4 quant_state")),
    };
    let state_raw = files.raw(&state_name).ok_or_else(|| tensor_err(files, &state_name, "missing"))?;
    let state: Map<String, Value> = std::str::from_utf8(state_raw.bytes)
        .ok()
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| tensor_err(files, &state_name, "is not the UTF-8 bytes of a JSON object"))?;
    let bad = |msg: String| tensor_err(files, &state_name, msg);
    if state.get("quant_type").and_then(Value::as_str) != Some(quant_type.name()) {
        return Err(bad(format!("quant_type {:?} does not match its name", state.get("quant_type"))));
    }
    if quant_type != cfg.quant_type {
        return Err(bad(format!("is {} but config.json's quantization_config says bnb_4bit_quant_type {}", quant_type.name(), cfg.quant_type.name())));
    }
    let blocksize = state.get("blocksize").and_then(Value::as_u64).map(|b| b as usize).unwrap_or(0);
    if !BLOCKSIZES.contains(&blocksize) {
        return Err(bad(format!("blocksize {:?} is not one of {BLOCKSIZES:?}", state.get("blocksize"))));
    }
    let shape: Option<Vec<usize>> = state.get("shape").and_then(|s| serde_json::from_value(s.clone()).ok());
    if shape.as_deref() != Some(&[out_f, in_f][..]) {
        return Err(bad(format!("shape {:?} does not match the layer's [{out_f}, {in_f}]", state.get("shape"))));
    }
    let dtype = state.get("dtype").and_then(Value::as_str).and_then(parse_torch_dtype).ok_or_else(|| bad(format!("dtype {:?} is not bfloat16, float16 or float32", state.get("dtype"))))?;
    let quant_map = f32s(files, &format!("{weight}.quant_map"), 16)?;
    // Equal values (either sign of zero): the kernels decode with their own tables.
    if quant_map.iter().zip(quant_type.code_book()).any(|(a, b)| a != b) {
        return Err(tensor_err(files, &format!("{weight}.quant_map"), format!("differs from bitsandbytes' {} code book (custom code books are not supported)", quant_type.name())));
    }
    let blocks = n.div_ceil(blocksize);
    let absmax_name = format!("{weight}.absmax");
    let nested = state.contains_key("nested_offset");
    if nested != cfg.double_quant {
        return Err(bad(format!(
            "{} double quantization but config.json's bnb_4bit_use_double_quant is {}",
            if nested { "has" } else { "has no" },
            cfg.double_quant
        )));
    }
    let absmax = if nested {
        if state.get("nested_blocksize").and_then(Value::as_u64) != Some(NESTED_BLOCKSIZE as u64) {
            return Err(bad(format!("nested_blocksize {:?}: only {NESTED_BLOCKSIZE} is supported (as in bitsandbytes)", state.get("nested_blocksize"))));
        }
        if state.get("nested_dtype").and_then(Value::as_str) != Some("float32") {
            return Err(bad(format!("nested_dtype {:?} is not float32", state.get("nested_dtype"))));
        }
        let offset = state.get("nested_offset").and_then(Value::as_f64).filter(|x| x.is_finite()).ok_or_else(|| bad("nested_offset is not a number".into()))?;
        let codes = need(files, &absmax_name, StDtype::U8, blocks)?.bytes.to_vec();
        let nested_absmax = f32s(files, &format!("{weight}.nested_absmax"), blocks.div_ceil(NESTED_BLOCKSIZE))?;
        let map = f32s(files, &format!("{weight}.nested_quant_map"), 256)?;
        Absmax::Double(DoubleQuant { codes, nested_absmax, map, offset: offset as f32 })
    } else {
        for extra in ["nested_absmax", "nested_quant_map"] {
            if files.contains(&format!("{weight}.{extra}")) {
                return Err(tensor_err(files, &format!("{weight}.{extra}"), "is present but the quant_state has no double quantization"));
            }
        }
        Absmax::Plain(f32s(files, &absmax_name, blocks)?)
    };
    let q = Quant4 { quant_type, blocksize, shape: vec![out_f, in_f], packed: packed.bytes.to_vec(), absmax };
    Ok((QuantTensor::Four(q), dtype))
}

/// Python's `repr` of a float (shortest round-trip digits; exponent form below 1e-4 and from
/// 1e16), as `json.dumps` writes it.
fn py_float(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let sci = format!("{x:e}"); // e.g. "5.2234e-2", "-1e-5"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = mant.strip_prefix('-').map_or((false, mant), |m| (true, m));
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// The quant state JSON bitsandbytes packs into `quant_state.bitsandbytes__<type>` (its
/// `json.dumps` of `QuantState.as_dict`'s non-tensor items, in that order).
pub fn quant_state_json(q: &Quant4, weight_dtype: DType) -> String {
    let shape: Vec<String> = q.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        q.quant_type.name(),
        q.blocksize,
        weight_dtype.torch_name(),
        shape.join(", ")
    );
    if let Absmax::Double(d) = &q.absmax {
        s += &format!(", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}", py_float(d.offset as f64));
    }
    s + "}"
}

/// A tensor to write: name, dtype, shape, bytes.
pub type RawOut = (String, StDtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors transformers writes for quantized linear `prefix`.
pub fn linear_tensors(prefix: &str, q: &QuantTensor, weight_dtype: DType) -> Vec<RawOut> {
    let w = format!("{prefix}.weight");
    match q {
        QuantTensor::Four(q) => {
            let mut out = vec![
                (w.clone(), StDtype::U8, vec![q.packed.len(), 1], q.packed.clone()),
                (format!("{w}.quant_map"), StDtype::F32, vec![16], f32_bytes(&q.quant_type.stored_code_book())),
            ];
            match &q.absmax {
                Absmax::Plain(a) => out.push((format!("{w}.absmax"), StDtype::F32, vec![a.len()], f32_bytes(a))),
                Absmax::Double(d) => {
                    out.push((format!("{w}.absmax"), StDtype::U8, vec![d.codes.len()], d.codes.clone()));
                    out.push((format!("{w}.nested_absmax"), StDtype::F32, vec![d.nested_absmax.len()], f32_bytes(&d.nested_absmax)));
                    out.push((format!("{w}.nested_quant_map"), StDtype::F32, vec![d.map.len()], f32_bytes(&d.map)));
                }
            }
            let state = quant_state_json(q, weight_dtype).into_bytes();
            out.push((format!("{w}.quant_state.bitsandbytes__{}", q.quant_type.name()), StDtype::U8, vec![state.len()], state));
            out
        }
        QuantTensor::Eight(q) => vec![
            (w.clone(), StDtype::I8, q.shape.clone(), q.cb.iter().map(|&v| v as u8).collect()),
            (format!("{prefix}.SCB"), StDtype::F32, vec![q.scb.len()], f32_bytes(&q.scb)),
            (format!("{w}_format"), StDtype::U8, vec![], vec![0]),
        ],
    }
}

/// `quantization_config` as transformers writes it into config.json for `cfg`.
pub fn quantization_config_json(cfg: &QuantConfig) -> Value {
    let (four, qt, dq, cd) = match *cfg {
        QuantConfig::FourBit { quant_type, double_quant, compute_dtype } => (
            true,
            quant_type.unwrap_or(QuantType::Nf4),
            double_quant.unwrap_or(true),
            compute_dtype.unwrap_or(DType::BF16),
        ),
        // transformers' BitsAndBytesConfig defaults for the unused 4-bit fields.
        QuantConfig::EightBit => (false, QuantType::Fp4, false, DType::F32),
    };
    json!({
        "_load_in_4bit": four,
        "_load_in_8bit": !four,
        "bnb_4bit_compute_dtype": cd.torch_name(),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": qt.name(),
        "bnb_4bit_use_double_quant": dq,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": !four,
        "quant_method": "bitsandbytes",
    })
}

/// Quantizes the 16-bit model in `src` as `cfg` asks and writes it to `dst` (created) as
/// transformers would save it: `model.safetensors` (every decoder projection quantized, everything
/// else copied byte for byte, `{"format": "pt"}` metadata) and `config.json` with
/// `quantization_config`. Tokenizer files are not copied.
pub fn write_checkpoint(src: &Path, dst: &Path, cfg: &QuantConfig) -> Result<()> {
    let mc = ModelConfig::from_model_dir(src)?;
    let files = WeightFiles::open(src)?;
    let (quant_type, double_quant) = match *cfg {
        QuantConfig::FourBit { quant_type, double_quant, .. } => (quant_type.unwrap_or(QuantType::Nf4), double_quant.unwrap_or(true)),
        QuantConfig::EightBit => (QuantType::Nf4, false),
    };
    let mut quantized: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for i in 0..mc.num_hidden_layers {
        for &m in Module::present(mc.layout) {
            quantized.insert(format!("model.layers.{i}.{}.weight", m.path_in(mc.layout)), m.dims(&mc));
        }
    }
    let mut tensors: Vec<RawOut> = Vec::new();
    for name in files.names() {
        let raw = files.raw(&name).ok_or_else(|| tensor_err(&files, &name, "missing"))?;
        let Some(&(o, i)) = quantized.get(&name) else {
            tensors.push((name.clone(), raw.dtype, raw.shape.to_vec(), raw.bytes.to_vec()));
            continue;
        };
        let (data, dtype) = files.get(&name, &[o, i])?;
        let w = data.to_f32();
        let q = match cfg {
            QuantConfig::FourBit { .. } => QuantTensor::Four(Quant4::quantize(&w, &[o, i], quant_type, DEFAULT_BLOCKSIZE, double_quant)?),
            QuantConfig::EightBit => QuantTensor::Eight(Quant8::quantize(&w, &[o, i]).map_err(|e| tensor_err(&files, &name, e.to_string()))?),
        };
        let prefix = name.strip_suffix(".weight").unwrap_or(&name);
        tensors.extend(linear_tensors(prefix, &q, dtype));
    }
    std::fs::create_dir_all(dst).map_err(|e| EngineError::io(dst, e))?;
    let path = dst.join("model.safetensors");
    let write_err = |msg: String| EngineError::Write { path: path.clone(), msg };
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, bytes) in &tensors {
        views.push((name.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| write_err(format!("{name}: {e}")))?));
    }
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some([("format".to_string(), "pt".to_string())].into()), &tmp).map_err(|e| write_err(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| write_err(e.to_string()))?;
    let cfg_path = src.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?)
        .map_err(|e| EngineError::Config { path: cfg_path.clone(), msg: e.to_string() })?;
    if let Some(o) = config.as_object_mut() {
        o.insert("quantization_config".into(), quantization_config_json(cfg));
    }
    let out_cfg = dst.join("config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| EngineError::Write { path: out_cfg.clone(), msg: e.to_string() })?;
    std::fs::write(&out_cfg, text).map_err(|e| EngineError::io(&out_cfg, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        for (x, want) in [
            (0.05223456025123596f64, "0.05223456025123596"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123.0, "123.0"),
            (1e16, "1e+16"),
            (-0.25, "-0.25"),
            (0.0, "0.0"),
            (12345.678, "12345.678"),
        ] {
            assert_eq!(py_float(x), want, "{x}");
        }
    }

    #[test]
    fn torch_dtype_names_with_and_without_prefix() {
        assert_eq!(parse_torch_dtype("torch.bfloat16"), Some(DType::BF16));
        assert_eq!(parse_torch_dtype("float16"), Some(DType::F16));
        assert_eq!(parse_torch_dtype("float32"), Some(DType::F32));
        assert_eq!(parse_torch_dtype("bf16"), None);
    }
}
