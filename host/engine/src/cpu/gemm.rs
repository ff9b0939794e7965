//! fp32 matrix products on the CPU: the `gemm` crate's kernels (AVX2/AVX-512/NEON chosen at
//! run time; about 1.3x `matrixmultiply` on this project's AVX-512 build machine), split into fixed-size blocks of
//! output rows (or columns) that rayon runs in parallel. The split depends only on the shape,
//! never on the thread count, and no reduction dimension is ever split, so every output element
//! is computed by the same instructions in the same order with 1 or N threads.

use rayon::prelude::*;

/// Rows (or columns) per parallel block.
const ROW_BLOCK: usize = 64;
const COL_BLOCK: usize = 256;
/// Below this many multiply-adds one sequential call is cheaper than splitting.
const SPLIT_MIN_WORK: usize = 1 << 20;

/// A raw output pointer shared by parallel tasks of the CPU kernels (gemm, attention).
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: every user's parallel tasks write disjoint parts of the buffer behind it (each user
// says which: rows/columns of `c` here, rows per (head, query block) in attention).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole Send wrapper).
    pub(super) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// A strided matrix view: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub rs: isize,
    pub cs: isize,
}

/// `c[m,n] = alpha * a[m,k] @ b[k,n] + beta * c`, with arbitrary strides (row-major slices).
/// Slices must cover every element the views address.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    beta: f32,
    c: &mut [f32],
    cv: View,
) {
    if m == 0 || n == 0 {
        return;
    }
    let cp = SendPtr(c.as_mut_ptr());
    let work = m * n * k.max(1);
    let run = |i0: usize, i1: usize, j0: usize, j1: usize| {
        // SAFETY: offsets stay within the slices (caller contract); blocks write disjoint parts of c.
        unsafe {
            gemm::gemm(
                i1 - i0,
                j1 - j0,
                k,
                cp.get().offset(i0 as isize * cv.rs + j0 as isize * cv.cs),
                cv.cs,
                cv.rs,
                beta != 0.0,
                a.as_ptr().offset(i0 as isize * av.rs),
                av.cs,
                av.rs,
                b.as_ptr().offset(j0 as isize * bv.cs),
                bv.cs,
                bv.rs,
                beta,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    if work < SPLIT_MIN_WORK {
        run(0, m, 0, n);
    } else if m >= 4 * ROW_BLOCK {
        let blocks = m.div_ceil(ROW_BLOCK);
        (0..blocks).into_par_iter().for_each(|bi| {
            let i0 = bi * ROW_BLOCK;
            run(i0, (i0 + ROW_BLOCK).min(m), 0, n)
        });
    } else {
        let blocks = n.div_ceil(COL_BLOCK);
        (0..blocks).into_par_iter().for_each(|bj| {
            let j0 = bj * COL_BLOCK;
            run(0, m, j0, (j0 + COL_BLOCK).min(n))
        });
    }
}

/// Row-major contiguous gemm with optional transposes (see `backend::Gemm`).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    let av = if ta { View { rs: 1, cs: m as isize } } else { View { rs: k as isize, cs: 1 } };
    let bv = if tb { View { rs: 1, cs: k as isize } } else { View { rs: n as isize, cs: 1 } };
    sgemm_strided(m, n, k, alpha, a, av, b, bv, beta, c, View { rs: n as isize, cs: 1 });
}
