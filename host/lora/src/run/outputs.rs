//! What a run leaves behind: the PEFT adapter (`output_model/adapter/`), the merged full model in
//! the base model's dtype (`output_model/`, sharded with an index above 5 GB), copies of the
//! tokenizer and generation files, and the copy to `<pvc_path>/final_model`.
//!
//! The merge is the engine's ([`lora_engine::merge`]): streamed tensor by tensor, unadapted
//! weights copied byte for byte, adapted ones merged in f32 and stored in the base dtype. Folders
//! are built under a temp name and renamed into place.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lora_engine::{AdapterConfig, NamedTensor};
use serde_json::Value;

use crate::checkpoint::encode_safetensors;

pub use lora_engine::export::peft_config;

/// Writes the merged model's weights into `out_dir` (same names and dtypes as the base), sharded
/// above transformers' 5 GB.
pub fn write_merged_weights(base_dir: &Path, out_dir: &Path, adapter: &[NamedTensor], cfg: &AdapterConfig) -> Result<()> {
    lora_engine::merge::write_merged_weights(base_dir, out_dir, adapter, cfg, lora_engine::export::MAX_SHARD_BYTES)?;
    Ok(())
}

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
