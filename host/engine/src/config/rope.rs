//! RoPE of a [`ModelConfig`]: the scaling kinds config.json names and the inverse frequencies
//! (and cos/sin factor) each implies, as transformers 5.17 computes them.

use std::path::Path;

use serde_json::{Map, Value};

use super::{ModelConfig, cfg_err, get_f64};
use crate::error::Result;

/// RoPE scaling (`rope_scaling` / `rope_parameters` of config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware base enlargement once a batch exceeds `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// Phi-3's LongRoPE: per-frequency divisors, `short_factor` while a batch's longest
    /// position fits `original_max_position_embeddings`, else `long_factor`; cos and sin are
    /// scaled by `attention_factor`.
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original_max_position_embeddings: usize, attention_factor: f64 },
}

/// Phi-3's LongRoPE parameters and its attention factor, as transformers 5.17
/// (`_compute_longrope_parameters`) derives them: an unset `factor` is
/// `max_position_embeddings / original_max_position_embeddings`, and an unset attention factor is
/// `sqrt(1 + ln(factor) / ln(original))` (1 when the factor is at most 1).
pub(super) fn longrope_of(m: &Map<String, Value>, o: &Map<String, Value>, path: &Path, rotary_dim: usize, mpe: usize) -> Result<RopeScaling> {
    let list = |key: &str| -> Result<Vec<f64>> {
        let a = o.get(key).and_then(Value::as_array).ok_or_else(|| cfg_err(path, format!("longrope scaling needs `{key}` (a list)")))?;
        let v: Vec<f64> = a.iter().filter_map(Value::as_f64).collect();
        if v.len() != a.len() || v.len() != rotary_dim / 2 {
            return Err(cfg_err(path, format!("longrope `{key}` must hold {} numbers (rotary dims / 2), it has {} entries", rotary_dim / 2, a.len())));
        }
        Ok(v)
    };
    let (short_factor, long_factor) = (list("short_factor")?, list("long_factor")?);
    let orig = m.get("original_max_position_embeddings").or_else(|| o.get("original_max_position_embeddings")).and_then(Value::as_u64).map(|v| v as usize);
    let orig = match orig {
        Some(0) => return Err(cfg_err(path, "`original_max_position_embeddings` must be positive")),
        Some(orig) => orig,
        None => mpe,
    };
    let factor = get_f64(o, "factor").unwrap_or(mpe as f64 / orig as f64);
    let attention_factor = match get_f64(o, "attention_factor") {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings: orig, attention_factor })
}

impl ModelConfig {
    /// RoPE inverse frequencies `[head_dim/2]` for a batch whose largest position is
    /// `max_pos` (only `dynamic` scaling depends on it), as transformers computes them (f32).
    pub fn rope_inv_freq(&self, max_pos: usize) -> Vec<f32> {
        let dim = self.rotary_dim;
        let base_inv = |base: f64| plain_inv_freq(base, dim);
        match &self.rope_scaling {
            RopeScaling::None => base_inv(self.rope_theta),
            RopeScaling::Linear { factor } => base_inv(self.rope_theta).into_iter().map(|x| x / *factor as f32).collect(),
            RopeScaling::Dynamic { factor } => {
                let seq_len = max_pos + 1;
                let mpe = self.max_position_embeddings;
                if seq_len > mpe {
                    let base = self.rope_theta
                        * ((factor * seq_len as f64 / mpe as f64) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
                    base_inv(base)
                } else {
                    base_inv(self.rope_theta)
                }
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, lf, hf, old) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original_max_position_embeddings as f32);
                let low_wl = old / lf;
                let high_wl = old / hf;
                base_inv(self.rope_theta)
                    .into_iter()
                    .map(|f| {
                        let wl = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wl > low_wl { f / factor } else { f };
                        let smooth = (old / wl - lf) / (hf - lf);
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        let medium = wl >= high_wl && wl <= low_wl;
                        if medium { smoothed } else { scaled }
                    })
                    .collect()
            }
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, .. } => {
                // transformers: 1 / (ext * base^(2i/dim)), all in f32.
                let ext = if max_pos + 1 > *original_max_position_embeddings { long_factor } else { short_factor };
                (0..dim / 2)
                    .map(|i| {
                        let e = (2 * i) as f32 / dim as f32;
                        1.0 / (ext[i] as f32 * (self.rope_theta as f32).powf(e))
                    })
                    .collect()
            }
        }
    }

    /// The factor RoPE's cos and sin are scaled by (LongRoPE's attention factor, else 1).
    pub fn rope_attention_factor(&self) -> f32 {
        match &self.rope_scaling {
            RopeScaling::LongRope { attention_factor, .. } => *attention_factor as f32,
            _ => 1.0,
        }
    }
}

/// Plain RoPE inverse frequencies `base^(-2i/dim)` (f32, as transformers computes them).
fn plain_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0 / (base as f32).powf(e)
        })
        .collect()
}

impl ModelConfig {
    /// Gemma 3's sliding layers' inverse frequencies (plain RoPE at `rope_local_theta`).
    pub fn rope_local_inv_freq(&self) -> Option<Vec<f32>> {
        self.rope_local_theta.map(|b| plain_inv_freq(b, self.rotary_dim))
    }
}
