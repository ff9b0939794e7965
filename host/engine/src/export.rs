//! Outputs of a trained adapter: the PEFT adapter folder (REFERENCE.md §4) and the merged full
//! model in the base model's dtype and tensor names (shards + index above 5 GB).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::adapter::{AdapterConfig, peft_prefix};
use crate::cpu::sgemm;
use crate::error::{EngineError, Result};
use crate::model::Module;
use crate::trainer::Trainer;
use crate::weights::{OutTensor, WeightFiles, write_safetensors};

/// Largest merged shard, as transformers' `max_shard_size="5GB"`.
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// `adapter_config.json` as PEFT writes it (REFERENCE.md §4): the one definition both the engine's
/// own export and the run's outputs and checkpoints use. `lora_alpha` is written as an integer when
/// it is one, as PEFT does for the component's integer parameter.
pub fn peft_config<S: AsRef<str>>(cfg: &AdapterConfig, targets: &[S], base_model_name_or_path: &str) -> serde_json::Value {
    let alpha = if cfg.lora_alpha.fract() == 0.0 { json!(cfg.lora_alpha as i64) } else { json!(cfg.lora_alpha) };
    let targets: Vec<&str> = targets.iter().map(|t| t.as_ref()).collect();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.lora_dropout as f64,
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
    })
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
        let targets: Vec<&str> = cfg.resolve_targets()?.iter().map(|m| m.name()).collect();
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
    /// (W + s B A)` per output row) into `out_dir`, in the base files' dtype with the base
    /// tensor names, plus `config.json`. Needs a model loaded from a folder.
    pub fn merge_into(&self, out_dir: &Path) -> Result<()> {
        let src = self.model.source_dir().ok_or_else(|| {
            EngineError::Unsupported("merge_into needs a model loaded from a folder (this one has random weights)".into())
        })?;
        let files = WeightFiles::open(src)?;
        let dtype = self.model.file_dtype;
        std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
        let adapter: BTreeMap<String, Vec<f32>> = self.adapter_tensors()?.into_iter().map(|t| (t.name, t.data)).collect();
        let names = files.names();
        // Plan shards by output size.
        let mut shards: Vec<Vec<String>> = vec![Vec::new()];
        let mut size = 0usize;
        let mut total = 0usize;
        for n in &names {
            let shape = files.shape(n).unwrap_or_default();
            let bytes = shape.iter().product::<usize>() * dtype.size();
            if size + bytes > MAX_SHARD_BYTES && !shards.last().map(|s| s.is_empty()).unwrap_or(true) {
                shards.push(Vec::new());
                size = 0;
            }
            size += bytes;
            total += bytes;
            if let Some(last) = shards.last_mut() {
                last.push(n.clone());
            }
        }
        let n_shards = shards.len();
        let mut weight_map = BTreeMap::new();
        for (si, shard) in shards.iter().enumerate() {
            let file_name = if n_shards == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n_shards:05}.safetensors", si + 1) };
            let mut out = Vec::with_capacity(shard.len());
            for n in shard {
                let shape = files.shape(n).unwrap_or_default();
                let (data, _) = files.get(n, &shape)?;
                let mut w = data.to_f32();
                self.merge_tensor(n, &mut w, &adapter)?;
                weight_map.insert(n.clone(), file_name.clone());
                out.push(OutTensor { name: n.clone(), shape, data: w });
            }
            write_safetensors(&out_dir.join(&file_name), &out, dtype, Some([("format".to_string(), "pt".to_string())].into()))?;
        }
        if n_shards > 1 {
            let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
            write_text(&out_dir.join("model.safetensors.index.json"), &serde_json::to_string_pretty(&index).unwrap_or_default())?;
        }
        let cfg_src = src.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_src).map_err(|e| EngineError::io(&cfg_src, e))?;
        write_text(&out_dir.join("config.json"), &cfg_text)
    }

    /// Applies this tensor's adapter (if any) to `w` in place.
    fn merge_tensor(&self, name: &str, w: &mut [f32], adapter: &BTreeMap<String, Vec<f32>>) -> Result<()> {
        let Some(rest) = name.strip_prefix("model.layers.") else { return Ok(()) };
        let Some((li, path)) = rest.split_once('.') else { return Ok(()) };
        let Ok(layer) = li.parse::<usize>() else { return Ok(()) };
        let Some(m) = Module::ALL.into_iter().find(|m| path == format!("{}.weight", m.path())) else { return Ok(()) };
        if self.adapters.slots.get(layer).and_then(|s| s[m as usize].as_ref()).is_none() {
            return Ok(());
        }
        let p = peft_prefix(layer, m);
        let get = |k: &str| adapter.get(&format!("{p}.{k}")).ok_or_else(|| EngineError::State { name: format!("{p}.{k}"), msg: "missing adapter tensor".into() });
        let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
        let (out_f, in_f) = m.dims(&self.model.cfg);
        let r = self.adapters.cfg.r;
        sgemm(out_f, in_f, r, false, false, self.adapters.scale, b, a, 1.0, w);
        if self.adapters.cfg.use_dora {
            let mag = get("lora_magnitude_vector")?;
            for (o, row) in w.chunks_mut(in_f).enumerate() {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                let f = mag[o] / norm;
                row.iter_mut().for_each(|x| *x *= f);
            }
        }
        Ok(())
    }
}
