//! The matrix product the CUDA backend asks cuBLASLt for, as plain data: a [`MatmulPlan`] holds
//! exactly the descriptor values the real path sets (transposes, the three matrix layouts with
//! their leading dimensions and batch strides, alpha/beta, data types, compute type, epilogue).
//! `driver.rs` builds its cuBLASLt descriptors from these values and nothing else, and the
//! emulated device runs [`reference`], which interprets the same values the way cuBLASLt
//! documents them, so a wrong transpose, leading dimension or stride fails on the CPU.
//!
//! cuBLASLt is column-major: element `(i, j)` of a matrix with leading dimension `ld` lives at
//! `i + j * ld`, and batch `b` starts `b * batch_stride` elements after the first.
//! `D = alpha * op(A) @ op(B) + beta * C`, `op(X) = X^T` when the transpose is set; here D = C
//! (in place, one layout).
//!
//! The backend's products are row-major (`c[m,n] = alpha * op(a) @ op(b) + beta * c`), computed
//! as their transpose `c^T[n,m] = op(b)^T @ op(a)^T`: cuBLAS "A" is our `b`, cuBLAS "B" our `a`
//! ([`MatmulPlan::row_major`]).

use crate::backend::Gemm;

/// Element type of a matrix (`cudaDataType_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `CUDA_R_16BF`
    Bf16,
    /// `CUDA_R_32F`
    F32,
}

impl DataType {
    pub fn size(self) -> usize {
        match self {
            DataType::Bf16 => 2,
            DataType::F32 => 4,
        }
    }
}

/// `CUBLASLT_MATMUL_DESC_EPILOGUE`. The backend uses only the default (no bias, no activation);
/// a new epilogue gets its variant here, its descriptor attribute in `driver.rs` and its meaning
/// in [`reference`] together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `CUBLASLT_EPILOGUE_DEFAULT`
    Default,
}

/// One `cublasLtMatrixLayout_t`: type, rows, cols, leading dimension, and the batch attributes
/// (`CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT`, `..._STRIDED_BATCH_OFFSET`, in elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    pub dtype: DataType,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub batch_count: i32,
    pub batch_stride: i64,
}

impl Layout {
    fn new(dtype: DataType, rows: u64, cols: u64, ld: i64) -> Self {
        Layout { dtype, rows, cols, ld, batch_count: 1, batch_stride: 0 }
    }

    /// Elements from the first to one past the last one the layout touches (0 for an empty one).
    pub fn span_elems(&self) -> u64 {
        if self.rows == 0 || self.cols == 0 || self.batch_count <= 0 {
            return 0;
        }
        let one = (self.cols - 1) * self.ld.max(0) as u64 + self.rows;
        (self.batch_count as u64 - 1) * self.batch_stride.max(0) as u64 + one
    }

    /// Bytes the layout touches from its base address.
    pub fn span_bytes(&self) -> usize {
        self.span_elems() as usize * self.dtype.size()
    }
}

/// The operand alignment cuBLASLt's heuristic is told for address `addr`
/// (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES`): its largest power-of-two divisor, capped at
/// 256 (what the heuristic assumes unless told less).
pub fn alignment(addr: u64) -> u32 {
    1 << addr.trailing_zeros().min(8)
}

/// What a cuBLASLt setup (descriptor, three layouts, the heuristic's algorithm) depends on, so
/// one built for a key serves every later product with the same key: the transposes, the layouts,
/// the epilogue and the operands' alignments. Not alpha, beta (passed per call) or the op name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanKey {
    pub transa: bool,
    pub transb: bool,
    pub a: Layout,
    pub b: Layout,
    pub c: Layout,
    pub epilogue: Epilogue,
    /// [`alignment`] of A, B and C (= D) as passed.
    pub align: [u32; 3],
}

/// Everything one `cublasLtMatmul` call is told (`CUBLAS_COMPUTE_32F`, an f32 scale type, alpha
/// and beta as f32 host scalars, D = C). `op` names the backend op for error messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulPlan {
    pub op: &'static str,
    /// `CUBLASLT_MATMUL_DESC_TRANSA` / `TRANSB` (`CUBLAS_OP_T` when true).
    pub transa: bool,
    pub transb: bool,
    pub a: Layout,
    pub b: Layout,
    pub c: Layout,
    pub alpha: f32,
    pub beta: f32,
    pub epilogue: Epilogue,
}

impl MatmulPlan {
    /// The cuBLASLt call for the row-major product `p` with a/b of type `ab` and f32 c: cuBLAS
    /// "A" is our b (`[n,k]` column-major when not `tb`... see the module doc), "B" is our a.
    pub fn row_major(op: &'static str, p: Gemm, ab: DataType) -> Self {
        let (m, n, k) = (p.m as u64, p.n as u64, p.k as u64);
        // Our row-major b [k,n] is column-major [n,k] with ld n; when tb it is stored [n,k]
        // row-major = column-major [k,n] with ld k, and cuBLAS transposes it.
        let a = if p.tb { Layout::new(ab, k, n, k as i64) } else { Layout::new(ab, n, k, n as i64) };
        let b = if p.ta { Layout::new(ab, m, k, m as i64) } else { Layout::new(ab, k, m, k as i64) };
        let c = Layout::new(DataType::F32, n, m, n as i64);
        MatmulPlan { op, transa: p.tb, transb: p.ta, a, b, c, alpha: p.alpha, beta: if p.accumulate { 1.0 } else { 0.0 }, epilogue: Epilogue::Default }
    }

    /// The same product repeated `count` times, each operand `stride_*` elements after the last
    /// (strided batched: the three layouts get the batch count and their own stride).
    pub fn batched(mut self, count: i32, stride_a: i64, stride_b: i64, stride_c: i64) -> Self {
        for (l, s) in [(&mut self.a, stride_a), (&mut self.b, stride_b), (&mut self.c, stride_c)] {
            l.batch_count = count;
            l.batch_stride = s;
        }
        self
    }

    /// (m, n, k) of the column-major product: D is m x n, op(A) m x k, op(B) k x n.
    pub fn mnk(&self) -> (u64, u64, u64) {
        let k = if self.transa { self.a.rows } else { self.a.cols };
        (self.c.rows, self.c.cols, k)
    }

    /// The cache key of this product on operands at addresses `a`, `b`, `c`.
    pub fn key(&self, a: u64, b: u64, c: u64) -> PlanKey {
        PlanKey { transa: self.transa, transb: self.transb, a: self.a, b: self.b, c: self.c, epilogue: self.epilogue, align: [alignment(a), alignment(b), alignment(c)] }
    }

    /// Short text for error messages: the op and every value cuBLASLt was told.
    pub fn describe(&self) -> String {
        let (m, n, k) = self.mnk();
        format!(
            "{}: cublasLt m={m} n={n} k={k} transa={} transb={} A {:?} {}x{} ld {} B {:?} {}x{} ld {} C {}x{} ld {} batch {} strides {}/{}/{} alpha {} beta {}",
            self.op,
            self.transa as u8,
            self.transb as u8,
            self.a.dtype,
            self.a.rows,
            self.a.cols,
            self.a.ld,
            self.b.dtype,
            self.b.rows,
            self.b.cols,
            self.b.ld,
            self.c.rows,
            self.c.cols,
            self.c.ld,
            self.c.batch_count,
            self.a.batch_stride,
            self.b.batch_stride,
            self.c.batch_stride,
            self.alpha,
            self.beta
        )
    }

    /// What cuBLASLt would refuse with `CUBLAS_STATUS_INVALID_VALUE` or `NOT_SUPPORTED` for these
    /// values: inner dimensions that disagree, a leading dimension below the stored rows, batch
    /// counts that differ, a type combination outside bf16/bf16/f32 and f32/f32/f32.
    pub fn validate(&self) -> Result<(), String> {
        let (m, n, k) = self.mnk();
        let (a_m, a_k) = if self.transa { (self.a.cols, self.a.rows) } else { (self.a.rows, self.a.cols) };
        let (b_k, b_n) = if self.transb { (self.b.cols, self.b.rows) } else { (self.b.rows, self.b.cols) };
        if a_m != m || a_k != k || b_k != k || b_n != n {
            return Err(format!("op(A) is {a_m}x{a_k}, op(B) {b_k}x{b_n}, D {m}x{n}: the dimensions do not chain"));
        }
        for (name, l) in [("A", &self.a), ("B", &self.b), ("C", &self.c)] {
            if l.ld < l.rows.max(1) as i64 {
                return Err(format!("{name}: leading dimension {} < rows {}", l.ld, l.rows));
            }
            if l.batch_count != self.c.batch_count || l.batch_count < 1 {
                return Err(format!("{name}: batch count {} vs C's {}", l.batch_count, self.c.batch_count));
            }
            if l.batch_stride < 0 {
                return Err(format!("{name}: negative batch stride {}", l.batch_stride));
            }
        }
        if self.a.dtype != self.b.dtype || self.c.dtype != DataType::F32 {
            return Err(format!("types A {:?} B {:?} C {:?}: only bf16/bf16/f32 and f32/f32/f32 are used", self.a.dtype, self.b.dtype, self.c.dtype));
        }
        Ok(())
    }
}

fn load(bytes: &[u8], dtype: DataType, i: usize) -> f32 {
    match dtype {
        DataType::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        DataType::Bf16 => half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
    }
}

/// The product `plan` describes, on host copies of the three operands: `a`, `b`, `c` hold the
/// bytes of each layout's span from its base address ([`Layout::span_bytes`]); `c` is updated in
/// place. Sums in f64 and rounds once (cuBLASLt accumulates in f32 in its own order, so a GPU
/// differs in the last bits). `beta == 0` ignores what C held (cuBLAS does not read it).
pub fn reference(plan: &MatmulPlan, a: &[u8], b: &[u8], c: &mut [u8]) -> Result<(), String> {
    plan.validate()?;
    for (name, l, len) in [("A", &plan.a, a.len()), ("B", &plan.b, b.len()), ("C", &plan.c, c.len())] {
        if len < l.span_bytes() {
            return Err(format!("{name}: {len} bytes given, the layout spans {}", l.span_bytes()));
        }
    }
    let (m, n, k) = plan.mnk();
    let (m, n, k) = (m as usize, n as usize, k as usize);
    let (lda, ldb, ldc) = (plan.a.ld as usize, plan.b.ld as usize, plan.c.ld as usize);
    let decode = |bytes: &[u8], l: &Layout| -> Vec<f32> { (0..l.span_elems() as usize).map(|i| load(bytes, l.dtype, i)).collect() };
    let (av, bv) = (decode(a, &plan.a), decode(b, &plan.b));
    for batch in 0..plan.c.batch_count.max(0) as usize {
        let (oa, ob, oc) = (
            batch * plan.a.batch_stride as usize,
            batch * plan.b.batch_stride as usize,
            batch * plan.c.batch_stride as usize,
        );
        let mut col = vec![0.0f64; k];
        for j in 0..n {
            // op(B)[:, j]: B[p, j] or, transposed, B[j, p].
            for (p, x) in col.iter_mut().enumerate() {
                let bi = if plan.transb { j + p * ldb } else { p + j * ldb };
                *x = f64::from(bv[ob + bi]);
            }
            for i in 0..m {
                let mut s = 0.0f64;
                for (p, y) in col.iter().enumerate() {
                    // op(A)[i, p]: A[i, p] or, transposed, A[p, i].
                    let ai = if plan.transa { p + i * lda } else { i + p * lda };
                    s += f64::from(av[oa + ai]) * y;
                }
                let ci = oc + i + j * ldc;
                let old = if plan.beta == 0.0 { 0.0 } else { f64::from(load(c, DataType::F32, ci)) };
                let v = (f64::from(plan.alpha) * s + f64::from(plan.beta) * old) as f32;
                c[4 * ci..4 * ci + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = crate::backend::splitmix64(s);
                let x = ((s >> 40) as f32 / 8_388_608.0 - 1.0) * 0.5;
                half::bf16::from_f32(x).to_f32() // exact in both types
            })
            .collect()
    }

    fn bytes(x: &[f32], t: DataType) -> Vec<u8> {
        match t {
            DataType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DataType::Bf16 => x.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        }
    }

    /// Row-major `c = alpha * op(a) @ op(b) + beta * c`, written from the definition.
    #[allow(clippy::too_many_arguments)]
    fn naive(p: Gemm, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
        let beta = if p.accumulate { 1.0 } else { 0.0 };
        let mut out = c.to_vec();
        for i in 0..p.m {
            for j in 0..p.n {
                let mut s = 0.0f64;
                for q in 0..p.k {
                    let x = if p.ta { a[q * p.m + i] } else { a[i * p.k + q] };
                    let y = if p.tb { b[j * p.k + q] } else { b[q * p.n + j] };
                    s += f64::from(x) * f64::from(y);
                }
                out[i * p.n + j] = (f64::from(p.alpha) * s + beta * f64::from(c[i * p.n + j])) as f32;
            }
        }
        out
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} [{i}]: got {g}, want {w}");
        }
    }

    /// Every transpose pair, both operand types, beta 0 and 1, odd shapes: the plan built by
    /// `row_major` and run by the reference equals the row-major product.
    #[test]
    fn row_major_plans_compute_the_row_major_product() {
        for (m, n, k) in [(7usize, 13usize, 19usize), (1, 257, 3), (16, 5, 1), (9, 17, 31)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    for accumulate in [false, true] {
                        for t in [DataType::Bf16, DataType::F32] {
                            let p = Gemm { m, n, k, ta, tb, alpha: 0.75, accumulate };
                            let (a, b, c0) = (vals(m * k, 1), vals(k * n, 2), vals(m * n, 3));
                            let plan = MatmulPlan::row_major("test", p, t);
                            let mut c = bytes(&c0, DataType::F32);
                            // cuBLAS "A" is our b, "B" our a.
                            reference(&plan, &bytes(&b, t), &bytes(&a, t), &mut c).unwrap();
                            close(&f32s(&c), &naive(p, &a, &b, &c0), &format!("{}", plan.describe()));
                        }
                    }
                }
            }
        }
    }

    /// Strided batches: each batch is its own product, at its own offsets; the gaps between
    /// C's batches are left alone.
    #[test]
    fn batched_plans_compute_each_batch_at_its_stride() {
        let (m, n, k, count) = (5usize, 6usize, 7usize, 3usize);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let p = Gemm { m, n, k, ta, tb, alpha: 1.5, accumulate: true };
            let (sa, sb, sc) = (m * k + 3, k * n + 1, m * n + 2);
            let (a, b, c0) = (vals(sa * count, 4), vals(sb * count, 5), vals(sc * count, 6));
            let plan = MatmulPlan::row_major("test", p, DataType::F32).batched(count as i32, sb as i64, sa as i64, sc as i64);
            let mut c = bytes(&c0, DataType::F32);
            reference(&plan, &bytes(&b, DataType::F32), &bytes(&a, DataType::F32), &mut c).unwrap();
            let got = f32s(&c);
            for bi in 0..count {
                let want = naive(p, &a[bi * sa..][..m * k], &b[bi * sb..][..k * n], &c0[bi * sc..][..m * n]);
                close(&got[bi * sc..][..m * n], &want, &format!("batch {bi} ta{ta} tb{tb}"));
                if bi + 1 < count {
                    assert_eq!(&got[bi * sc + m * n..(bi + 1) * sc], &c0[bi * sc + m * n..(bi + 1) * sc], "gap after batch {bi}");
                }
            }
        }
    }

    /// A wrong leading dimension or transpose is not silently absorbed: it is refused, or it
    /// reads other elements, or it needs more bytes than the operand has.
    #[test]
    fn a_wrong_leading_dimension_or_transpose_is_caught() {
        let p = Gemm::linear(4, 6, 5);
        let good = MatmulPlan::row_major("test", p, DataType::F32);
        // cuBLAS A is our b [n=6, k=5], B our a [m=4, k=5].
        let (a, b) = (bytes(&vals(30, 8), DataType::F32), bytes(&vals(20, 7), DataType::F32));
        let mut want = vec![0u8; 4 * 24];
        reference(&good, &a, &b, &mut want).unwrap();
        let mut small_ld = good;
        small_ld.a.ld -= 1;
        assert!(reference(&small_ld, &a, &b, &mut vec![0u8; 96]).unwrap_err().contains("leading dimension"));
        let mut big_ld = good;
        big_ld.b.ld += 1;
        assert!(reference(&big_ld, &a, &b, &mut vec![0u8; 96]).unwrap_err().contains("spans"));
        let mut flipped = good;
        flipped.transa = !flipped.transa;
        assert!(reference(&flipped, &a, &b, &mut vec![0u8; 96]).unwrap_err().contains("chain"));
        let mut mixed = good;
        mixed.b.dtype = DataType::Bf16;
        assert!(reference(&mixed, &a, &b, &mut vec![0u8; 96]).is_err());
    }

    /// One cached cuBLASLt setup serves exactly the products cuBLASLt cannot tell apart: alpha,
    /// beta and the op name do not matter, every layout value, transpose and alignment class does.
    #[test]
    fn plan_keys_separate_what_the_setup_depends_on() {
        let p = Gemm::linear(64, 96, 32);
        let plan = MatmulPlan::row_major("a", p, DataType::Bf16);
        let (a, b, c) = (0x7000_0000u64, 0x7100_0000u64, 0x7200_0000u64);
        let key = plan.key(a, b, c);
        let same = MatmulPlan::row_major("b", Gemm { alpha: 0.5, accumulate: true, ..p }, DataType::Bf16);
        assert_eq!(same.key(a, b, c), key, "alpha, beta or the op name changed the key");
        // Alignment classes: 512- and 256-byte aligned are the same (capped), 16-byte is not.
        assert_eq!(plan.key(a + 512, b + 256, c + 1024), key);
        assert_ne!(plan.key(a + 16, b, c), key);
        assert_ne!(plan.key(a, b, c + 8), key);
        assert_eq!(alignment(0x7000_0010), 16);
        assert_eq!(alignment(0x7000_0002), 2);
        assert_eq!(alignment(0), 256);
        let mut others = vec![
            MatmulPlan::row_major("a", Gemm::linear(64, 96, 33), DataType::Bf16),
            MatmulPlan::row_major("a", Gemm::linear(65, 96, 32), DataType::Bf16),
            MatmulPlan::row_major("a", p, DataType::F32),
            MatmulPlan::row_major("a", Gemm { ta: true, ..p }, DataType::Bf16),
            MatmulPlan::row_major("a", Gemm { tb: false, ..p }, DataType::Bf16),
            plan.batched(2, 64 * 96, 32 * 64, 96 * 64),
        ];
        let mut ld = plan;
        ld.c.ld += 8;
        others.push(ld);
        let mut keys = std::collections::HashSet::new();
        keys.insert(key);
        for o in &others {
            assert!(keys.insert(o.key(a, b, c)), "{} collides with an earlier key", o.describe());
        }
        // Batch strides alone separate keys too.
        assert_ne!(plan.batched(2, 64 * 96, 32 * 64, 96 * 64).key(a, b, c), plan.batched(2, 64 * 96, 32 * 64, 96 * 64 + 8).key(a, b, c));
    }

    #[test]
    fn spans_count_every_element_touched() {
        let l = Layout { dtype: DataType::Bf16, rows: 3, cols: 4, ld: 5, batch_count: 2, batch_stride: 40 };
        assert_eq!(l.span_elems(), 40 + 3 * 5 + 3);
        assert_eq!(l.span_bytes(), 2 * 58);
        assert_eq!(Layout { rows: 0, ..l }.span_elems(), 0);
    }
}
