//! Outputs of a trained adapter: the PEFT adapter folder (REFERENCE.md §4) and the merged full
//! model in the base model's dtype and tensor names (shards + index above 5 GB).

use std::path::Path;

use serde_json::json;

use crate::adapter::AdapterConfig;
use crate::error::{EngineError, Result};
use crate::merge::write_merged_weights;
use crate::trainer::Trainer;
use crate::weights::{OutTensor, write_safetensors};

/// Largest merged shard, as transformers' `max_shard_size="5GB"`.
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// `adapter_config.json` as PEFT writes it (REFERENCE.md §4): the one definition both the engine's
/// own export and the run's outputs and checkpoints use. Values are the values given (`0.1` for a
/// dropout of 0.1, not its f32 widened); `lora_alpha` is written as an integer when it is one, as
/// PEFT does for the component's integer parameter.
pub fn peft_config<S: AsRef<str>>(cfg: &AdapterConfig, targets: &[S], base_model_name_or_path: &str) -> serde_json::Value {
    let alpha = if cfg.lora_alpha.fract() == 0.0 && cfg.lora_alpha.abs() < 2f64.powi(53) {
        json!(cfg.lora_alpha as i64)
    } else {
        json!(cfg.lora_alpha)
    };
    // The 3-D expert parameters are PEFT's `target_parameters`.
    let (params, targets): (Vec<&str>, Vec<&str>) = targets.iter().map(|t| t.as_ref()).partition(|t| crate::moe::EXPERT_PARAMS.contains(t));
    let mut v = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    if !params.is_empty() {
        v["target_parameters"] = json!(params);
    }
    v
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| EngineError::Write { path: tmp.clone(), msg: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::Write { path: path.to_path_buf(), msg: e.to_string() })
}

impl Trainer {
    /// Writes `adapter_config.json` + `adapter_model.safetensors` (f32) into `dir`, loadable by
    /// `PeftModel.from_pretrained` (and by vLLM unless DoRA).
    pub fn save_peft_adapter(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let cfg = &self.adapters.cfg;
        let (mut targets, params) = cfg.target_names(&self.model.cfg)?;
        targets.extend(params);
        let config = peft_config(cfg, &targets, base_model_name_or_path);
        let tensors: Vec<OutTensor> = self
            .adapter_tensors()?
            .into_iter()
            .map(|t| OutTensor { name: t.name, shape: t.shape, data: t.data })
            .collect();
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, crate::DType::F32, Some([("format".to_string(), "pt".to_string())].into()))?;
        let text = serde_json::to_string_pretty(&config).map_err(|e| EngineError::Write { path: dir.into(), msg: e.to_string() })?;
        write_text(&dir.join("adapter_config.json"), &text)
    }

    /// Writes the base model with the adapter merged in (`W + s B A`; DoRA `m / ||W + s B A|| *
    /// (W + s B A)` per output row) into `out_dir`, in the base files' dtypes with the base
    /// tensor names, sharded above [`MAX_SHARD_BYTES`], plus `config.json`. Needs a model loaded
    /// from a folder. See [`crate::merge`].
    pub fn merge_into(&self, out_dir: &Path) -> Result<()> {
        let src = self.model.source_dir().ok_or_else(|| {
            EngineError::Unsupported("merge_into needs a model loaded from a folder (this one has random weights)".into())
        })?;
        std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
        write_merged_weights(src, out_dir, &self.adapter_tensors()?, &self.adapters.cfg, MAX_SHARD_BYTES)?;
        let cfg_src = src.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_src).map_err(|e| EngineError::io(&cfg_src, e))?;
        write_text(&out_dir.join("config.json"), &cfg_text)
    }
}
