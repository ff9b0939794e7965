//! Fixtures for tests of this and other crates: tiny random model folders on disk.

use std::path::Path;

use crate::backend::DType;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{random_tensor, tensor_specs};
use crate::weights::{OutTensor, write_safetensors};

/// Writes `config.json` + `model.safetensors` (in `dtype`) of a model of `cfg` with
/// deterministic random weights into `dir` (created if needed). Tokenizer files are not written.
pub fn write_random_model(dir: &Path, cfg: &ModelConfig, dtype: DType, seed: u64) -> Result<()> {
    if dtype == DType::U32 {
        return Err(EngineError::Unsupported("random model weights must be F32, BF16 or F16".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let tensors: Vec<OutTensor> = tensor_specs(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let data = random_tensor(&name, shape.iter().product(), seed);
            OutTensor { name, shape, data }
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors, dtype, Some([("format".to_string(), "pt".to_string())].into()))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg.to_hf_json(dtype.torch_name())).map_err(|e| EngineError::Write { path: cfg_path.clone(), msg: e.to_string() })?;
    std::fs::write(&cfg_path, text).map_err(|e| EngineError::io(&cfg_path, e))
}
