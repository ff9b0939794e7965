//! The merged model: the base weights with a LoRA adapter folded in, written in the base files'
//! dtypes and tensor names (one `model.safetensors`, or shards + index above the shard size, as
//! transformers' `save_pretrained`). The one merge both [`crate::Trainer::merge_into`] and a run's
//! outputs use.
//!
//! It streams tensor by tensor, so memory holds one tensor at a time: weights without an adapter
//! are copied byte for byte from the base files; adapted ones are `W + s·B·A` (DoRA: each output
//! row then scaled by `m / ‖W + s·B·A‖`, PEFT's merge), with `B·A` accumulated and added to `W`
//! in f64, rounded once to f32 and then to the base dtype (round to nearest even): the merged
//! bf16 weight is `bf16(f32(W + s·B·A))` of the exact sum, whatever the summation order.
//!
//! A base that is itself a bitsandbytes 4-bit or 8-bit checkpoint has no 16-bit weights: its
//! quantized projections are dequantized (to the dtype its quant state records, bf16 for 8-bit)
//! and merged onto; their quantization tensors (`.absmax`, `.quant_map`, `.SCB`, ...) are
//! dropped, so the output is a plain 16-bit model ([`base_is_quantized`] tells the caller).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Value, json};

use crate::adapter::AdapterConfig;
use crate::error::{EngineError, Result};
use crate::quant::bnb;
use crate::trainer::NamedTensor;
use crate::weights::WeightFiles;

/// One tensor of a safetensors file.
#[derive(Debug, Clone)]
struct Entry {
    file: PathBuf,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in `file`.
    start: u64,
    end: u64,
    /// A bitsandbytes-quantized projection to dequantize (its module prefix) instead of copying.
    dequant: Option<String>,
    /// The dtype written (`dtype`, or `F32` when merging into float32).
    out: Option<String>,
}

impl Entry {
    /// Bytes this tensor takes in the output.
    fn size(&self) -> u64 {
        match (&self.dequant, &self.out) {
            (None, None) => self.end - self.start,
            _ => self.shape.iter().product::<usize>() as u64 * if self.out_dtype() == "F32" { 4 } else { 2 },
        }
    }

    /// The dtype this tensor is written in.
    fn out_dtype(&self) -> &str {
        self.out.as_deref().unwrap_or(&self.dtype)
    }
}

fn file_err(file: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::WeightsFile {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Reads the headers of the base model's weight files (single file or index + shards).
fn base_entries(dir: &Path) -> Result<BTreeMap<String, Entry>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let text = fs::read(&index).map_err(|e| EngineError::io(&index, e))?;
        let v: Value = serde_json::from_slice(&text).map_err(|e| file_err(&index, format!("not JSON: {e}")))?;
        let mut f: Vec<String> = v["weight_map"]
            .as_object()
            .ok_or_else(|| file_err(&index, "has no weight_map"))?
            .values()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        f.sort();
        f.dedup();
        f.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = BTreeMap::new();
    for file in files {
        let mut f = fs::File::open(&file).map_err(|e| EngineError::io(&file, e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| file_err(&file, format!("reading the header: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > 100_000_000 {
            return Err(file_err(&file, format!("a header of {n} bytes is not a safetensors header")));
        }
        let mut head = vec![0u8; n as usize];
        f.read_exact(&mut head).map_err(|e| file_err(&file, format!("reading the header: {e}")))?;
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&head).map_err(|e| file_err(&file, format!("the header is not JSON: {e}")))?;
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad = |what: &str| EngineError::Weights { file: file.clone(), tensor: name.clone(), msg: format!("bad {what}") };
            let offs: [u64; 2] = serde_json::from_value(info["data_offsets"].clone()).map_err(|_| bad("data_offsets"))?;
            let shape: Vec<usize> = serde_json::from_value(info["shape"].clone()).map_err(|_| bad("shape"))?;
            out.insert(
                name.clone(),
                Entry {
                    file: file.clone(),
                    dtype: info["dtype"].as_str().unwrap_or("").to_string(),
                    out: None,
                    shape,
                    start: 8 + n + offs[0],
                    end: 8 + n + offs[1],
                    dequant: None,
                },
            );
        }
    }
    Ok(out)
}

/// Quantization tensors of a bitsandbytes linear, besides its `.weight` (dropped from a merge).
const QUANT_SUFFIXES: [&str; 7] = [
    ".weight.absmax",
    ".weight.quant_map",
    ".weight.nested_absmax",
    ".weight.nested_quant_map",
    ".weight.quant_state.bitsandbytes__nf4",
    ".weight.quant_state.bitsandbytes__fp4",
    ".SCB",
];

/// Whether the model at `dir` is a bitsandbytes quantized checkpoint (no 16-bit weights: a merge
/// folds the adapter into the dequantized weights).
pub fn base_is_quantized(dir: &Path) -> Result<bool> {
    Ok(bnb::read_config(dir)?.is_some())
}

/// Replaces the tensors of each quantized projection by one `.weight` entry to dequantize, in
/// the dtype the weight had before quantization.
fn plan_dequantized(dir: &Path, entries: &mut BTreeMap<String, Entry>) -> Result<Option<(WeightFiles, bnb::BnbConfig)>> {
    let Some(cfg) = bnb::read_config(dir)? else { return Ok(None) };
    let files = WeightFiles::open(dir)?;
    let prefixes: Vec<String> = entries
        .iter()
        .filter(|(_, e)| e.dtype == "U8" || e.dtype == "I8")
        .filter_map(|(n, _)| n.strip_suffix(".weight").map(str::to_string))
        .collect();
    let fallback = match files.file_dtype() {
        crate::DType::F32 => "F32",
        crate::DType::F16 => "F16",
        _ => "BF16",
    };
    for prefix in prefixes {
        let name = format!("{prefix}.weight");
        let bad = |msg: String| EngineError::Weights { file: files.file_of(&name), tensor: name.clone(), msg };
        let (shape, dtype) = if cfg.load_in_8bit {
            (entries[&name].shape.clone(), fallback.to_string())
        } else {
            let state_name = ["nf4", "fp4"].iter().map(|t| format!("{name}.quant_state.bitsandbytes__{t}")).find(|k| files.contains(k)).ok_or_else(|| bad("is U8 but has no quant_state".into()))?;
            let raw = files.raw(&state_name).ok_or_else(|| bad("no quant_state".into()))?;
            let state: Value = serde_json::from_slice(raw.bytes).map_err(|e| bad(format!("quant_state is not JSON: {e}")))?;
            let shape: Vec<usize> = serde_json::from_value(state["shape"].clone()).map_err(|_| bad("quant_state has no shape".into()))?;
            let dtype = match state["dtype"].as_str().and_then(bnb::parse_torch_dtype) {
                Some(crate::DType::F32) => "F32",
                Some(crate::DType::F16) => "F16",
                _ => "BF16",
            };
            (shape, dtype.to_string())
        };
        for suffix in QUANT_SUFFIXES.iter().chain(&[".weight_format"]) {
            entries.remove(&format!("{prefix}{suffix}"));
        }
        if let Some(e) = entries.get_mut(&name) {
            e.shape = shape;
            e.dtype = dtype;
            e.dequant = Some(prefix.clone());
        }
    }
    Ok(Some((files, cfg)))
}

fn read_bytes(e: &Entry) -> Result<Vec<u8>> {
    let mut f = fs::File::open(&e.file).map_err(|err| EngineError::io(&e.file, err))?;
    f.seek(SeekFrom::Start(e.start)).map_err(|err| EngineError::io(&e.file, err))?;
    let mut buf = vec![0u8; (e.end - e.start) as usize];
    f.read_exact(&mut buf)
        .map_err(|err| file_err(&e.file, format!("reading {} bytes at {}: {err}", buf.len(), e.start)))?;
    Ok(buf)
}

fn to_f32(bytes: &[u8], e: &Entry, name: &str) -> Result<Vec<f32>> {
    Ok(match e.dtype.as_str() {
        "F32" => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "BF16" => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "F16" => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(EngineError::Weights {
                file: e.file.clone(),
                tensor: name.to_string(),
                msg: format!("dtype {other}; an adapted weight must be F32, BF16 or F16"),
            });
        }
    })
}

fn from_f32(values: &[f32], dtype: &str) -> Vec<u8> {
    match dtype {
        "BF16" => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        "F16" => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// `W + scale·B·A` in place (`w [out, in]`, `b [out, r]`, `a [r, in]`), then DoRA's row scaling
/// to the magnitude `mag`: everything in f64, one rounding to f32 per element.
pub fn merge_weight(w: &mut [f32], a: &[f32], b: &[f32], mag: Option<&[f32]>, (out_f, in_f, r): (usize, usize, usize), scale: f32) {
    if in_f == 0 {
        return;
    }
    let scale = scale as f64;
    w.par_chunks_mut(in_f).enumerate().take(out_f).for_each(|(o, row)| {
        let mut merged: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let mut delta = vec![0f64; in_f];
        for k in 0..r {
            let bk = b[o * r + k] as f64;
            for (d, &av) in delta.iter_mut().zip(&a[k * in_f..(k + 1) * in_f]) {
                *d += bk * av as f64;
            }
        }
        for (m, d) in merged.iter_mut().zip(&delta) {
            *m += scale * d;
        }
        if let Some(mag) = mag {
            let factor = mag[o] as f64 / merged.iter().map(|x| x * x).sum::<f64>().sqrt();
            merged.iter_mut().for_each(|x| *x *= factor);
        }
        for (x, m) in row.iter_mut().zip(&merged) {
            *x = *m as f32;
        }
    });
}

/// Writes the base model at `base_dir` with `adapter` (PEFT-named tensors, as
/// [`crate::Trainer::adapter_tensors`] gives them) merged in, into `out_dir` (which must exist):
/// `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
/// when the weights exceed `max_shard_bytes`. Other files (config, tokenizer) are the caller's.
pub fn write_merged_weights(
    base_dir: &Path,
    out_dir: &Path,
    adapter: &[NamedTensor],
    cfg: &AdapterConfig,
    max_shard_bytes: u64,
) -> Result<()> {
    write_merged_weights_as(base_dir, out_dir, adapter, cfg, max_shard_bytes, false)
}

/// [`write_merged_weights`]; with `float32` every 16-bit floating-point tensor is written as F32
/// (the merged update is not rounded to bf16/f16, so a small adapter's effect is kept whole).
pub fn write_merged_weights_as(
    base_dir: &Path,
    out_dir: &Path,
    adapter: &[NamedTensor],
    cfg: &AdapterConfig,
    max_shard_bytes: u64,
    float32: bool,
) -> Result<()> {
    let mut entries = base_entries(base_dir)?;
    let quantized = plan_dequantized(base_dir, &mut entries)?;
    if float32 {
        for e in entries.values_mut().filter(|e| matches!(e.dtype.as_str(), "BF16" | "F16")) {
            e.out = Some("F32".into());
        }
    }
    // The experts' packed adapters, as per-expert adapters of the base files' per-expert weights.
    let unpacked = crate::moe::unpack_expert_adapters(adapter, cfg)?;
    let adapter = unpacked.as_slice();
    let by_name: HashMap<&str, &NamedTensor> = adapter.iter().map(|t| (t.name.as_str(), t)).collect();
    let scale = cfg.scaling();
    // Group the adapter tensors by the base weight they modify.
    let mut adapted: BTreeMap<String, String> = BTreeMap::new(); // base weight -> PEFT prefix
    for t in adapter {
        if let Some(prefix) = t.name.strip_suffix(".lora_A.weight") {
            let base = format!("{}.weight", prefix.strip_prefix("base_model.model.").unwrap_or(prefix));
            if !entries.contains_key(&base) {
                return Err(EngineError::State {
                    name: t.name.clone(),
                    msg: format!("adapts {base}, which is not in the base model at {}", base_dir.display()),
                });
            }
            adapted.insert(base, prefix.to_string());
        }
    }
    // Shard plan: keep the base order (sorted names), cut at max_shard_bytes.
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut size = 0u64;
    let total: u64 = entries.values().map(Entry::size).sum();
    for (name, e) in &entries {
        let n = e.size();
        if size + n > max_shard_bytes && shards.last().is_some_and(|s| !s.is_empty()) {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(last) = shards.last_mut() {
            last.push(name);
        }
        size += n;
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, names) in shards.iter().enumerate() {
        let file_name = if count == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{count:05}.safetensors", i + 1) };
        let path = out_dir.join(&file_name);
        // Header first (sizes are the base's: merging does not change shapes or dtypes).
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0u64;
        for name in names {
            let e = &entries[*name];
            header.insert((*name).clone(), json!({"dtype": e.out_dtype(), "shape": e.shape, "data_offsets": [off, off + e.size()]}));
            off += e.size();
            weight_map.insert((*name).clone(), json!(file_name));
        }
        let mut head = Value::Object(header).to_string().into_bytes();
        while !head.len().is_multiple_of(8) {
            head.push(b' ');
        }
        let file = fs::File::create(&path).map_err(|e| write_err(&path, e))?;
        let mut f = std::io::BufWriter::new(file);
        f.write_all(&(head.len() as u64).to_le_bytes()).map_err(|e| write_err(&path, e))?;
        f.write_all(&head).map_err(|e| write_err(&path, e))?;
        for name in names {
            let e = &entries[*name];
            // A quantized base weight: dequantized (exact f32 values), then merged or stored.
            let dequantized = match (&e.dequant, &quantized) {
                (Some(prefix), Some((files, qcfg))) => {
                    let (o, i) = (e.shape[0], e.shape.get(1).copied().unwrap_or(1));
                    Some(bnb::read_linear(files, prefix, (o, i), qcfg)?.0.dequantize(crate::DType::F32))
                }
                _ => None,
            };
            let Some(prefix) = adapted.get(*name) else {
                match &dequantized {
                    Some(w) => f.write_all(&from_f32(w, e.out_dtype())).map_err(|e| write_err(&path, e))?,
                    None if e.out.is_some() => f.write_all(&from_f32(&to_f32(&read_bytes(e)?, e, name)?, e.out_dtype())).map_err(|e| write_err(&path, e))?,
                    None => f.write_all(&read_bytes(e)?).map_err(|e| write_err(&path, e))?,
                }
                continue;
            };
            let get = |suffix: &str| {
                by_name.get(format!("{prefix}.{suffix}").as_str()).copied().ok_or_else(|| EngineError::State {
                    name: format!("{prefix}.{suffix}"),
                    msg: "missing adapter tensor".into(),
                })
            };
            let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
            let mag = if cfg.use_dora { Some(get("lora_magnitude_vector")?) } else { None };
            let (out_f, in_f) = match e.shape[..] {
                [o, i] => (o, i),
                _ => return Err(EngineError::Weights { file: e.file.clone(), tensor: (*name).clone(), msg: format!("shape {:?} is not a matrix", e.shape) }),
            };
            let r = a.shape.first().copied().unwrap_or(0);
            if a.shape != [r, in_f] || b.shape != [out_f, r] || mag.is_some_and(|m| m.data.len() != out_f) {
                return Err(EngineError::State {
                    name: prefix.clone(),
                    msg: format!("A {:?} / B {:?} do not fit the base weight {name} {:?}", a.shape, b.shape, e.shape),
                });
            }
            let mut w = match dequantized {
                Some(w) => w,
                None => to_f32(&read_bytes(e)?, e, name)?,
            };
            merge_weight(&mut w, &a.data, &b.data, mag.map(|m| m.data.as_slice()), (out_f, in_f, r), scale);
            f.write_all(&from_f32(&w, e.out_dtype())).map_err(|e| write_err(&path, e))?;
        }
        f.flush().map_err(|e| write_err(&path, e))?;
        f.into_inner().map_err(|e| write_err(&path, e.error()))?.sync_all().map_err(|e| write_err(&path, e))?;
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = out_dir.join("model.safetensors.index.json");
        let text = serde_json::to_vec_pretty(&index).map_err(|e| write_err(&path, e))?;
        fs::write(&path, text).map_err(|e| write_err(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_scaled_b_times_a() {
        // W [2,3] zeros, A [1,3] = [1,2,3], B [2,1] = [1,-1], scale 2 → rows [2,4,6], [-2,-4,-6].
        let mut w = vec![0.0; 6];
        merge_weight(&mut w, &[1.0, 2.0, 3.0], &[1.0, -1.0], None, (2, 3, 1), 2.0);
        assert_eq!(w, vec![2.0, 4.0, 6.0, -2.0, -4.0, -6.0]);
        // DoRA: each row rescaled to the magnitude.
        let mut w = vec![3.0, 4.0, 0.0, 0.0, 0.0, 2.0];
        merge_weight(&mut w, &[0.0; 3], &[0.0; 2], Some(&[10.0, 1.0]), (2, 3, 1), 1.0);
        assert_eq!(w, vec![6.0, 8.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn large_models_are_sharded_with_an_index_and_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (base, single, sharded) = (dir.join("base"), dir.join("single"), dir.join("sharded"));
        for d in [&single, &sharded] {
            fs::create_dir_all(d).unwrap();
        }
        let cfg = crate::ModelConfig::tiny_llama(512);
        crate::testing::write_random_model(&base, &cfg, crate::DType::BF16, 3).unwrap();
        let (r, d, q) = (4usize, 64usize, 64usize);
        let prefix = "base_model.model.model.layers.1.self_attn.q_proj";
        let adapter = vec![
            NamedTensor { name: format!("{prefix}.lora_A.weight"), shape: vec![r, d], data: (0..r * d).map(|i| (i % 7) as f32 * 0.01).collect() },
            NamedTensor { name: format!("{prefix}.lora_B.weight"), shape: vec![q, r], data: (0..q * r).map(|i| (i % 5) as f32 * -0.02).collect() },
        ];
        let acfg = AdapterConfig { r, ..AdapterConfig::default() };
        write_merged_weights(&base, &single, &adapter, &acfg, 5_000_000_000).unwrap();
        write_merged_weights(&base, &sharded, &adapter, &acfg, 40_000).unwrap();
        assert!(single.join("model.safetensors").is_file() && !single.join("model.safetensors.index.json").exists());
        let index: Value = serde_json::from_slice(&fs::read(sharded.join("model.safetensors.index.json")).unwrap()).unwrap();
        let shards: std::collections::BTreeSet<&str> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
        assert!(shards.len() > 2, "{shards:?}");
        assert!(shards.iter().all(|s| s.starts_with("model-") && s.ends_with(".safetensors")));
        let (a, b) = (base_entries(&single).unwrap(), base_entries(&sharded).unwrap());
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, e) in &a {
            assert_eq!(read_bytes(e).unwrap(), read_bytes(&b[name]).unwrap(), "{name}");
        }
        // The adapted weight changed, the others are the base's bytes.
        let orig = base_entries(&base).unwrap();
        let q_name = "model.layers.1.self_attn.q_proj.weight";
        assert_ne!(read_bytes(&orig[q_name]).unwrap(), read_bytes(&a[q_name]).unwrap());
        assert_eq!(read_bytes(&orig["model.layers.0.self_attn.q_proj.weight"]).unwrap(), read_bytes(&a["model.layers.0.self_attn.q_proj.weight"]).unwrap());
    }

    #[test]
    fn an_adapter_that_does_not_fit_the_base_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        crate::testing::write_random_model(&base, &crate::ModelConfig::tiny_llama(512), crate::DType::F32, 3).unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(&out).unwrap();
        let acfg = AdapterConfig { r: 4, ..AdapterConfig::default() };
        let prefix = "base_model.model.model.layers.0.self_attn.q_proj";
        let wrong = vec![
            NamedTensor { name: format!("{prefix}.lora_A.weight"), shape: vec![4, 3], data: vec![0.0; 12] },
            NamedTensor { name: format!("{prefix}.lora_B.weight"), shape: vec![64, 4], data: vec![0.0; 256] },
        ];
        let e = write_merged_weights(&base, &out, &wrong, &acfg, u64::MAX).unwrap_err().to_string();
        assert!(e.contains(prefix) && e.contains("do not fit"), "{e}");
        let missing = vec![NamedTensor { name: "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight".into(), shape: vec![4, 64], data: vec![0.0; 256] }];
        let e = write_merged_weights(&base, &out, &missing, &acfg, u64::MAX).unwrap_err().to_string();
        assert!(e.contains("layers.9.mlp.up_proj") && e.contains("not in the base model"), "{e}");
    }
}
