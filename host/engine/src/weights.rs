//! safetensors weights of a model folder: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped; tensors are looked up by name and checked for
//! dtype and shape. Float tensors (F32, BF16, F16) are weights; U8 and I8 tensors hold the
//! quantized weights of bitsandbytes checkpoints ([`WeightFiles::raw`], read by
//! [`crate::quant::bnb`]). Also writes safetensors files (temp file, then rename).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::backend::{DType, HostData};
use crate::error::{EngineError, Result};

struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// The memory-mapped weight files of one model folder.
pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

/// A tensor's bytes as stored, with its safetensors dtype and shape.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub dtype: StDtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

fn map_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::F16 => Some(DType::F16),
        StDtype::U32 => Some(DType::U32),
        _ => None,
    }
}

impl WeightFiles {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::WeightsFile { file: index.clone(), msg: format!("not valid JSON: {e}") })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| EngineError::WeightsFile {
                file: index.clone(),
                msg: "has no `weight_map` object".into(),
            })?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(EngineError::WeightsFile {
                file: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json in this folder".into(),
            });
        };
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in names.into_iter().enumerate() {
            let f = std::fs::File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: the file is opened read-only; a concurrent writer would be a user error
            // that at worst changes tensor values, never memory safety of our own structures.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| EngineError::io(&path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| EngineError::WeightsFile {
                file: path.clone(),
                msg: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            })?;
            let data_start = 8 + n;
            for (name, info) in meta.tensors() {
                if map_dtype(info.dtype).is_none() && !matches!(info.dtype, StDtype::U8 | StDtype::I8) {
                    return Err(EngineError::Weights {
                        file: path.clone(),
                        tensor: name.clone(),
                        msg: format!("dtype {:?} is not supported (F32, BF16, F16; U8/I8 for bitsandbytes quantized weights)", info.dtype),
                    });
                }
                let dtype = info.dtype;
                let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
                if end > mmap.len() {
                    return Err(EngineError::Weights {
                        file: path.clone(),
                        tensor: name,
                        msg: format!("data ends at byte {end} but the file has {} bytes (truncated?)", mmap.len()),
                    });
                }
                entries.insert(name, Entry { file: fi, dtype, shape: info.shape.clone(), start, end });
            }
            files.push((path, mmap));
        }
        Ok(WeightFiles { files, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Tensor names (sorted).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    /// A tensor's shape, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    /// The dtype of the first floating-point tensor (the model's storage dtype).
    pub fn file_dtype(&self) -> DType {
        self.names()
            .iter()
            .filter_map(|n| map_dtype(self.entries[n].dtype).filter(|d| *d != DType::U32))
            .next()
            .unwrap_or(DType::F32)
    }

    /// The float dtype of tensor `name`, if it is a float tensor.
    pub fn float_dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).and_then(|e| map_dtype(e.dtype)).filter(|d| *d != DType::U32)
    }

    /// The file holding tensor `name` (the first file when it is missing), for error messages.
    pub fn file_of(&self, name: &str) -> PathBuf {
        let i = self.entries.get(name).map_or(0, |e| e.file);
        self.files.get(i).map(|f| f.0.clone()).unwrap_or_default()
    }

    /// A tensor's bytes as stored, any dtype; `None` when missing.
    pub fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let e = self.entries.get(name)?;
        Some(RawTensor { dtype: e.dtype, shape: &e.shape, bytes: &self.files[e.file].1[e.start..e.end] })
    }

    /// A tensor's bytes, checked against `shape`; the error names the file, tensor and shapes.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<(HostData<'_>, DType)> {
        let e = self.entries.get(name).ok_or_else(|| EngineError::Weights {
            file: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
            tensor: name.to_string(),
            msg: format!("missing (expected shape {shape:?})"),
        })?;
        let file = &self.files[e.file];
        if e.shape != shape {
            return Err(EngineError::Weights {
                file: file.0.clone(),
                tensor: name.to_string(),
                msg: format!("has shape {:?}, expected {shape:?}", e.shape),
            });
        }
        let bytes = &file.1[e.start..e.end];
        let data = match map_dtype(e.dtype) {
            Some(DType::F32) => HostData::F32Bytes(bytes),
            Some(DType::BF16) => HostData::Bf16Bytes(bytes),
            Some(DType::F16) => HostData::F16Bytes(bytes),
            _ => {
                return Err(EngineError::Weights {
                    file: file.0.clone(),
                    tensor: name.into(),
                    msg: format!("is {:?}, expected floats (a quantized weight where a 16-bit one was expected?)", e.dtype),
                });
            }
        };
        let dtype = map_dtype(e.dtype).unwrap_or(DType::F32);
        if data.len() != shape.iter().product::<usize>() {
            return Err(EngineError::Weights {
                file: file.0.clone(),
                tensor: name.to_string(),
                msg: format!("holds {} bytes, which does not match shape {shape:?}", bytes.len()),
            });
        }
        Ok((data, dtype))
    }
}

/// A tensor to write: name, shape, f32 values, stored as `dtype`.
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Encodes f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => data.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        DType::F16 => data.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        DType::U32 => data.iter().flat_map(|x| (*x as u32).to_le_bytes()).collect(),
    }
}

/// Writes tensors to `path` as safetensors in `dtype` (through a temp file and a rename).
pub fn write_safetensors(path: &Path, tensors: &[OutTensor], dtype: DType, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::U32 => StDtype::U32,
    };
    let encoded: BTreeMap<&str, (Vec<u8>, &Vec<usize>)> =
        tensors.iter().map(|t| (t.name.as_str(), (encode(&t.data, dtype), &t.shape))).collect();
    let mut views = Vec::new();
    for (name, (bytes, shape)) in &encoded {
        let view = safetensors::tensor::TensorView::new(st_dtype, (*shape).clone(), bytes)
            .map_err(|e| EngineError::Write { path: path.to_path_buf(), msg: format!("tensor `{name}`: {e}") })?;
        views.push((name.to_string(), view));
    }
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| EngineError::Write { path: tmp.clone(), msg: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::Write { path: path.to_path_buf(), msg: e.to_string() })
}
