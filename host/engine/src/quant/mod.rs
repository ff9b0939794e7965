//! Quantized frozen base weights, stored exactly as bitsandbytes stores them, so checkpoints move
//! both ways between this engine and transformers + bitsandbytes.
//!
//! - **4-bit** (`load_in_4bit`, QLoRA): the weight `W [out, in]` is flattened row-major and cut
//!   into blocks of `blocksize` values (64; a stored property). Each block keeps its absolute
//!   maximum (`absmax`, f32) and one 4-bit code per value, `code(x / absmax)` in the NF4 or FP4
//!   code book; two codes per byte, element `2i` in the high nibble. Dequantized:
//!   `W[i] = CODE[q_i] * absmax[i / blocksize]` in f32.
//! - **double quant** (`bnb_4bit_use_double_quant`): the absmax values are themselves quantized:
//!   `offset = mean(absmax)` (here: an f64 sum in index order, rounded to f32), then
//!   `absmax - offset` in blocks of 256 with the signed 8-bit dynamic map and a nested f32 absmax
//!   per block: `absmax_i = MAP[c_i] * nested[i / 256] + offset`. About 0.516 bytes per weight
//!   instead of 0.5625.
//! - **8-bit** (`load_in_8bit`): `CB int8 [out, in] = round(f16(W) * 127 / SCB)`, `SCB f32 [out]` =
//!   the row's absmax; dequantized `CB * SCB / 127`. This is **weight-only** int8: bitsandbytes'
//!   LLM.int8 also quantizes the activations of each matrix product (and keeps outlier columns in
//!   fp16); this engine multiplies by the dequantized weight instead, so its forward numerics are
//!   those of the 16-bit model with the int8-rounded weight.
//!
//! Where bitsandbytes' CPU and CUDA kernels disagree, the CUDA kernel is followed (real
//! checkpoints are made on GPUs); see [`codes`]. Computation dequantizes one linear's weight into
//! a reused buffer right before its matrix products ([`crate::Backend::dequantize`]), in the
//! compute dtype: the value is rounded to `bnb_4bit_compute_dtype` as bitsandbytes' forward does
//! (`dequantize_4bit(..., dtype=compute_dtype)`), and the backward to the input uses the same
//! dequantized weight, as PEFT does. (bitsandbytes' backward and PEFT's DoRA norm dequantize to
//! the weight's original dtype first: with the usual bf16 model and bf16 compute that is the same
//! weight; with a bf16 model and float32 compute theirs is rounded to bf16 where the forward's is
//! not, while this engine uses the compute-dtype weight throughout.) [`bnb`] reads and writes the
//! checkpoint layout.

pub mod bnb;
mod codes;

use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

use bnb::BnbConfig;

pub use codes::{DYNAMIC_BITS, FP4, NF4, dynamic_map, quantize_dynamic, quantize_fp4, quantize_nf4};

use crate::backend::{Backend, Buf, DType, HostData};
use crate::error::{EngineError, Result};

/// Block sizes bitsandbytes accepts for 4-bit weights.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// bitsandbytes' (and transformers') 4-bit block size.
pub const DEFAULT_BLOCKSIZE: usize = 64;
/// Block size of double quantization's 8-bit absmax codes.
pub const NESTED_BLOCKSIZE: usize = 256;
/// `1/127` as bitsandbytes' `int8_vectorwise_dequant` writes it (used as an f32 scalar).
#[allow(clippy::excessive_precision)]
const INV_127: f32 = 7.874_015_718_698_502e-3;

/// The 4-bit code book.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    /// `nf4` / `fp4`, as bitsandbytes spells them.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// Values by code, as the CUDA kernels dequantize them.
    pub fn code_book(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }

    /// The code book as bitsandbytes stores it (`quant_map`, from `get_4bit_type`): the same
    /// values, except FP4's code 8, which it stores as +0.0 (its kernels decode code 8 as -0.0).
    pub fn stored_code_book(self) -> [f32; 16] {
        let mut c = *self.code_book();
        c[8] = c[8].abs();
        c
    }

    /// The code of `x` (already divided by its block's absmax).
    pub fn quantize(self, x: f32) -> u8 {
        match self {
            QuantType::Nf4 => quantize_nf4(x),
            QuantType::Fp4 => quantize_fp4(x),
        }
    }
}

/// What a run asks for. `None` fields take the default (nf4, double quant, bf16 compute), or, for
/// a bitsandbytes checkpoint, what the checkpoint stores; a value that contradicts the stored data
/// is an error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantConfig {
    FourBit { quant_type: Option<QuantType>, double_quant: Option<bool>, compute_dtype: Option<DType> },
    EightBit,
}

impl QuantConfig {
    /// 4-bit with every setting at its default.
    pub fn four_bit() -> Self {
        QuantConfig::FourBit { quant_type: None, double_quant: None, compute_dtype: None }
    }
}

/// Where the quantized weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantSource {
    /// Quantized while loading a 16-bit (or f32) checkpoint.
    QuantizedAtLoad,
    /// Read as stored in a bitsandbytes checkpoint (`quantization_config` in config.json).
    Checkpoint,
}

/// What a loaded model holds: recorded in the run manifest and shown in logs.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantInfo {
    /// 4 or 8.
    pub bits: u8,
    /// 4-bit only.
    pub quant_type: Option<QuantType>,
    pub double_quant: bool,
    /// 4-bit only.
    pub blocksize: Option<usize>,
    /// The dtype dequantized weights are rounded to before the matrix products.
    pub compute_dtype: DType,
    pub source: QuantSource,
    /// The dtype of the weights before quantization (bitsandbytes' quant state `dtype`).
    pub weight_dtype: DType,
    /// Quantized parameters (every projection of every decoder layer) and the bytes they occupy.
    pub linear_params: u64,
    pub linear_bytes: u64,
}

impl QuantInfo {
    /// Resident bytes per quantized parameter (≈ 0.516 for 4-bit with double quant).
    pub fn bytes_per_param(&self) -> f64 {
        self.linear_bytes as f64 / self.linear_params.max(1) as f64
    }

    /// The manifest's record: settings, source, sizes; for 8-bit what "weight-only" means.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "bits": self.bits,
            "quant_type": self.quant_type.map(QuantType::name),
            "double_quant": self.double_quant,
            "blocksize": self.blocksize,
            "compute_dtype": self.compute_dtype.torch_name(),
            "source": self.source,
            "weight_dtype": self.weight_dtype.torch_name(),
            "quantized_params": self.linear_params,
            "quantized_bytes": self.linear_bytes,
            "bytes_per_quantized_param": (self.bytes_per_param() * 1e4).round() / 1e4,
        });
        if self.bits == 8 {
            v["activations"] = json!(
                "not quantized: weight-only int8 (the matrix products use the dequantized weight); bitsandbytes' LLM.int8 also quantizes the activations of each product to int8, with outlier columns in fp16"
            );
        }
        v
    }

    /// One line for logs: `4-bit nf4, double quant, blocksize 64, compute bfloat16 (quantized at load)`.
    pub fn describe(&self) -> String {
        let what = match self.quant_type {
            Some(t) => format!(
                "4-bit {}{}, blocksize {}, compute {}",
                t.name(),
                if self.double_quant { ", double quant" } else { "" },
                self.blocksize.unwrap_or(DEFAULT_BLOCKSIZE),
                self.compute_dtype.torch_name()
            ),
            None => format!("8-bit int8 weight-only (activations are not quantized), compute {}", self.compute_dtype.torch_name()),
        };
        let source = match self.source {
            QuantSource::QuantizedAtLoad => format!("quantized at load from {} weights", self.weight_dtype.torch_name()),
            QuantSource::Checkpoint => "read from a bitsandbytes checkpoint".to_string(),
        };
        format!("{what} ({source}); {:.3} bytes per quantized parameter", self.bytes_per_param())
    }
}

/// What loading will do about quantization, decided from the request and the checkpoint (what
/// [`crate::Model::load`] applies and a dry run shows).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantPlan {
    /// 4-bit code book, double quant, block size; `None` for 8-bit.
    pub four: Option<(QuantType, bool, usize)>,
    pub compute: DType,
    pub source: QuantSource,
}

impl QuantPlan {
    /// The plan for request `req` on a model folder `dir` whose config.json has bitsandbytes
    /// config `ckpt` (if any); `eight_bit_compute` is the backend's base weight dtype. A request
    /// that does not fit the checkpoint (or a checkpoint without the request) is an error saying
    /// which setting to change.
    pub fn resolve(req: Option<QuantConfig>, ckpt: Option<&BnbConfig>, dir: &Path, eight_bit_compute: DType) -> Result<Option<Self>> {
        let bits = |c: &BnbConfig| if c.load_in_4bit { 4 } else { 8 };
        let unsupported = |msg: String| EngineError::Unsupported(format!("{}: {msg}", dir.display()));
        let plan = match (req, ckpt) {
            (None, None) => return Ok(None),
            (None, Some(c)) => {
                let b = bits(c);
                return Err(unsupported(format!(
                    "this is a bitsandbytes {b}-bit checkpoint (quantization_config in config.json); load it with training_lora_load_in_{b}bit=true"
                )));
            }
            (Some(QuantConfig::FourBit { .. }), Some(c)) if c.load_in_8bit => {
                return Err(unsupported("this is a bitsandbytes 8-bit checkpoint: int8 weights are not re-quantized to 4-bit; use training_lora_load_in_8bit=true, or a 16-bit checkpoint".into()));
            }
            (Some(QuantConfig::EightBit), Some(c)) if c.load_in_4bit => {
                return Err(unsupported("this is a bitsandbytes 4-bit checkpoint: use training_lora_load_in_4bit=true, or a 16-bit checkpoint".into()));
            }
            (Some(QuantConfig::FourBit { quant_type, double_quant, compute_dtype }), Some(c)) => {
                if let Some(t) = quant_type.filter(|t| *t != c.quant_type) {
                    return Err(unsupported(format!(
                        "bnb_4bit_quant_type={} but this checkpoint stores {} weights (quantization_config); leave it unset or set {}",
                        t.name(),
                        c.quant_type.name(),
                        c.quant_type.name()
                    )));
                }
                if let Some(d) = double_quant.filter(|d| *d != c.double_quant) {
                    return Err(unsupported(format!(
                        "bnb_4bit_use_double_quant={d} but this checkpoint's weights are stored {} double quantization; leave it unset or set {}",
                        if c.double_quant { "with" } else { "without" },
                        c.double_quant
                    )));
                }
                // The block size is per weight (its quant state); 64 is what transformers writes.
                QuantPlan {
                    four: Some((c.quant_type, c.double_quant, DEFAULT_BLOCKSIZE)),
                    compute: compute_dtype.or(c.compute_dtype).unwrap_or(DType::BF16),
                    source: QuantSource::Checkpoint,
                }
            }
            (Some(QuantConfig::FourBit { quant_type, double_quant, compute_dtype }), None) => QuantPlan {
                four: Some((quant_type.unwrap_or(QuantType::Nf4), double_quant.unwrap_or(true), DEFAULT_BLOCKSIZE)),
                compute: compute_dtype.unwrap_or(DType::BF16),
                source: QuantSource::QuantizedAtLoad,
            },
            (Some(QuantConfig::EightBit), c) => QuantPlan {
                four: None,
                compute: eight_bit_compute,
                source: if c.is_some() { QuantSource::Checkpoint } else { QuantSource::QuantizedAtLoad },
            },
        };
        Ok(Some(plan))
    }
}

/// `x` rounded to `dtype` (round to nearest even) and back to f32; F32 and U32 leave it as is.
pub fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::F32 | DType::U32 => x,
    }
}

/// Double quantization of the 4-bit absmax values.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code of `absmax - offset` per 4-bit block.
    pub codes: Vec<u8>,
    /// f32 absmax of `absmax - offset` per [`NESTED_BLOCKSIZE`] codes.
    pub nested_absmax: Vec<f32>,
    /// The 256-entry map the codes index (bitsandbytes stores it; [`DYNAMIC_BITS`] when made here).
    pub map: Vec<f32>,
    pub offset: f32,
}

impl DoubleQuant {
    /// `offset = mean(absmax)`: f64 sum in index order, divided, rounded to f32. (bitsandbytes
    /// uses `torch.mean`, whose summation order depends on the device; a stored offset is always
    /// read as stored.)
    pub fn mean(absmax: &[f32]) -> f32 {
        (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32
    }

    /// Quantizes `absmax` with its own mean as the offset.
    pub fn quantize(absmax: &[f32]) -> Self {
        Self::with_offset(absmax, Self::mean(absmax))
    }

    /// Quantizes `absmax - offset` in blocks of 256 with the dynamic map (bitsandbytes'
    /// `quantize_blockwise`, as its CUDA kernel computes it: `x * (1 / nested_absmax)`).
    pub fn with_offset(absmax: &[f32], offset: f32) -> Self {
        let map: [f32; 256] = DYNAMIC_BITS.map(f32::from_bits);
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let nested_absmax: Vec<f32> = centered.chunks(NESTED_BLOCKSIZE).map(block_absmax).collect();
        let codes = centered
            .chunks(NESTED_BLOCKSIZE)
            .zip(&nested_absmax)
            .flat_map(|(c, &m)| {
                let rcp = 1.0 / m;
                c.iter().map(move |&x| quantize_dynamic(&map, x * rcp)).collect::<Vec<_>>()
            })
            .collect();
        DoubleQuant { codes, nested_absmax, map: map.to_vec(), offset }
    }

    /// The f32 absmax values: `map[code] * nested_absmax[i / 256] + offset` (two roundings, no
    /// fused multiply-add, as bitsandbytes computes them).
    pub fn decode(&self) -> Vec<f32> {
        decode_nested(|i| self.codes[i], self.codes.len(), &self.nested_absmax, &self.map, self.offset)
    }
}

fn decode_nested(code: impl Fn(usize) -> u8, n: usize, nested: &[f32], map: &[f32], offset: f32) -> Vec<f32> {
    (0..n).map(|i| map[code(i) as usize] * nested[i / NESTED_BLOCKSIZE] + offset).collect()
}

/// The largest absolute value (NaN ignored, as CUDA's `fmaxf`; 0 for an empty block).
fn block_absmax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// The absmax of each 4-bit block: plain, or double quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(DoubleQuant),
}

/// A 4-bit weight on the host, as bitsandbytes stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quant4 {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// `[out, in]`.
    pub shape: Vec<usize>,
    /// `ceil(n / 2)` bytes; element `2i` in the high nibble of byte `i`.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Quant4 {
    /// Quantizes `w` (row-major, `shape`): `blocksize` must be one of [`BLOCKSIZES`].
    pub fn quantize(w: &[f32], shape: &[usize], quant_type: QuantType, blocksize: usize, double_quant: bool) -> Result<Self> {
        let n = check_shape("quantize_4bit", w.len(), shape)?;
        if !BLOCKSIZES.contains(&blocksize) {
            return Err(EngineError::Shape { op: "quantize_4bit", msg: format!("blocksize {blocksize} is not one of {BLOCKSIZES:?}") });
        }
        let absmax: Vec<f32> = w.par_chunks(blocksize).map(block_absmax).collect();
        let mut packed = vec![0u8; n.div_ceil(2)];
        // blocksize is even, so each block fills whole bytes (the last one possibly half).
        packed.par_chunks_mut(blocksize / 2).zip(w.par_chunks(blocksize)).zip(absmax.par_iter()).for_each(|((bytes, x), &m)| {
            let rcp = 1.0 / m;
            for (j, byte) in bytes.iter_mut().enumerate() {
                let hi = quant_type.quantize(x[2 * j] * rcp);
                // An odd last element pairs with the zero a GPU block loads past the end.
                let lo = quant_type.quantize(x.get(2 * j + 1).copied().unwrap_or(0.0) * rcp);
                *byte = (hi << 4) | lo;
            }
        });
        let absmax = if double_quant { Absmax::Double(DoubleQuant::quantize(&absmax)) } else { Absmax::Plain(absmax) };
        Ok(Quant4 { quant_type, blocksize, shape: shape.to_vec(), packed, absmax })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The f32 absmax of each block (decoded when double quantized).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(d) => d.decode(),
        }
    }

    /// The dequantized weight, each value rounded to `round_to`.
    pub fn dequantize(&self, round_to: DType) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        dequant4(self.quant_type, self.blocksize, |i| self.packed[i], &self.absmax_f32(), round_to, &mut out);
        out
    }

    /// Bytes the quantized weight occupies (codes, absmax or its codes and nested values).
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Double(d) => d.codes.len() + 4 * d.nested_absmax.len() + 4 * d.map.len() + 4,
            }
    }
}

/// `out[i] = round_to(CODE[q_i] * absmax[i / blocksize])` with `q_i` from byte `i / 2` (high
/// nibble for even `i`). Each block's 16 possible values are computed once (the same product and
/// rounding per element), then looked up.
fn dequant4(quant_type: QuantType, blocksize: usize, byte: impl Fn(usize) -> u8 + Sync, absmax: &[f32], round_to: DType, out: &mut [f32]) {
    let code = quant_type.code_book();
    // Whole blocks per parallel task (enough work to outweigh scheduling).
    let per_task = blocksize * (4096 / blocksize).max(1);
    out.par_chunks_mut(per_task).enumerate().for_each(|(t, task)| {
        for (k, chunk) in task.chunks_mut(blocksize).enumerate() {
            let base = t * per_task + k * blocksize;
            let scale = absmax[base / blocksize];
            let lut = code.map(|c| crate::quant::round_to(c * scale, round_to));
            let last_byte = (base + chunk.len() - 1) / 2;
            let mut pairs = chunk.chunks_exact_mut(2);
            for (j, pair) in pairs.by_ref().enumerate() {
                let b = byte((base + 2 * j) / 2);
                pair[0] = lut[(b >> 4) as usize];
                pair[1] = lut[(b & 0x0f) as usize];
            }
            // blocksize is even: only the tensor's last element can be unpaired (a high nibble).
            if let [last] = pairs.into_remainder() {
                *last = lut[(byte(last_byte) >> 4) as usize];
            }
        }
    });
}

/// An 8-bit (int8, row-wise absmax) weight on the host, as bitsandbytes' `Int8Params` stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quant8 {
    /// `[out, in]`.
    pub shape: Vec<usize>,
    pub cb: Vec<i8>,
    /// Absmax of each row of `f16(W)`.
    pub scb: Vec<f32>,
}

impl Quant8 {
    /// Quantizes `w [rows, cols]` as `Int8Params` does: `B = f16(W)`, `SCB = max|B|` per row,
    /// `CB = round_half_even(B * ((1 / SCB) * 127))` (torch evaluates `127 / SCB` as a reciprocal
    /// times 127). A weight outside the fp16 range cannot be quantized this way: an error.
    pub fn quantize(w: &[f32], shape: &[usize]) -> Result<Self> {
        check_shape("quantize_8bit", w.len(), shape)?;
        let cols = match shape {
            [_, c] => *c,
            _ => return Err(EngineError::Shape { op: "quantize_8bit", msg: format!("shape {shape:?} is not a matrix") }),
        };
        let b: Vec<f32> = w.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        if let Some(i) = b.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::Shape {
                op: "quantize_8bit",
                msg: format!("element {i} ({}) is outside the fp16 range that 8-bit quantization converts to first", w[i]),
            });
        }
        let scb: Vec<f32> = b.chunks(cols.max(1)).map(block_absmax).collect();
        let mut cb = vec![0i8; b.len()];
        cb.par_chunks_mut(cols.max(1)).zip(b.par_chunks(cols.max(1))).zip(scb.par_iter()).for_each(|((q, row), &m)| {
            let s = (1.0 / m) * 127.0;
            for (q, &x) in q.iter_mut().zip(row) {
                // An all-zero row gives 0 * inf = NaN, which `as` turns into 0.
                *q = (x * s).round_ties_even() as i8;
            }
        });
        Ok(Quant8 { shape: shape.to_vec(), cb, scb })
    }

    /// `CB * SCB / 127` (as `int8_vectorwise_dequant`: `(CB * SCB) * (1/127)` in f32), rounded to `round_to`.
    pub fn dequantize(&self, round_to: DType) -> Vec<f32> {
        let mut out = vec![0.0; self.cb.len()];
        dequant8(|i| self.cb[i], &self.scb, round_to, &mut out);
        out
    }

    pub fn bytes(&self) -> usize {
        self.cb.len() + 4 * self.scb.len()
    }
}

fn dequant8(cb: impl Fn(usize) -> i8 + Sync, scb: &[f32], round_to: DType, out: &mut [f32]) {
    let cols = out.len() / scb.len().max(1);
    out.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, row)| {
        let s = scb[r];
        for (j, o) in row.iter_mut().enumerate() {
            *o = crate::quant::round_to((cb(r * cols + j) as f32 * s) * INV_127, round_to);
        }
    });
}

/// A quantized weight on the host.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantTensor {
    Four(Quant4),
    Eight(Quant8),
}

impl QuantTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            QuantTensor::Four(q) => &q.shape,
            QuantTensor::Eight(q) => &q.shape,
        }
    }

    pub fn dequantize(&self, round_to: DType) -> Vec<f32> {
        match self {
            QuantTensor::Four(q) => q.dequantize(round_to),
            QuantTensor::Eight(q) => q.dequantize(round_to),
        }
    }

    /// Copies the quantized data to `be`'s memory (bytes as little-endian U32 words).
    pub fn upload(&self, be: &dyn Backend) -> Result<DeviceQuant> {
        let shape = self.shape();
        let (rows, cols) = match shape {
            [r, c] => (*r, *c),
            _ => return Err(EngineError::Shape { op: "upload_quant", msg: format!("shape {shape:?} is not a matrix") }),
        };
        let words = |bytes: &[u8]| -> Result<Buf> {
            let w: Vec<u32> = bytes.chunks(4).map(|c| c.iter().rev().fold(0u32, |acc, &b| (acc << 8) | b as u32)).collect();
            be.upload(HostData::U32(&w), DType::U32)
        };
        let f32s = |v: &[f32]| be.upload(HostData::F32(v), DType::F32);
        Ok(match self {
            QuantTensor::Four(q) => {
                let (scales, nested) = match &q.absmax {
                    Absmax::Plain(a) => (f32s(a)?, None),
                    Absmax::Double(d) => (
                        f32s(&d.nested_absmax)?,
                        Some(NestedDevice { codes: words(&d.codes)?, map: f32s(&d.map)?, offset: d.offset }),
                    ),
                };
                DeviceQuant {
                    format: QuantFormat::Four { quant_type: q.quant_type, blocksize: q.blocksize },
                    rows,
                    cols,
                    data: words(&q.packed)?,
                    scales,
                    nested,
                    bytes: q.bytes(),
                }
            }
            QuantTensor::Eight(q) => {
                let cb: Vec<u8> = q.cb.iter().map(|&v| v as u8).collect();
                DeviceQuant { format: QuantFormat::Eight, rows, cols, data: words(&cb)?, scales: f32s(&q.scb)?, nested: None, bytes: q.bytes() }
            }
        })
    }
}

fn check_shape(op: &'static str, len: usize, shape: &[usize]) -> Result<usize> {
    let n: usize = shape.iter().product();
    if n != len || n == 0 {
        return Err(EngineError::Shape { op, msg: format!("{len} values do not fill shape {shape:?} (or it is empty)") });
    }
    Ok(n)
}

/// How a [`DeviceQuant`] is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    Four { quant_type: QuantType, blocksize: usize },
    Eight,
}

/// Double quantization's buffers on the device.
#[derive(Debug)]
pub struct NestedDevice {
    /// One byte per 4-bit block, in U32 words.
    pub codes: Buf,
    /// 256 f32 values.
    pub map: Buf,
    pub offset: f32,
}

/// A quantized frozen weight `[rows, cols]` in a backend's memory: what
/// [`Backend::dequantize`](crate::Backend::dequantize) reads.
#[derive(Debug)]
pub struct DeviceQuant {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// 4-bit: packed codes; 8-bit: int8 `CB`. Bytes in little-endian U32 words, zero padded.
    pub data: Buf,
    /// 4-bit: the f32 absmax per block, or with double quant the nested absmax per 256 blocks;
    /// 8-bit: `SCB` per row.
    pub scales: Buf,
    pub nested: Option<NestedDevice>,
    /// Bytes of the quantized representation (without word padding).
    pub bytes: usize,
}

impl DeviceQuant {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// The byte at index `i` of little-endian U32 words.
#[inline]
fn word_byte(words: &[u32], i: usize) -> u8 {
    (words[i / 4] >> (8 * (i % 4))) as u8
}

/// The dequantization a host-memory backend runs (the CPU backend, and the reference of every
/// other): `words`, `scales`, `nested` are the slices of a [`DeviceQuant`]'s buffers; `out` gets
/// `rows * cols` values rounded to `round_to`.
pub fn dequantize_host(
    q: &DeviceQuant,
    words: &[u32],
    scales: &[f32],
    nested: Option<(&[u32], &[f32])>,
    round_to: DType,
    out: &mut [f32],
) -> Result<()> {
    let n = q.numel();
    let bad = |msg: String| EngineError::Shape { op: "dequantize", msg };
    if out.len() != n {
        return Err(bad(format!("`out` has {} elements, expected {n}", out.len())));
    }
    match q.format {
        QuantFormat::Four { quant_type, blocksize } => {
            let blocks = n.div_ceil(blocksize);
            if words.len() * 4 < n.div_ceil(2) {
                return Err(bad(format!("{} code bytes for {n} values", words.len() * 4)));
            }
            let absmax = match (&q.nested, nested) {
                (None, None) => {
                    if scales.len() != blocks {
                        return Err(bad(format!("{} absmax values for {blocks} blocks", scales.len())));
                    }
                    std::borrow::Cow::Borrowed(scales)
                }
                (Some(nd), Some((codes, map))) => {
                    if codes.len() * 4 < blocks || scales.len() != blocks.div_ceil(NESTED_BLOCKSIZE) || map.len() != 256 {
                        return Err(bad(format!("double-quant buffers do not fit {blocks} blocks")));
                    }
                    std::borrow::Cow::Owned(decode_nested(|i| word_byte(codes, i), blocks, scales, map, nd.offset))
                }
                _ => return Err(bad("double-quant buffers missing or unexpected".into())),
            };
            dequant4(quant_type, blocksize, |i| word_byte(words, i), &absmax, round_to, out);
        }
        QuantFormat::Eight => {
            if scales.len() != q.rows || words.len() * 4 < n {
                return Err(bad(format!("int8 buffers do not fit [{}, {}]", q.rows, q.cols)));
            }
            dequant8(|i| word_byte(words, i) as i8, scales, round_to, out);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| half::bf16::from_f32(0.04 * (rng.uniform() - 0.5)).to_f32()).collect()
    }

    #[test]
    fn four_bit_round_trip_is_within_half_a_code_step_and_uploads_losslessly() {
        let w = weights(37 * 13, 1); // 481 values: a partial last block and an odd count
        for t in [QuantType::Nf4, QuantType::Fp4] {
            for dq in [false, true] {
                let q = Quant4::quantize(&w, &[37, 13], t, 64, dq).unwrap();
                assert_eq!(q.packed.len(), 241);
                let back = q.dequantize(DType::F32);
                let absmax = q.absmax_f32();
                for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                    // The widest gap between neighbouring codes is 1/3 of the range (FP4 2/3..1).
                    assert!((a - b).abs() <= absmax[i / 64] * 0.17 + 1e-3, "{t:?} dq {dq} [{i}] {a} vs {b}");
                }
                let dev = QuantTensor::Four(q.clone()).upload(&CpuBackend::new()).unwrap();
                let mut out = CpuBackend::new().zeros(w.len(), DType::F32).unwrap();
                CpuBackend::new().dequantize(&dev, DType::BF16, &mut out).unwrap();
                let got = CpuBackend::new().download_f32(&out).unwrap();
                assert_eq!(got, q.dequantize(DType::BF16), "the backend decodes what the host quantized");
            }
        }
    }

    #[test]
    fn an_all_zero_block_stays_zero_as_on_a_gpu() {
        let mut w = weights(128, 2);
        w[..64].fill(0.0);
        let q = Quant4::quantize(&w, &[2, 64], QuantType::Nf4, 64, false).unwrap();
        // 0 * (1/0) is NaN on the GPU kernel, whose tree gives code 0 (-1.0); times absmax 0.
        assert!(q.packed[..32].iter().all(|&b| b == 0));
        assert!(q.dequantize(DType::F32)[..64].iter().all(|&v| v == 0.0));
        let q8 = Quant8::quantize(&w, &[2, 64]).unwrap();
        assert!(q8.cb[..64].iter().all(|&v| v == 0) && q8.scb[0] == 0.0);
    }

    #[test]
    fn double_quant_decodes_close_to_the_absmax_it_encodes() {
        let absmax: Vec<f32> = (0..600).map(|i| 0.01 + (i % 37) as f32 * 1e-3).collect();
        let d = DoubleQuant::quantize(&absmax);
        assert_eq!((d.codes.len(), d.nested_absmax.len()), (600, 3));
        for (a, b) in absmax.iter().zip(d.decode()) {
            assert!((a - b).abs() < 2e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn eight_bit_refuses_values_fp16_cannot_hold_and_rounds_half_to_even() {
        let e = Quant8::quantize(&[1.0, 1e6], &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("fp16 range"), "{e}");
        let q = Quant8::quantize(&[127.0, 0.5, -1.5, 2.5], &[1, 4]).unwrap();
        assert_eq!(q.cb, vec![127, 0, -2, 2]);
        assert_eq!(q.dequantize(DType::F32)[0], (127.0f32 * 127.0) * INV_127);
    }

    #[test]
    fn bad_block_sizes_and_shapes_are_errors() {
        assert!(Quant4::quantize(&[0.0; 8], &[2, 4], QuantType::Nf4, 48, false).is_err());
        assert!(Quant4::quantize(&[0.0; 8], &[3, 4], QuantType::Nf4, 64, false).is_err());
    }
}
