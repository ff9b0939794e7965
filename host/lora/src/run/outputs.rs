//! What a run leaves behind: the PEFT adapter (`output_model/adapter/`), the merged full model in
//! the base model's dtype (`output_model/`, sharded with an index above 5 GB), copies of the
//! tokenizer and generation files, and the copy to `<pvc_path>/final_model`.
//!
//! The merge streams tensor by tensor: weights without an adapter are copied byte for byte from
//! the base files; adapted ones are `W + s·B·A` (DoRA: scaled per output row by
//! `m / ‖W + s·B·A‖`, PEFT's merge), computed in f32 and stored back in the base dtype
//! (round to nearest even). Folders are built under a temp name and renamed into place.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lora_engine::{AdapterConfig, NamedTensor};
use serde_json::{Value, json};

use crate::checkpoint::encode_safetensors;

/// transformers' shard size for `save_pretrained` as the issue asks: shard above 5 GB.
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

pub use lora_engine::export::peft_config;

/// Writes `adapter_config.json` + `adapter_model.safetensors` (f32, PEFT keys) into `dir`.
pub fn write_adapter(dir: &Path, tensors: &[NamedTensor], config: &Value) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    fs::write(dir.join("adapter_model.safetensors"), encode_safetensors(tensors, &meta))
        .with_context(|| format!("writing {}", dir.join("adapter_model.safetensors").display()))?;
    fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(config)?)
        .with_context(|| format!("writing {}", dir.join("adapter_config.json").display()))?;
    Ok(())
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone)]
struct Entry {
    file: PathBuf,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in `file`.
    start: u64,
    end: u64,
}

/// Reads the headers of the base model's weight files (single file or index + shards).
fn base_entries(dir: &Path) -> Result<BTreeMap<String, Entry>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let v: Value = serde_json::from_slice(&fs::read(&index).with_context(|| format!("reading {}", index.display()))?)
            .with_context(|| format!("{} is not JSON", index.display()))?;
        let mut f: Vec<String> = v["weight_map"]
            .as_object()
            .with_context(|| format!("{} has no weight_map", index.display()))?
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
        let mut f = fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).with_context(|| format!("reading the header of {}", file.display()))?;
        let n = u64::from_le_bytes(len);
        if n > 100_000_000 {
            bail!("{}: header of {n} bytes is not a safetensors header", file.display());
        }
        let mut head = vec![0u8; n as usize];
        f.read_exact(&mut head).with_context(|| format!("reading the header of {}", file.display()))?;
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&head).with_context(|| format!("{}: header is not JSON", file.display()))?;
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let offs: [u64; 2] = serde_json::from_value(info["data_offsets"].clone())
                .with_context(|| format!("{}: tensor {name} has bad data_offsets", file.display()))?;
            out.insert(
                name.clone(),
                Entry {
                    file: file.clone(),
                    dtype: info["dtype"].as_str().unwrap_or("").to_string(),
                    shape: serde_json::from_value(info["shape"].clone())
                        .with_context(|| format!("{}: tensor {name} has a bad shape", file.display()))?,
                    start: 8 + n + offs[0],
                    end: 8 + n + offs[1],
                },
            );
        }
    }
    Ok(out)
}

fn read_bytes(e: &Entry) -> Result<Vec<u8>> {
    let mut f = fs::File::open(&e.file).with_context(|| format!("opening {}", e.file.display()))?;
    f.seek(SeekFrom::Start(e.start))?;
    let mut buf = vec![0u8; (e.end - e.start) as usize];
    f.read_exact(&mut buf).with_context(|| format!("reading {} bytes at {} of {}", buf.len(), e.start, e.file.display()))?;
    Ok(buf)
}

fn to_f32(bytes: &[u8], dtype: &str, name: &str) -> Result<Vec<f32>> {
    Ok(match dtype {
        "F32" => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        "BF16" => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "F16" => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => bail!("base tensor {name} has dtype {other}; an adapted weight must be F32, BF16 or F16"),
    })
}

fn from_f32(values: &[f32], dtype: &str) -> Vec<u8> {
    match dtype {
        "BF16" => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        "F16" => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// `W + scale·B·A` in place (`w [out, in]`, `b [out, r]`, `a [r, in]`), then DoRA's row scaling.
pub fn merge_weight(w: &mut [f32], a: &[f32], b: &[f32], mag: Option<&[f32]>, (out_f, in_f, r): (usize, usize, usize), scale: f32) {
    for o in 0..out_f {
        let row = &mut w[o * in_f..(o + 1) * in_f];
        for k in 0..r {
            let coef = scale * b[o * r + k];
            if coef == 0.0 {
                continue;
            }
            for (x, av) in row.iter_mut().zip(&a[k * in_f..(k + 1) * in_f]) {
                *x += coef * av;
            }
        }
        if let Some(m) = mag {
            let norm = row.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt() as f32;
            let factor = m[o] / norm;
            for x in row.iter_mut() {
                *x *= factor;
            }
        }
    }
}

/// Writes the merged model's weights into `out_dir` (same names and dtypes as the base).
pub fn write_merged_weights(base_dir: &Path, out_dir: &Path, adapter: &[NamedTensor], cfg: &AdapterConfig) -> Result<()> {
    write_merged_weights_sharded(base_dir, out_dir, adapter, cfg, MAX_SHARD_BYTES)
}

/// [`write_merged_weights`] with an explicit shard size (tests use a small one).
pub fn write_merged_weights_sharded(
    base_dir: &Path,
    out_dir: &Path,
    adapter: &[NamedTensor],
    cfg: &AdapterConfig,
    max_shard_bytes: u64,
) -> Result<()> {
    let entries = base_entries(base_dir)?;
    let by_name: HashMap<&str, &NamedTensor> = adapter.iter().map(|t| (t.name.as_str(), t)).collect();
    let scale = cfg.scaling();
    // Group the adapter tensors by the base weight they modify.
    let mut adapted: BTreeMap<String, String> = BTreeMap::new(); // base weight -> PEFT prefix
    for t in adapter {
        if let Some(prefix) = t.name.strip_suffix(".lora_A.weight") {
            let base = format!("{}.weight", prefix.strip_prefix("base_model.model.").unwrap_or(prefix));
            if !entries.contains_key(&base) {
                bail!("adapter tensor {} has no base weight {base} in {}", t.name, base_dir.display());
            }
            adapted.insert(base, prefix.to_string());
        }
    }
    // Shard plan: keep the base order (sorted names), cut at MAX_SHARD_BYTES.
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut size = 0u64;
    let total: u64 = entries.values().map(|e| e.end - e.start).sum();
    for (name, e) in &entries {
        let n = e.end - e.start;
        if size + n > max_shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(name);
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
            header.insert((*name).clone(), json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + e.end - e.start]}));
            off += e.end - e.start;
            weight_map.insert((*name).clone(), json!(file_name));
        }
        let mut head = Value::Object(header).to_string().into_bytes();
        while !head.len().is_multiple_of(8) {
            head.push(b' ');
        }
        let mut f = std::io::BufWriter::new(fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?);
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        for name in names {
            let e = &entries[*name];
            let bytes = read_bytes(e)?;
            let Some(prefix) = adapted.get(*name) else {
                f.write_all(&bytes)?;
                continue;
            };
            let get = |suffix: &str| {
                by_name.get(format!("{prefix}.{suffix}").as_str()).copied().with_context(|| format!("adapter tensor {prefix}.{suffix} is missing"))
            };
            let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
            let mag = if cfg.use_dora { Some(get("lora_magnitude_vector")?) } else { None };
            let (out_f, in_f) = (e.shape[0], e.shape[1]);
            let r = a.shape[0];
            if a.shape != [r, in_f] || b.shape != [out_f, r] {
                bail!("adapter for {name}: A {:?} / B {:?} do not fit the base weight {:?}", a.shape, b.shape, e.shape);
            }
            let mut w = to_f32(&bytes, &e.dtype, name)?;
            merge_weight(&mut w, &a.data, &b.data, mag.map(|m| m.data.as_slice()), (out_f, in_f, r), scale);
            f.write_all(&from_f32(&w, &e.dtype))?;
        }
        f.flush()?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        fs::write(out_dir.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index)?)?;
    }
    Ok(())
}

/// Copies the base folder's config, tokenizer and generation files (everything but weights).
pub fn copy_model_files(base_dir: &Path, out_dir: &Path) -> Result<()> {
    for e in fs::read_dir(base_dir).with_context(|| format!("reading {}", base_dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        let is_weights = name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || [".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt"].iter().any(|s| name.ends_with(s));
        let wanted = name.ends_with(".json") || name.ends_with(".jinja") || name.ends_with(".txt") || name.ends_with(".model") || name.ends_with(".tiktoken");
        if !path.is_file() || is_weights || !wanted {
            continue;
        }
        if name == "config.json" {
            // A merged model is a plain model: no quantisation section.
            let mut v: Value = serde_json::from_slice(&fs::read(&path)?).with_context(|| format!("{} is not JSON", path.display()))?;
            if let Some(o) = v.as_object_mut() {
                o.remove("quantization_config");
            }
            fs::write(out_dir.join(&name), serde_json::to_vec_pretty(&v)?)?;
        } else {
            fs::copy(&path, out_dir.join(&name)).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// Replaces `dest` by the folder `built` (a sibling temp folder) as atomically as folders allow:
/// the old one is moved aside first and removed after.
pub fn replace_dir(built: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        let old = dest.with_file_name(format!(
            ".{}.old-{}",
            dest.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&old);
        fs::rename(dest, &old).with_context(|| format!("moving the old {} aside", dest.display()))?;
        fs::rename(built, dest).with_context(|| format!("renaming into {}", dest.display()))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(built, dest).with_context(|| format!("renaming into {}", dest.display()))?;
    }
    Ok(())
}

/// A sibling temp folder name for building `dest`.
pub fn temp_sibling(dest: &Path) -> PathBuf {
    dest.with_file_name(format!(".{}.tmp-{}", dest.file_name().unwrap_or_default().to_string_lossy(), std::process::id()))
}

/// Copies a folder tree (files and subfolders).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            fs::copy(e.path(), &target).with_context(|| format!("copying {}", e.path().display()))?;
        }
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
        let dir = std::env::temp_dir().join(format!("lora-shard-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (base, single, sharded) = (dir.join("base"), dir.join("single"), dir.join("sharded"));
        for d in [&single, &sharded] {
            fs::create_dir_all(d).unwrap();
        }
        let cfg = lora_engine::ModelConfig::tiny_llama(512);
        lora_engine::testing::write_random_model(&base, &cfg, lora_engine::DType::BF16, 3).unwrap();
        let (r, d, q) = (4usize, 64usize, 64usize);
        let prefix = "base_model.model.model.layers.1.self_attn.q_proj";
        let adapter = vec![
            NamedTensor { name: format!("{prefix}.lora_A.weight"), shape: vec![r, d], data: (0..r * d).map(|i| (i % 7) as f32 * 0.01).collect() },
            NamedTensor { name: format!("{prefix}.lora_B.weight"), shape: vec![q, r], data: (0..q * r).map(|i| (i % 5) as f32 * -0.02).collect() },
        ];
        let acfg = AdapterConfig { r, ..AdapterConfig::default() };
        write_merged_weights(&base, &single, &adapter, &acfg).unwrap();
        write_merged_weights_sharded(&base, &sharded, &adapter, &acfg, 40_000).unwrap();
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
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn peft_config_has_the_fields_peft_and_vllm_read() {
        let c = peft_config(&AdapterConfig::default(), &["q_proj", "v_proj"], "Qwen/Qwen2.5-1.5B-Instruct");
        assert_eq!(c["peft_type"], "LORA");
        assert_eq!(c["task_type"], "CAUSAL_LM");
        assert_eq!(c["lora_alpha"], 32);
        assert_eq!(c["r"], 16);
        assert_eq!(c["bias"], "none");
        assert_eq!(c["inference_mode"], true);
        assert!(c["modules_to_save"].is_null());
    }
}
