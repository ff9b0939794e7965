//! The selftest cases: one body per op, run on the backend under test and on the oracle.

use std::time::Instant;

use super::{Event, Row};
use super::reference as r;
use crate::backend::{AdamW, Attn, Backend, Buf, CrossEntropy, DType, Gemm, HostData, IGNORE_TARGET, splitmix64};
use crate::error::Result;

/// Tolerance classes. `Mixed` is f32 on the CPU but bf16 operands on a GPU matrix product.
#[derive(Debug, Clone, Copy)]
pub enum Tol {
    Exact,
    F32,
    F32Long,
    Mixed,
    /// Like `Mixed`, but products also take computed values rounded to bf16 (the flash kernels'
    /// softmax probabilities and dS): where the device and the oracle round such a value to
    /// neighbouring bf16 numbers, each product it enters moves by up to one bf16 ulp (2^-8) of
    /// its size, and with few keys per query (small windows) nothing averages that out.
    Rounded,
    /// Outputs stored in bf16 (the `_bf16` elementwise kernels): each is rounded once, so it is
    /// within half a bf16 ulp (2^-9 of its size) of the exact value, and a device and the oracle
    /// whose f32 math differs in the last bits can round to neighbours, one ulp (2^-8) apart.
    Bf16,
}

/// What a case's run returns: named outputs, each downloaded as f64.
type Outs = Vec<Vec<f64>>;

/// The op families, in run order: each is one child process of `lora selftest`.
pub const FAMILIES: &[(&str, fn(&mut Ctx))] = &[
    ("gemm", gemm),
    ("elementwise", elementwise),
    ("embedding", embedding),
    ("rmsnorm", rmsnorm),
    ("rope", rope),
    ("attention", attention),
    ("swiglu", swiglu),
    ("geglu", geglu),
    ("cross_entropy", cross_entropy),
    ("adapters", adapters),
    ("adamw", adamw),
    ("dequant", dequant),
];

pub struct Ctx<'a, 's> {
    dev: &'a dyn Backend,
    /// The oracle backend (cuda and emu modes); `None` means float64 formulas (cpu mode).
    cpu: Option<&'a dyn Backend>,
    /// Small shapes only (the emulator runs every CUDA thread as a fiber, and compute-sanitizer
    /// slows kernels 10-100x: the real-vocabulary cross-entropy case would take minutes).
    small: bool,
    state: u64,
    pub rows: Vec<Row>,
    /// Where each row goes as soon as it is recorded (and where "starting" is announced).
    pub sink: Option<&'s mut dyn FnMut(Event<'_>)>,
    /// When the running check started.
    started: Option<Instant>,
    /// The kernels behind the results being compared (named in a failing row).
    kernels: Option<String>,
}

impl<'a, 's> Ctx<'a, 's> {
    pub fn new(dev: &'a dyn Backend, cpu: Option<&'a dyn Backend>, seed: u64) -> Self {
        // The emulator, and `LORA_SELFTEST_SMALL=1` (compute-sanitizer runs in tests/gpu/run.sh).
        let small = dev.device() == crate::backend::Device::Emu || std::env::var("LORA_SELFTEST_SMALL").is_ok_and(|v| v == "1");
        Ctx { dev, cpu, small, state: seed, rows: Vec::new(), sink: None, started: None, kernels: None }
    }

    /// Records a row (with the running check's wall time) and hands it to the sink.
    fn push(&mut self, mut row: Row) {
        if let Some(t) = self.started {
            row.secs = t.elapsed().as_secs_f64();
        }
        if let (false, Some(k)) = (row.pass, &self.kernels) {
            row.note = format!("{}; kernels: {k}", row.note);
        }
        if let Some(s) = self.sink.as_mut() {
            s(Event::Row(&row));
        }
        self.rows.push(row);
    }

    fn start(&mut self, op: &str, shape: &str) {
        self.started = Some(Instant::now());
        if let Some(s) = self.sink.as_mut() {
            s(Event::Start(&format!("{op} {shape}")));
        }
    }

    fn next(&mut self) -> u64 {
        self.state = splitmix64(self.state);
        self.state
    }

    /// Uniform in [-scale, scale), as f32.
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| ((self.next() >> 40) as f32 / 8_388_608.0 - 1.0) * scale).collect()
    }

    /// A base weight: uniform, rounded to bf16 so every backend holds exactly these values.
    fn weight(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.vec(n, scale).into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// (relative, absolute-as-fraction-of-max|ref|) for a class, by oracle.
    fn tol(&self, t: Tol) -> (f64, f64) {
        match (t, self.cpu.is_some()) {
            (Tol::Exact, _) => (0.0, 0.0),
            (Tol::F32, _) => (1e-4, 1e-5),
            (Tol::F32Long, _) | (Tol::Mixed | Tol::Rounded, false) => (1e-3, 1e-4),
            // Against the bf16-faithful oracle both sides round the same operands: what is left
            // is f32 accumulation order and the odd bf16 rounding flip of a computed value.
            (Tol::Mixed, true) => (1e-3, 1e-3),
            (Tol::Rounded, true) => (1e-3, 4e-3),
            (Tol::Bf16, _) => (1.0 / 256.0, 1e-6),
        }
    }

    /// Compares named outputs, one row each.
    pub fn record_compare(&mut self, op: &str, shape: &str, tol: Tol, got: &[Vec<f64>], want: &[Vec<f64>], names: &[&str]) {
        let (rtol, afrac) = self.tol(tol);
        for (i, name) in names.iter().enumerate() {
            let (g, w) = (&got[i], &want[i]);
            let label = if names.len() > 1 { format!("{op}.{name}") } else { op.to_string() };
            if g.len() != w.len() {
                self.push(Row::error(&label, shape, format!("{} values, expected {}", g.len(), w.len())));
                continue;
            }
            let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let atol = afrac * scale + if afrac > 0.0 { 1e-30 } else { 0.0 };
            let (mut max_abs, mut max_rel, mut pass, mut first_bad) = (0.0f64, 0.0f64, true, None);
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                let e = (a - b).abs();
                let ok = e <= atol + rtol * b.abs() && a.is_finite() == b.is_finite();
                if !ok && first_bad.is_none() {
                    first_bad = Some(format!("first mismatch at {j}: got {a:.6e}, expected {b:.6e}"));
                }
                pass &= ok;
                max_abs = max_abs.max(e);
                max_rel = max_rel.max(e / (b.abs() + atol).max(f64::MIN_POSITIVE));
            }
            self.push(Row { op: label, shape: shape.into(), max_abs, max_rel, pass, note: first_bad.unwrap_or_default(), secs: 0.0 });
        }
    }

    /// Runs `run` on the device and on the oracle (or evaluates `reference`), and compares.
    fn compare(&mut self, op: &str, shape: &str, tol: Tol, names: &[&str], run: &dyn Fn(&dyn Backend) -> Result<Outs>, reference: &dyn Fn() -> Outs) {
        self.start(op, shape);
        self.dev.take_launched();
        let got = run(self.dev);
        let launched = self.dev.take_launched();
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                self.push(Row::error(op, shape, e.to_string()));
                return;
            }
        };
        let want = match self.cpu {
            Some(cpu) => match run(cpu) {
                Ok(w) => w,
                Err(e) => {
                    self.push(Row::error(op, shape, format!("cpu oracle failed: {e}")));
                    return;
                }
            },
            None => reference(),
        };
        // A wrong result names the kernels that computed it.
        self.kernels = (!launched.is_empty()).then(|| launched.join(", "));
        self.record_compare(op, shape, tol, &got, &want, names);
        self.kernels = None;
    }

    /// Float64 backward vs central finite differences (cpu mode only: it checks the oracle).
    fn fd(&mut self, op: &str, shape: &str, analytic: &[f64], numeric: &[f64]) {
        if self.cpu.is_some() {
            return;
        }
        let scale = analytic.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        self.start(op, shape);
        let mut row = Row { op: format!("{op} (f64 vs finite diff)"), shape: shape.into(), max_abs: 0.0, max_rel: 0.0, pass: true, note: String::new(), secs: 0.0 };
        for (a, n) in analytic.iter().zip(numeric) {
            let e = (a - n).abs();
            row.max_abs = row.max_abs.max(e);
            row.max_rel = row.max_rel.max(e / (n.abs() + 1e-6 * scale + 1e-300));
            row.pass &= e <= 1e-6 * scale + 1e-5 * n.abs() + 1e-12;
        }
        self.push(row);
    }

    /// A row for a check that is pass/fail only (an expected error, a bit-exact property).
    fn flag(&mut self, op: &str, shape: &str, pass: bool, note: String) {
        self.started = None;
        self.push(Row { op: op.into(), shape: shape.into(), max_abs: 0.0, max_rel: 0.0, pass, note, secs: 0.0 });
    }
}

fn up(b: &dyn Backend, x: &[f32]) -> Result<Buf> {
    b.upload(HostData::F32(x), DType::F32)
}
fn up_w(b: &dyn Backend, x: &[f32]) -> Result<Buf> {
    b.upload(HostData::F32(x), b.base_weight_dtype(DType::BF16))
}
fn up_u(b: &dyn Backend, x: &[u32]) -> Result<Buf> {
    b.upload(HostData::U32(x), DType::U32)
}
fn down(b: &dyn Backend, x: &Buf) -> Result<Vec<f64>> {
    Ok(b.download_f32(x)?.into_iter().map(f64::from).collect())
}
fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}
fn zeros(b: &dyn Backend, n: usize) -> Result<Buf> {
    b.zeros(n, DType::F32)
}

/// Quantized base weights dequantized on the device vs the CPU twin (or the host decoder):
/// bit for bit, for both code books, with and without double quant, 8-bit, and each rounding.
fn dequant(c: &mut Ctx) {
    use crate::quant::{Quant4, Quant8, QuantTensor, QuantType};
    let (rows, cols) = (37, 96); // 3552 values: a partial last block of 64, 56 blocks (one nested block)
    let w = c.weight(rows * cols, 0.05);
    let mut cases: Vec<(String, QuantTensor)> = Vec::new();
    for t in [QuantType::Nf4, QuantType::Fp4] {
        for dq in [false, true] {
            match Quant4::quantize(&w, &[rows, cols], t, 64, dq) {
                Ok(q) => cases.push((format!("{}{}", t.name(), if dq { "+dq" } else { "" }), QuantTensor::Four(q))),
                Err(e) => c.flag("dequantize", t.name(), false, e.to_string()),
            }
        }
    }
    match Quant8::quantize(&w, &[rows, cols]) {
        Ok(q) => cases.push(("int8".into(), QuantTensor::Eight(q))),
        Err(e) => c.flag("dequantize", "int8", false, e.to_string()),
    }
    for (name, q) in &cases {
        for round in [DType::F32, DType::BF16, DType::F16] {
            let shape = format!("{rows}x{cols} {name} -> {}", round.torch_name());
            c.compare("dequantize", &shape, Tol::Exact, &["w"], &|be| {
                let dev = q.upload(be)?;
                let mut out = be.zeros(rows * cols, be.dequant_dtype(round))?;
                be.dequantize(&dev, round, &mut out)?;
                Ok(vec![down(be, &out)?])
            }, &|| vec![f64s(&q.dequantize(round))]);
        }
    }
}

fn gemm(c: &mut Ctx) {
    for &(m, n, k, ta, tb, acc, weight) in &[
        (7, 13, 19, false, true, false, true),
        (33, 5, 64, false, true, true, true),
        (16, 24, 40, true, false, false, false),
        (9, 17, 31, true, true, true, false),
        (1, 257, 3, false, false, false, false),
        (64, 96, 128, false, false, false, true),
    ] {
        let a = c.vec(m * k, 1.0);
        let b = if weight { c.weight(k * n, 0.5) } else { c.vec(k * n, 0.5) };
        let c0 = c.vec(m * n, 1.0);
        let alpha = 0.75f32;
        let g = Gemm { m, n, k, ta, tb, alpha, accumulate: acc };
        let shape = format!("m{m} n{n} k{k} ta{} tb{}{}", ta as u8, tb as u8, if acc { " +=" } else { "" });
        let op = if weight { "gemm (f32 x base weight)" } else { "gemm (f32 x f32)" };
        let tol = if weight { Tol::Mixed } else { Tol::F32Long };
        c.compare(op, &shape, tol, &["c"], &|be| {
            let (ab, bb) = (up(be, &a)?, if weight { up_w(be, &b)? } else { up(be, &b)? });
            let mut cb = up(be, &c0)?;
            be.gemm(g, &ab, &bb, &mut cb)?;
            Ok(vec![down(be, &cb)?])
        }, &|| vec![r::gemm(m, n, k, ta, tb, f64::from(alpha), &f64s(&a), &f64s(&b), acc.then(|| f64s(&c0)).as_deref())]);
    }
}

fn elementwise(c: &mut Ctx) {
    copy_cols(c);
    expert_rows(c);
    let n = 1001;
    let (x, y) = (c.vec(n, 2.0), c.vec(n, 2.0));
    c.compare("axpy", &format!("n{n}"), Tol::F32, &["y"], &|be| {
        let (xb, mut yb) = (up(be, &x)?, up(be, &y)?);
        be.axpy(-1.5, &xb, &mut yb)?;
        Ok(vec![down(be, &yb)?])
    }, &|| vec![x.iter().zip(&y).map(|(&a, &b)| f64::from(b) - 1.5 * f64::from(a)).collect()]);
    c.compare("scale", &format!("n{n}"), Tol::F32, &["y"], &|be| {
        let mut yb = up(be, &y)?;
        be.scale(0.3, &mut yb)?;
        Ok(vec![down(be, &yb)?])
    }, &|| vec![y.iter().map(|&b| 0.3 * f64::from(b)).collect()]);
    let bpos: Vec<f32> = c.vec(n, 1.0).iter().map(|v| v.abs() + 0.5).collect();
    c.compare("div", &format!("n{n}"), Tol::F32, &["out"], &|be| {
        let (ab, bb, mut ob) = (up(be, &x)?, up(be, &bpos)?, zeros(be, n)?);
        be.div(&ab, &bb, &mut ob)?;
        Ok(vec![down(be, &ob)?])
    }, &|| vec![x.iter().zip(&bpos).map(|(&a, &b)| f64::from(a) / f64::from(b)).collect()]);
    let (rows, cols) = (129, 37);
    let (a, b2, bias, s) = (c.vec(rows * cols, 1.0), c.vec(rows * cols, 1.0), c.weight(cols, 1.0), c.vec(cols, 2.0));
    let out0 = c.vec(rows * cols, 1.0);
    let shape = format!("rows{rows} cols{cols}");
    c.compare("add_bias", &shape, Tol::F32, &["y"], &|be| {
        let (bb, mut yb) = (up_w(be, &bias)?, up(be, &a)?);
        be.add_bias(&bb, &mut yb, rows, cols)?;
        Ok(vec![down(be, &yb)?])
    }, &|| vec![(0..rows * cols).map(|i| f64::from(a[i]) + f64::from(bias[i % cols])).collect()]);
    for acc in [false, true] {
        c.compare("scale_cols", &format!("{shape}{}", if acc { " +=" } else { "" }), Tol::F32, &["out"], &|be| {
            let (xb, sb, mut ob) = (up(be, &a)?, up(be, &s)?, up(be, &out0)?);
            be.scale_cols(&xb, &sb, &mut ob, rows, cols, acc)?;
            Ok(vec![down(be, &ob)?])
        }, &|| vec![(0..rows * cols).map(|i| f64::from(a[i]) * f64::from(s[i % cols]) + if acc { f64::from(out0[i]) } else { 0.0 }).collect()]);
        c.compare("col_dot", &format!("{shape}{}", if acc { " +=" } else { "" }), Tol::F32Long, &["out"], &|be| {
            let (ab, bb, mut ob) = (up(be, &a)?, up(be, &b2)?, up(be, &s)?);
            be.col_dot(&ab, &bb, &mut ob, rows, cols, acc)?;
            Ok(vec![down(be, &ob)?])
        }, &|| vec![(0..cols).map(|j| (0..rows).map(|i| f64::from(a[i * cols + j]) * f64::from(b2[i * cols + j])).sum::<f64>() + if acc { f64::from(s[j]) } else { 0.0 }).collect()]);
    }
    let parts = [c.vec(3, 1.0), c.vec(70_001, 1.0), c.vec(1025, 3.0)];
    c.compare("sum_squares", "3 bufs: 3, 70001, 1025", Tol::F32, &["sum"], &|be| {
        let bufs = parts.iter().map(|p| up(be, p)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Buf> = bufs.iter().collect();
        Ok(vec![vec![be.sum_squares(&refs)?]])
    }, &|| vec![vec![parts.iter().flatten().map(|&v| f64::from(v) * f64::from(v)).sum()]]);
    // Conversions: a bf16-exact weight survives upload in the base dtype and copy back to f32.
    let w = c.weight(517, 3.0);
    c.compare("copy (base dtype -> f32)", "n517", Tol::Exact, &["dst"], &|be| {
        let (src, mut dst) = (up_w(be, &w)?, zeros(be, w.len())?);
        be.copy(&src, &mut dst)?;
        Ok(vec![down(be, &dst)?])
    }, &|| vec![f64s(&w)]);
    c.compare("fill", "n517", Tol::Exact, &["buf"], &|be| {
        let mut b = zeros(be, 517)?;
        be.fill(&mut b, -2.5)?;
        Ok(vec![down(be, &b)?])
    }, &|| vec![vec![-2.5; 517]]);
}

fn embedding(c: &mut Ctx) {
    let (vocab, dim, tokens) = (50, 24, 17);
    let table = c.weight(vocab * dim, 1.0);
    let ids: Vec<u32> = (0..tokens).map(|_| c.below(vocab as u64) as u32).collect();
    for scale in [1.0f32, 2.5] {
        c.compare("embedding", &format!("t{tokens} v{vocab} d{dim} x{scale}"), Tol::Exact, &["out"], &|be| {
            let (ib, tb, mut ob) = (up_u(be, &ids)?, up_w(be, &table)?, zeros(be, tokens * dim)?);
            be.embedding(&ib, &tb, &mut ob, tokens, dim, scale)?;
            Ok(vec![down(be, &ob)?])
        }, &|| vec![ids.iter().flat_map(|&i| table[i as usize * dim..][..dim].iter().map(|&v| f64::from(v) * f64::from(scale))).collect()]);
    }
    let mut bad = ids.clone();
    bad[11] = vocab as u32 + 3;
    let result = (|| {
        let be = c.dev;
        let (ib, tb, mut ob) = (up_u(be, &bad)?, up_w(be, &table)?, zeros(be, tokens * dim)?);
        be.embedding(&ib, &tb, &mut ob, tokens, dim, 1.0)
    })();
    let (pass, note) = match result {
        Err(e) if e.to_string().contains("11") => (true, String::new()),
        Err(e) => (false, format!("error does not name position 11: {e}")),
        Ok(()) => (false, "an id beyond the vocabulary was accepted".into()),
    };
    c.flag("embedding (id >= vocab is an error)", &format!("t{tokens} v{vocab}"), pass, note);
}

fn rmsnorm(c: &mut Ctx) {
    let eps = 1e-6f32;
    for &(rows, dim) in &[(7, 96), (3, 1001), (33, 64)] {
        let (x, w, dy, dx0) = (c.vec(rows * dim, 2.0), c.weight(dim, 1.5), c.vec(rows * dim, 1.0), c.vec(rows * dim, 1.0));
        let shape = format!("rows{rows} dim{dim}");
        c.compare("rmsnorm_fwd", &shape, Tol::F32, &["y", "rstd"], &|be| {
            let (xb, wb, mut yb, mut rb) = (up(be, &x)?, up_w(be, &w)?, zeros(be, rows * dim)?, zeros(be, rows)?);
            be.rmsnorm_fwd(&xb, &wb, &mut yb, &mut rb, rows, dim, eps)?;
            Ok(vec![down(be, &yb)?, down(be, &rb)?])
        }, &|| {
            let (y, rs) = r::rmsnorm_fwd(&f64s(&x), &f64s(&w), rows, dim, f64::from(eps));
            vec![y, rs]
        });
        for acc in [false, true] {
            c.compare("rmsnorm_bwd", &format!("{shape}{}", if acc { " +=" } else { "" }), Tol::F32, &["dx"], &|be| {
                let (xb, wb, mut yb, mut rb) = (up(be, &x)?, up_w(be, &w)?, zeros(be, rows * dim)?, zeros(be, rows)?);
                be.rmsnorm_fwd(&xb, &wb, &mut yb, &mut rb, rows, dim, eps)?;
                let (dyb, mut dxb) = (up(be, &dy)?, up(be, &dx0)?);
                be.rmsnorm_bwd(&dyb, &xb, &wb, &rb, &mut dxb, rows, dim, acc)?;
                Ok(vec![down(be, &dxb)?])
            }, &|| {
                let dx = r::rmsnorm_bwd(&f64s(&dy), &f64s(&x), &f64s(&w), rows, dim, f64::from(eps));
                vec![dx.iter().zip(&dx0).map(|(a, &b)| a + if acc { f64::from(b) } else { 0.0 }).collect()]
            });
        }
        if c.cpu.is_none() {
            let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
            let coords: Vec<usize> = (0..6).map(|_| c.below((rows * dim) as u64) as usize).collect();
            let analytic = r::rmsnorm_bwd(&dyd, &xd, &wd, rows, dim, f64::from(eps));
            let numeric = r::finite_diff(&xd, &coords, |xx| r::rmsnorm_fwd(xx, &wd, rows, dim, f64::from(eps)).0.iter().zip(&dyd).map(|(a, b)| a * b).sum());
            c.fd("rmsnorm_bwd", &shape, &coords.iter().map(|&i| analytic[i]).collect::<Vec<_>>(), &numeric);
        }
    }
}

/// The engine's `inv_freq` table for every RoPE scaling type it supports (scaling is folded
/// into inv_freq, so the kernel is the same for all): none, linear, dynamic NTK (past the
/// trained length) and Llama 3.
fn inv_freqs(hd: usize, max_pos: usize) -> Vec<(&'static str, Vec<f32>)> {
    use crate::config::{ModelConfig, RopeScaling};
    let mut cfg = ModelConfig::tiny_llama(16);
    cfg.head_dim = hd;
    cfg.rotary_dim = hd;
    cfg.rope_theta = 500_000.0;
    cfg.max_position_embeddings = 1024;
    let kinds = [
        ("none", RopeScaling::None),
        ("linear", RopeScaling::Linear { factor: 4.0 }),
        ("dynamic", RopeScaling::Dynamic { factor: 2.0 }),
        ("llama3", RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 }),
    ];
    kinds
        .into_iter()
        .map(|(name, s)| {
            cfg.rope_scaling = s;
            (name, cfg.rope_inv_freq(max_pos))
        })
        .collect()
}

/// A column block of a row-major matrix into another's (fused projections' split and join):
/// columns outside the block keep their values.
fn copy_cols(c: &mut Ctx) {
    for &(rows, src_cols, src_col, dst_cols, dst_col, width) in &[(7usize, 40usize, 24usize, 8usize, 0usize, 8usize), (300, 12, 0, 36, 12, 12)] {
        let (src, dst) = (c.vec(rows * src_cols, 1.0), c.vec(rows * dst_cols, 1.0));
        let shape = format!("rows {rows}: {width} of {src_cols} at {src_col} -> {dst_cols} at {dst_col}");
        c.compare("copy_cols", &shape, Tol::F32, &["dst"], &|be| {
            let (sb, mut db) = (up(be, &src)?, up(be, &dst)?);
            be.copy_cols(&sb, src_cols, src_col, &mut db, dst_cols, dst_col, rows, width)?;
            Ok(vec![down(be, &db)?])
        }, &|| {
            let mut want = f64s(&dst);
            for r in 0..rows {
                for j in 0..width {
                    want[r * dst_cols + dst_col + j] = f64::from(src[r * src_cols + src_col + j]);
                }
            }
            vec![want]
        });
    }
}

/// Qwen3-MoE's expert dispatch: rows gathered (scaled or not), scattered back with weights into
/// an existing buffer (rows outside the index keep their values), and per-row dot products.
fn expert_rows(c: &mut Ctx) {
    for &(n, rows, dim) in &[(9usize, 4usize, 8usize), (600, 211, 96)] {
        // Distinct rows in a shuffled order (an expert's tokens are distinct, ascending here they need not be).
        let ids: Vec<u32> = (0..rows).map(|i| ((i * 7919 + 3) % n) as u32).collect();
        let mut seen = ids.clone();
        seen.sort_unstable();
        seen.dedup();
        debug_assert_eq!(seen.len(), rows, "selftest: the expert_rows indices must be distinct");
        let (src, w, big) = (c.vec(n * dim, 1.0), c.vec(rows, 1.0), c.vec(n * dim, 1.0));
        let small = c.vec(rows * dim, 1.0);
        let shape = format!("{rows} of {n} rows of {dim}");
        for scaled in [false, true] {
            let name = if scaled { "gather_rows (scaled)" } else { "gather_rows" };
            c.compare(name, &shape, Tol::F32, &["dst"], &|be| {
                let (s, i, k) = (up(be, &src)?, up_u(be, &ids)?, up(be, &w)?);
                let mut d = be.zeros(rows * dim, DType::F32)?;
                be.gather_rows(&s, &i, scaled.then_some(&k), &mut d, rows, dim)?;
                Ok(vec![down(be, &d)?])
            }, &|| {
                let mut want = vec![0f64; rows * dim];
                for (r, &id) in ids.iter().enumerate() {
                    for j in 0..dim {
                        want[r * dim + j] = f64::from(src[id as usize * dim + j]) * if scaled { f64::from(w[r]) } else { 1.0 };
                    }
                }
                vec![want]
            });
        }
        c.compare("scatter_add_rows", &shape, Tol::F32, &["dst"], &|be| {
            let (s, i, k) = (up(be, &small)?, up_u(be, &ids)?, up(be, &w)?);
            let mut d = up(be, &big)?;
            be.scatter_add_rows(&s, &i, Some(&k), &mut d, rows, dim)?;
            Ok(vec![down(be, &d)?])
        }, &|| {
            let mut want = f64s(&big);
            for (r, &id) in ids.iter().enumerate() {
                for j in 0..dim {
                    want[id as usize * dim + j] += f64::from(small[r * dim + j]) * f64::from(w[r]);
                }
            }
            vec![want]
        });
        let other = c.vec(rows * dim, 1.0);
        c.compare("row_dot", &shape, Tol::F32, &["out"], &|be| {
            let (a, b) = (up(be, &small)?, up(be, &other)?);
            let mut o = be.zeros(rows, DType::F32)?;
            be.row_dot(&a, &b, &mut o, rows, dim)?;
            Ok(vec![down(be, &o)?])
        }, &|| vec![(0..rows).map(|r| (0..dim).map(|j| f64::from(small[r * dim + j]) * f64::from(other[r * dim + j])).sum()).collect()]);
    }
}

fn rope(c: &mut Ctx) {
    for &(docs, heads, hd) in &[(&[5usize, 6][..], 3usize, 16usize), (&[40, 2000, 1][..], 2, 128)] {
        let t: usize = docs.iter().sum();
        let pos: Vec<u32> = docs.iter().flat_map(|&n| 0..n as u32).collect();
        let x = c.vec(t * heads * hd, 1.0);
        for (kind, inv) in inv_freqs(hd, t) {
            for inverse in [false, true] {
                let shape = format!("t{t} h{heads} hd{hd} {kind}");
                let op = if inverse { "rope (inverse)" } else { "rope" };
                c.compare(op, &shape, Tol::F32, &["x"], &|be| {
                    let (mut xb, pb, fb) = (up(be, &x)?, up_u(be, &pos)?, up(be, &inv)?);
                    be.rope(&mut xb, &pb, &fb, t, heads, hd, inverse)?;
                    Ok(vec![down(be, &xb)?])
                }, &|| vec![r::rope(&f64s(&x), &pos, &inv, t, heads, hd, inverse)]);
            }
        }
        // Partial rotary (Phi-4-mini: 3/4 of each head) with a LongRoPE attention factor.
        let rd = hd * 3 / 4;
        let inv: Vec<f32> = inv_freqs(rd, t).remove(0).1;
        for inverse in [false, true] {
            let shape = format!("t{t} h{heads} hd{hd} rotary {rd} x1.19");
            let op = if inverse { "rope partial (inverse)" } else { "rope partial" };
            c.compare(op, &shape, Tol::F32, &["x"], &|be| {
                let (mut xb, pb, fb) = (up(be, &x)?, up_u(be, &pos)?, up(be, &inv)?);
                be.rope_partial(&mut xb, &pb, &fb, t, heads, hd, rd, 1.19, inverse)?;
                Ok(vec![down(be, &xb)?])
            }, &|| vec![r::rope_partial(&f64s(&x), &pos, &inv, t, heads, hd, rd, 1.19, inverse)]);
        }
    }
}

fn attention(c: &mut Ctx) {
    // The last number is the sliding window (0: none). Head dims 64, 128 and 256 run on the CUDA
    // backend's flash kernels (tiles of 64 queries and 64 or 32 keys): documents of length 1 and
    // across tile edges, GQA ratios 1, 2 and 6, windows that cut documents at both tile sizes
    // (and 40 > 33 leaves one whole); other head dims on attention.cu.
    for &(docs, h, hkv, hd, scale, window) in &[
        (&[5usize, 17, 1, 9][..], 4usize, 2usize, 8usize, None, 0usize),
        (&[33, 40][..], 6, 1, 64, None, 0),
        (&[70][..], 3, 3, 128, Some(0.07f32), 0),
        (&[37, 3][..], 2, 1, 256, None, 0),
        (&[5, 17, 1, 9][..], 4, 2, 8, None, 6),
        (&[33, 75][..], 2, 1, 64, None, 40),
        (&[1, 70, 9][..], 4, 2, 64, None, 0),
        (&[50, 1, 29][..], 2, 2, 256, None, 0),
        (&[1, 80, 5][..], 6, 1, 64, None, 7),
        (&[45, 1, 30][..], 4, 2, 128, None, 16),
        (&[40, 31][..], 2, 1, 256, None, 5),
    ] {
        let t: usize = docs.iter().sum();
        let mut cu = vec![0u32];
        for &n in docs {
            cu.push(cu.last().unwrap() + n as u32);
        }
        let a = Attn { tokens: t, n_docs: docs.len(), max_seqlen: *docs.iter().max().unwrap(), n_heads: h, n_kv_heads: hkv, head_dim: hd, scale: scale.unwrap_or(1.0 / (hd as f32).sqrt()), window };
        let (q, k, v, dout) = (c.vec(t * h * hd, 1.0), c.vec(t * hkv * hd, 1.0), c.vec(t * hkv * hd, 1.0), c.vec(t * h * hd, 1.0));
        let shape = if window > 0 { format!("docs{docs:?} h{h}/{hkv} hd{hd} window{window}") } else { format!("docs{docs:?} h{h}/{hkv} hd{hd}") };
        let fwd = |be: &dyn Backend| -> Result<(Buf, Buf, Buf, Buf, Buf, Buf)> {
            let (qb, kb, vb, cb) = (up(be, &q)?, up(be, &k)?, up(be, &v)?, up_u(be, &cu)?);
            let (mut ob, mut lb) = (zeros(be, t * h * hd)?, zeros(be, h * t)?);
            be.attention_fwd(a, &qb, &kb, &vb, &cb, &mut ob, &mut lb)?;
            Ok((qb, kb, vb, cb, ob, lb))
        };
        // The flash kernels multiply bf16 operands (the oracle rounds the same ones), some of
        // them computed (p, dS): Rounded.
        let tol = if crate::cpu::FLASH_HEAD_DIMS.contains(&hd) { Tol::Rounded } else { Tol::F32Long };
        c.compare("attention_fwd", &shape, tol, &["out", "lse"], &|be| {
            let (_, _, _, _, ob, lb) = fwd(be)?;
            Ok(vec![down(be, &ob)?, down(be, &lb)?])
        }, &|| {
            let (o, l) = r::attention_fwd(&a, &f64s(&q), &f64s(&k), &f64s(&v), &cu);
            vec![o, l]
        });
        c.compare("attention_bwd", &shape, tol, &["dq", "dk", "dv"], &|be| {
            let (qb, kb, vb, cb, ob, lb) = fwd(be)?;
            let db = up(be, &dout)?;
            let (mut dq, mut dk, mut dv) = (zeros(be, t * h * hd)?, zeros(be, t * hkv * hd)?, zeros(be, t * hkv * hd)?);
            be.attention_bwd(a, &qb, &kb, &vb, &cb, &ob, &lb, &db, &mut dq, &mut dk, &mut dv)?;
            Ok(vec![down(be, &dq)?, down(be, &dk)?, down(be, &dv)?])
        }, &|| {
            let (dq, dk, dv) = r::attention_bwd(&a, &f64s(&q), &f64s(&k), &f64s(&v), &cu, &f64s(&dout));
            vec![dq, dk, dv]
        });
        if hd <= 64 && c.cpu.is_none() {
            let (qd, kd, vd, dd) = (f64s(&q), f64s(&k), f64s(&v), f64s(&dout));
            let (dq, dk, dv) = r::attention_bwd(&a, &qd, &kd, &vd, &cu, &dd);
            let loss = |qq: &[f64], kk: &[f64], vv: &[f64]| r::attention_fwd(&a, qq, kk, vv, &cu).0.iter().zip(&dd).map(|(x, y)| x * y).sum::<f64>();
            let cq: Vec<usize> = (0..5).map(|_| c.below(qd.len() as u64) as usize).collect();
            let ck: Vec<usize> = (0..5).map(|_| c.below(kd.len() as u64) as usize).collect();
            let nq = r::finite_diff(&qd, &cq, |x| loss(x, &kd, &vd));
            let nk = r::finite_diff(&kd, &ck, |x| loss(&qd, x, &vd));
            let nv = r::finite_diff(&vd, &ck, |x| loss(&qd, &kd, x));
            let pick = |g: &[f64], cs: &[usize]| cs.iter().map(|&i| g[i]).collect::<Vec<_>>();
            c.fd("attention_bwd.dq", &shape, &pick(&dq, &cq), &nq);
            c.fd("attention_bwd.dk", &shape, &pick(&dk, &ck), &nk);
            c.fd("attention_bwd.dv", &shape, &pick(&dv, &ck), &nv);
        }
    }
}

fn swiglu(c: &mut Ctx) {
    gated(c, &Glu {
        name: "swiglu",
        fwd: |be, g, u, h| be.swiglu_fwd(g, u, h),
        bwd: |be, g, u, dh, dg, du| be.swiglu_bwd(g, u, dh, dg, du),
        reference_fwd: r::swiglu_fwd,
        reference_bwd: r::swiglu_bwd,
    });
}

/// Gemma 3's GeGLU (`gelu_pytorch_tanh(gate) * up`), the same check as [`swiglu`].
fn geglu(c: &mut Ctx) {
    gated(c, &Glu {
        name: "geglu",
        fwd: |be, g, u, h| be.geglu_fwd(g, u, h),
        bwd: |be, g, u, dh, dg, du| be.geglu_bwd(g, u, dh, dg, du),
        reference_fwd: r::geglu_fwd,
        reference_bwd: r::geglu_bwd,
    });
}

/// One gated MLP activation: its backend ops and their float64 formulas.
struct Glu {
    name: &'static str,
    fwd: fn(&dyn Backend, &Buf, &Buf, &mut Buf) -> Result<()>,
    bwd: fn(&dyn Backend, &Buf, &Buf, &Buf, &mut Buf, &mut Buf) -> Result<()>,
    reference_fwd: fn(&[f64], &[f64]) -> Vec<f64>,
    reference_bwd: fn(&[f64], &[f64], &[f64]) -> (Vec<f64>, Vec<f64>),
}

/// Forward and backward against the formulas, and on the CPU the backward formula against
/// finite differences of the forward one.
fn gated(c: &mut Ctx, glu: &Glu) {
    let n = 1001;
    let name = glu.name;
    let (g, u, dh) = (c.vec(n, 6.0), c.vec(n, 2.0), c.vec(n, 1.0));
    c.compare(&format!("{name}_fwd"), &format!("n{n}"), Tol::F32, &["h"], &|be| {
        let (gb, ub, mut hb) = (up(be, &g)?, up(be, &u)?, zeros(be, n)?);
        (glu.fwd)(be, &gb, &ub, &mut hb)?;
        Ok(vec![down(be, &hb)?])
    }, &|| vec![(glu.reference_fwd)(&f64s(&g), &f64s(&u))]);
    c.compare(&format!("{name}_bwd"), &format!("n{n}"), Tol::F32, &["dgate", "dup"], &|be| {
        let (gb, ub, db) = (up(be, &g)?, up(be, &u)?, up(be, &dh)?);
        let (mut dg, mut du) = (zeros(be, n)?, zeros(be, n)?);
        (glu.bwd)(be, &gb, &ub, &db, &mut dg, &mut du)?;
        Ok(vec![down(be, &dg)?, down(be, &du)?])
    }, &|| {
        let (a, b) = (glu.reference_bwd)(&f64s(&g), &f64s(&u), &f64s(&dh));
        vec![a, b]
    });
    if c.cpu.is_none() {
        let (gd, ud, dd) = (f64s(&g), f64s(&u), f64s(&dh));
        let (dg, du) = (glu.reference_bwd)(&gd, &ud, &dd);
        let cs: Vec<usize> = (0..6).map(|_| c.below(n as u64) as usize).collect();
        let loss = |gg: &[f64], uu: &[f64]| (glu.reference_fwd)(gg, uu).iter().zip(&dd).map(|(a, b)| a * b).sum::<f64>();
        let ng = r::finite_diff(&gd, &cs, |x| loss(x, &ud));
        let nu = r::finite_diff(&ud, &cs, |x| loss(&gd, x));
        c.fd(&format!("{name}_bwd.dgate"), &format!("n{n}"), &cs.iter().map(|&i| dg[i]).collect::<Vec<_>>(), &ng);
        c.fd(&format!("{name}_bwd.dup"), &format!("n{n}"), &cs.iter().map(|&i| du[i]).collect::<Vec<_>>(), &nu);
    }
    // bf16 activations (the `_bf16` kernels on CUDA, 16-byte packs and a tail: n = 1001 = 125 * 8
    // + 1; the plain CPU computes them in f32) on inputs that are bf16 values already.
    let rb = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
    let (g, u, dh) = (rb(&g), rb(&u), rb(&dh));
    let up16 = |be: &dyn Backend, x: &[f32]| be.upload(HostData::F32(x), DType::BF16);
    let shape = format!("n{n} bf16");
    c.compare(&format!("{name}_fwd"), &shape, Tol::Bf16, &["h"], &|be| {
        let (gb, ub, mut hb) = (up16(be, &g)?, up16(be, &u)?, be.alloc(n, DType::BF16)?);
        (glu.fwd)(be, &gb, &ub, &mut hb)?;
        Ok(vec![down(be, &hb)?])
    }, &|| vec![(glu.reference_fwd)(&f64s(&g), &f64s(&u))]);
    c.compare(&format!("{name}_bwd"), &shape, Tol::Bf16, &["dgate", "dup"], &|be| {
        let (gb, ub, db) = (up16(be, &g)?, up16(be, &u)?, up16(be, &dh)?);
        let (mut dg, mut du) = (be.alloc(n, DType::BF16)?, be.alloc(n, DType::BF16)?);
        (glu.bwd)(be, &gb, &ub, &db, &mut dg, &mut du)?;
        Ok(vec![down(be, &dg)?, down(be, &du)?])
    }, &|| {
        let (a, b) = (glu.reference_bwd)(&f64s(&g), &f64s(&u), &f64s(&dh));
        vec![a, b]
    });
}

fn cross_entropy(c: &mut Ctx) {
    // On a GPU also the real Qwen vocabulary with enough rows to need two logits chunks (the
    // float64 oracle would take minutes for it on a CPU, so the cpu mode keeps to small shapes).
    let mut shapes = vec![(13usize, 32usize, 97usize, 1.0f32), (6, 48, 300, 0.5)];
    if c.cpu.is_some() && !c.small {
        shapes.push((600, 64, 151_936, 1.0));
    }
    for &(t, d, v, logit_scale) in &shapes {
        let hidden = c.vec(t * d, 1.0);
        let w = c.weight(v * d, 0.3);
        let mut targets: Vec<u32> = (0..t).map(|_| c.below(v as u64) as u32).collect();
        targets[1] = IGNORE_TARGET;
        targets[t - 1] = IGNORE_TARGET;
        let ce = CrossEntropy { tokens: t, dim: d, vocab: v, logit_scale, grad_scale: 1.0 / (t as f32 - 2.0) };
        let shape = format!("t{t} d{d} v{v} s{logit_scale}");
        c.compare("linear_cross_entropy", &shape, Tol::Mixed, &["loss", "dhidden"], &|be| {
            let (hb, wb, tb, mut dh) = (up(be, &hidden)?, up_w(be, &w)?, up_u(be, &targets)?, zeros(be, t * d)?);
            let loss = be.linear_cross_entropy(ce, &hb, &wb, &tb, Some(&mut dh))?;
            let loss_only = be.linear_cross_entropy(ce, &hb, &wb, &tb, None)?;
            if loss_only != loss {
                return Err(crate::error::EngineError::Backend { backend: be.name(), op: "linear_cross_entropy", msg: format!("loss {loss_only} without dhidden differs from {loss} with it") });
            }
            Ok(vec![vec![loss], down(be, &dh)?])
        }, &|| {
            let (l, dh) = r::linear_cross_entropy(&ce, &f64s(&hidden), &f64s(&w), &targets);
            vec![vec![l], dh]
        });
        if c.cpu.is_none() {
            let (hd, wd) = (f64s(&hidden), f64s(&w));
            let (_, dh) = r::linear_cross_entropy(&ce, &hd, &wd, &targets);
            let cs: Vec<usize> = (0..6).map(|_| c.below((t * d) as u64) as usize).collect();
            let numeric = r::finite_diff(&hd, &cs, |x| f64::from(ce.grad_scale) * r::linear_cross_entropy(&ce, x, &wd, &targets).0);
            c.fd("linear_cross_entropy.dhidden", &shape, &cs.iter().map(|&i| dh[i]).collect::<Vec<_>>(), &numeric);
        }
    }
}

fn adapters(c: &mut Ctx) {
    let n = 4099;
    let x = c.vec(n, 1.0);
    for p in [0.1f32, 0.5] {
        let seed = c.next();
        c.compare("dropout", &format!("n{n} p{p}"), Tol::F32, &["out"], &|be| {
            let (xb, mut ob) = (up(be, &x)?, zeros(be, n)?);
            be.dropout(&xb, &mut ob, p, seed)?;
            Ok(vec![down(be, &ob)?])
        }, &|| vec![r::dropout(&f64s(&x), p, seed)]);
    }
    for &(out_f, in_f, rank) in &[(19usize, 33usize, 4usize), (64, 200, 16)] {
        let (w, a, b) = (c.weight(out_f * in_f, 1.0), c.vec(rank * in_f, 0.5), c.vec(out_f * rank, 0.5));
        let scale = 2.0f32;
        c.compare("dora_weight_norm", &format!("out{out_f} in{in_f} r{rank}"), Tol::F32, &["norm"], &|be| {
            let (wb, ab, bb, mut nb) = (up_w(be, &w)?, up(be, &a)?, up(be, &b)?, zeros(be, out_f)?);
            be.dora_weight_norm(&wb, &ab, &bb, scale, &mut nb, out_f, in_f, rank)?;
            Ok(vec![down(be, &nb)?])
        }, &|| vec![r::dora_weight_norm(&f64s(&w), &f64s(&a), &f64s(&b), f64::from(scale), out_f, in_f, rank)]);
    }
}

fn adamw(c: &mut Ctx) {
    let n = 1001;
    let (p, g) = (c.vec(n, 1.0), c.vec(n, 0.1));
    let m: Vec<f32> = c.vec(n, 0.01);
    let v: Vec<f32> = c.vec(n, 1e-3).iter().map(|x| x.abs()).collect();
    for step in [1u64, 7] {
        let o = AdamW { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 0.5 };
        c.compare("adamw", &format!("n{n} step{step}"), Tol::F32, &["param", "m", "v"], &|be| {
            let (mut pb, gb, mut mb, mut vb) = (up(be, &p)?, up(be, &g)?, up(be, &m)?, up(be, &v)?);
            be.adamw(o, &mut pb, &gb, &mut mb, &mut vb)?;
            Ok(vec![down(be, &pb)?, down(be, &mb)?, down(be, &vb)?])
        }, &|| {
            let (a, b, cc) = r::adamw(&o, &f64s(&p), &f64s(&g), &f64s(&m), &f64s(&v));
            vec![a, b, cc]
        });
    }
}
