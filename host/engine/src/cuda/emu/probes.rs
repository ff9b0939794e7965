//! Probe cases for the kernels of `kernels/probe.cu`: inputs, launch shape and a check of the
//! outputs against a plain host computation written from the PTX ISA's fragment layouts and the
//! CUDA programming guide (independently of the emulator's C++). Device-independent:
//! [`run_on_emulator`] runs a case here; a GPU runner runs the same [`ProbeCase`] (a kernel name,
//! a launch shape, argument bytes) on the hardware, so both are held to the same answer.

use super::{EmuArg, Emulator};
use crate::rng::Rng;

/// One argument of a probe launch, in the kernel's parameter order.
#[derive(Clone, Debug)]
pub enum ProbeArg {
    /// A device buffer holding these bytes before the launch.
    In(Vec<u8>),
    /// A device buffer of this many bytes, unwritten before the launch.
    Out(usize),
    I32(i32),
    /// `size_t`.
    Size(usize),
}

/// Checks the buffers after the launch (every `In` and `Out`, in argument order).
pub type Check = Box<dyn Fn(&[Vec<u8>]) -> Result<(), String> + Send + Sync>;

/// One probe launch and what it must produce.
pub struct ProbeCase {
    /// What it checks, for messages ("mma.sync bf16, small integers").
    pub name: String,
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
    pub args: Vec<ProbeArg>,
    pub check: Check,
}

impl std::fmt::Debug for ProbeCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeCase").field("name", &self.name).field("kernel", &self.kernel).finish()
    }
}

/// Every probe case, inputs drawn from `seed`.
pub fn all(seed: u64) -> Vec<ProbeCase> {
    let mut v = vec![
        mma(false, true, seed),
        mma(false, false, seed),
        mma(true, true, seed),
        mma(true, false, seed),
        tile_mma(seed),
        cp_async(seed),
        cp_async_groups(seed),
        shfl(seed),
        atomics(),
        convert(seed),
        widen(),
    ];
    for num in [1, 2, 4] {
        for trans in [false, true] {
            v.push(ldmatrix(num, trans));
        }
    }
    v
}

/// Runs `case` on the emulator: an error naming the case for a failed launch or a wrong output.
pub fn run_on_emulator(emu: &Emulator, case: &ProbeCase) -> Result<(), String> {
    let fail = |e: crate::EngineError| format!("probe `{}` ({}): {e}", case.name, case.kernel);
    let mut bufs: Vec<(u64, usize)> = Vec::new();
    let mut args = Vec::new();
    let result = (|| {
        for a in &case.args {
            match a {
                ProbeArg::In(bytes) => {
                    let p = emu.alloc(bytes.len()).map_err(fail)?;
                    bufs.push((p, bytes.len()));
                    emu.copy_htod(p, bytes).map_err(fail)?;
                    args.push(EmuArg::Ptr(p));
                }
                ProbeArg::Out(n) => {
                    let p = emu.alloc(*n).map_err(fail)?;
                    bufs.push((p, *n));
                    args.push(EmuArg::Ptr(p));
                }
                ProbeArg::I32(v) => args.push(EmuArg::I32(*v)),
                ProbeArg::Size(v) => args.push(EmuArg::Size(*v)),
            }
        }
        emu.launch_args(case.kernel, case.grid, case.block, case.shared_bytes, &args).map_err(fail)?;
        let mut outs = Vec::new();
        for &(p, n) in &bufs {
            let mut host = vec![0u8; n];
            emu.copy_dtoh(p, &mut host).map_err(fail)?;
            outs.push(host);
        }
        (case.check)(&outs).map_err(|e| format!("probe `{}` ({}): {e}", case.name, case.kernel))
    })();
    for (p, _) in bufs {
        let _ = emu.free(p);
    }
    result
}

// ---- helpers ------------------------------------------------------------------------------------

fn bytes_u16(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bytes_i32(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn u16s(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// "n of m differ; first: [i] got .. want .." for the positions where `ok` fails.
/// (`ok` gets the position, the value and the expected value.)
fn compare<T: std::fmt::Debug>(what: &str, got: &[T], want: &[T], ok: impl Fn(usize, &T, &T) -> bool) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| !ok(i, &got[i], &want[i])).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let first: Vec<String> =
        bad.iter().take(6).map(|&i| format!("[{i}] got {:?} want {:?}", got[i], want[i])).collect();
    Err(format!("{what}: {} of {} differ; first: {}", bad.len(), got.len(), first.join(", ")))
}

fn to_16(x: f32, f16: bool) -> u16 {
    if f16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() }
}
fn from_16(b: u16, f16: bool) -> f32 {
    if f16 { half::f16::from_bits(b).to_f32() } else { half::bf16::from_bits(b).to_f32() }
}

// ---- mma.sync ---------------------------------------------------------------------------------------

const MMA_TILES: usize = 4;

/// `mma.sync.m16n8k16` (bf16 or f16 in, f32 accumulate) on 4 tiles. `exact`: small integers,
/// whose products and sums are exact in f32 on any hardware, so the result must match bit for
/// bit; otherwise random reals, held to 2^-20 of the sum of |terms| (the hardware's order and
/// truncation of partial sums may differ from an exact sum in the last bits).
pub fn mma(f16: bool, exact: bool, seed: u64) -> ProbeCase {
    let mut rng = Rng::new(seed ^ 0x6d6d61 ^ (f16 as u64) << 8 ^ (exact as u64) << 9);
    let mut draw = |scale: f32| {
        if exact { ((rng.next_u64() % 17) as f32) - 8.0 } else { (rng.uniform() * 2.0 - 1.0) * scale }
    };
    let a: Vec<u16> = (0..MMA_TILES * 256).map(|_| to_16(draw(2.0), f16)).collect();
    let b: Vec<u16> = (0..MMA_TILES * 128).map(|_| to_16(draw(2.0), f16)).collect();
    let c: Vec<f32> = (0..MMA_TILES * 128).map(|_| draw(8.0)).collect();
    let (mut want, mut mag) = (vec![0f32; MMA_TILES * 128], vec![0f64; MMA_TILES * 128]);
    for t in 0..MMA_TILES {
        for r in 0..16 {
            for n in 0..8 {
                let i = t * 128 + r * 8 + n;
                let (mut acc, mut abs) = (f64::from(c[i]), f64::from(c[i].abs()));
                for k in 0..16 {
                    let p = f64::from(from_16(a[t * 256 + r * 16 + k], f16)) * f64::from(from_16(b[t * 128 + k * 8 + n], f16));
                    acc += p;
                    abs += p.abs();
                }
                want[i] = acc as f32;
                mag[i] = abs;
            }
        }
    }
    let ty = if f16 { "f16" } else { "bf16" };
    ProbeCase {
        name: format!("mma.sync.m16n8k16 {ty}, {}", if exact { "small integers (exact)" } else { "random reals" }),
        kernel: if f16 { "probe_mma_f16" } else { "probe_mma_bf16" },
        grid: (MMA_TILES as u32, 1, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
        args: vec![
            ProbeArg::In(bytes_u16(&a)),
            ProbeArg::In(bytes_u16(&b)),
            ProbeArg::In(bytes_f32(&c)),
            ProbeArg::Out(MMA_TILES * 128 * 4),
        ],
        check: Box::new(move |outs| {
            compare("d [tile][row][col]", &f32s(&outs[3]), &want, |i, g, w| {
                if exact { g.to_bits() == w.to_bits() } else { (f64::from(*g) - f64::from(*w)).abs() <= mag[i] * (2f64).powi(-20) }
            })
        }),
    }
}

/// The pipeline of a tensor-core tile: cp.async.cg to shared, ldmatrix.x4 and .x2.trans into
/// fragments, mma.sync (bf16, small integers: exact).
pub fn tile_mma(seed: u64) -> ProbeCase {
    let mut rng = Rng::new(seed ^ 0x74696c65);
    let mut draw = || ((rng.next_u64() % 17) as f32) - 8.0;
    let a: Vec<f32> = (0..256).map(|_| draw()).collect();
    let b: Vec<f32> = (0..128).map(|_| draw()).collect();
    let c: Vec<f32> = (0..128).map(|_| draw()).collect();
    let mut want = vec![0f32; 128];
    for r in 0..16 {
        for n in 0..8 {
            want[r * 8 + n] = c[r * 8 + n] + (0..16).map(|k| a[r * 16 + k] * b[k * 8 + n]).sum::<f32>();
        }
    }
    let a16: Vec<u16> = a.iter().map(|&x| to_16(x, false)).collect();
    let b16: Vec<u16> = b.iter().map(|&x| to_16(x, false)).collect();
    ProbeCase {
        name: "cp.async -> ldmatrix -> mma.sync tile (bf16, exact)".into(),
        kernel: "probe_tile_mma_bf16",
        grid: (1, 1, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
        args: vec![
            ProbeArg::In(bytes_u16(&a16)),
            ProbeArg::In(bytes_u16(&b16)),
            ProbeArg::In(bytes_f32(&c)),
            ProbeArg::Out(128 * 4),
        ],
        check: Box::new(move |outs| compare("d", &f32s(&outs[3]), &want, |_, g, w| g.to_bits() == w.to_bits())),
    }
}

// ---- ldmatrix ---------------------------------------------------------------------------------------

/// `ldmatrix.m8n8.x{num}{.trans}`: element (m, r, c) of the source is the distinct value
/// 64m + 8r + c, so the check shows exactly where each element went.
pub fn ldmatrix(num: usize, trans: bool) -> ProbeCase {
    let src: Vec<u16> = (0..256u16).collect();
    let at = |m: usize, r: usize, c: usize| u32::from(src[m * 64 + r * 8 + c]);
    let mut want = vec![0u32; num * 32];
    for m in 0..num {
        for lane in 0..32 {
            let (row, col) = (lane / 4, (lane % 4) * 2);
            want[m * 32 + lane] = if trans {
                at(m, col, row) | (at(m, col + 1, row) << 16)
            } else {
                at(m, row, col) | (at(m, row, col + 1) << 16)
            };
        }
    }
    ProbeCase {
        name: format!("ldmatrix.m8n8.x{num}{}", if trans { ".trans" } else { "" }),
        kernel: "probe_ldmatrix",
        grid: (1, 1, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
        args: vec![ProbeArg::In(bytes_u16(&src)), ProbeArg::Out(num * 32 * 4), ProbeArg::I32(num as i32), ProbeArg::I32(trans as i32)],
        check: Box::new(move |outs| {
            let got: Vec<String> = u32s(&outs[1]).iter().map(|x| format!("{:04x}|{:04x}", x & 0xffff, x >> 16)).collect();
            let want: Vec<String> = want.iter().map(|x| format!("{:04x}|{:04x}", x & 0xffff, x >> 16)).collect();
            compare("registers (m * 32 + lane, elements low|high)", &got, &want, |_, g, w| g == w)
        }),
    }
}

// ---- cp.async ---------------------------------------------------------------------------------------

/// The four cp.async forms (ca.4, ca.8, ca.16, cg.16) with src-size zero-fill from 0 to 16 bytes;
/// lanes with src-size 0 pass a source far out of bounds, which must not be read.
pub fn cp_async(seed: u64) -> ProbeCase {
    let mut rng = Rng::new(seed ^ 0x6370);
    let src: Vec<u8> = (0..512).map(|_| rng.next_u64() as u8).collect();
    let sizes: Vec<i32> = (0..32).map(|l| (l * 7) % 17).collect();
    let mut want = vec![0u8; 4 * 32 * 16];
    for v in 0..4 {
        for l in 0..32 {
            for j in 0..16 {
                want[(v * 32 + l) * 16 + j] = if (j as i32) < sizes[l] { src[l * 16 + j] } else { 0 };
            }
        }
    }
    ProbeCase {
        name: "cp.async ca.4/ca.8/ca.16/cg.16 with zero-fill".into(),
        kernel: "probe_cp_async",
        grid: (1, 1, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
        args: vec![ProbeArg::In(src), ProbeArg::Out(4 * 32 * 16), ProbeArg::In(bytes_i32(&sizes))],
        check: Box::new(move |outs| compare("shared bytes [form][lane][byte]", &outs[1], &want, |_, g, w| g == w)),
    }
}

/// cp.async.wait_group 1 completes the older of two groups; wait_group 0 the other.
pub fn cp_async_groups(seed: u64) -> ProbeCase {
    let mut rng = Rng::new(seed ^ 0x677270);
    let src: Vec<f32> = (0..256).map(|_| rng.uniform()).collect();
    let want: Vec<f32> = (0..256).map(|i| if i < 128 { src[(i * 7) % 128] } else { src[128 + ((i - 128) * 7) % 128] }).collect();
    ProbeCase {
        name: "cp.async commit_group / wait_group 1 / wait_group 0".into(),
        kernel: "probe_cp_async_groups",
        grid: (1, 1, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
        args: vec![ProbeArg::In(bytes_f32(&src)), ProbeArg::Out(256 * 4)],
        check: Box::new(move |outs| compare("out", &f32s(&outs[1]), &want, |_, g, w| g.to_bits() == w.to_bits())),
    }
}

// ---- shuffles, votes, atomics ---------------------------------------------------------------------

/// The 14 shuffle and vote cases of `probe_shfl`, expected values from the CUDA programming
/// guide's definitions (segments of `width` lanes; a source outside the segment gives the
/// caller's own value, except that xor may read earlier segments).
pub fn shfl(seed: u64) -> ProbeCase {
    let mut rng = Rng::new(seed ^ 0x73686c);
    let mut input: Vec<i32> = (0..32).map(|_| (rng.next_u64() % 1000) as i32).collect();
    for v in input.iter_mut() {
        if *v == 77 {
            *v = 78;
        }
    }
    input[9] = 77;
    let v = |l: usize| input[l];
    let mut want = vec![0i32; 14 * 32];
    let ballot = |pred: &dyn Fn(usize) -> bool, lanes: usize| (0..lanes).filter(|&l| pred(l)).fold(0u32, |b, l| b | 1 << l) as i32;
    for l in 0..32 {
        let seg = |w: usize| (l / w) * w;
        want[l] = v((l * 7 + 3) % 32);
        want[32 + l] = v(seg(8) + 13 % 8);
        want[64 + l] = if l >= 3 { v(l - 3) } else { v(l) };
        want[96 + l] = if l % 16 >= 2 { v(l - 2) } else { v(l) };
        want[128 + l] = if l + 5 < 32 { v(l + 5) } else { v(l) };
        want[160 + l] = if l % 4 + 1 < 4 { v(l + 1) } else { v(l) };
        want[192 + l] = v(l ^ 1);
        want[224 + l] = if (l ^ 9) / 8 > l / 8 { v(l) } else { v(l ^ 9) };
        want[256 + l] = if l < 16 { v(l ^ 4) } else { -1 };
        want[288 + l] = ballot(&|j| v(j) & 1 != 0, 32);
        want[320 + l] = 1;
        want[352 + l] = 1;
        want[384 + l] = if l < 16 { ballot(&|j| v(j) & 2 != 0, 16) } else { -1 };
        want[416 + l] = 1;
    }
    ProbeCase {
        name: "__shfl*_sync (idx/up/down/xor, widths, partial mask), __ballot/__any/__all_sync".into(),
        kernel: "probe_shfl",
        grid: (1, 1, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
        args: vec![ProbeArg::In(bytes_i32(&input)), ProbeArg::Out(14 * 32 * 4)],
        check: Box::new(move |outs| compare("out [case * 32 + lane]", &i32s(&outs[1]), &want, |_, g, w| g == w)),
    }
}

/// atomicAdd/Min/Max/CAS/Or/Exch over 4 blocks of 64 threads: order-independent totals.
pub fn atomics() -> ProbeCase {
    let init = [0, 0, 1000, -1, 0, 0, 0, 0];
    let n = 256i32;
    let want = vec![n, (0..n).sum(), 1000 - (n - 1), (n - 1) * 3, 3 * n, 0x7fff_ffff, 1, 1];
    ProbeCase {
        name: "atomics across blocks".into(),
        kernel: "probe_atomics",
        grid: (4, 1, 1),
        block: (64, 1, 1),
        shared_bytes: 0,
        args: vec![ProbeArg::In(bytes_i32(&init))],
        check: Box::new(move |outs| compare("counters", &i32s(&outs[0]), &want, |_, g, w| g == w)),
    }
}

// ---- conversions -----------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Mode {
    Rn,
    Rz,
    Rd,
    Ru,
}

fn next_up(b: u16) -> u16 {
    match b {
        0x8000 => 0x0001,
        _ if b & 0x8000 != 0 => b - 1,
        _ => b + 1,
    }
}

fn next_down(b: u16) -> u16 {
    match b {
        0x0000 => 0x8001,
        _ if b & 0x8000 != 0 => b + 1,
        _ => b - 1,
    }
}

/// `x` rounded to bf16 or f16 in `mode`, as the device's `cvt` does: the neighbours of the
/// round-to-nearest result (the `half` crate's), the one `mode` picks; a NaN becomes 0x7FFF.
fn reference(x: f32, f16: bool, mode: Mode) -> u16 {
    if x.is_nan() {
        return 0x7fff;
    }
    let r = to_16(x, f16);
    let value = |b: u16| f64::from(from_16(b, f16));
    let xv = f64::from(x);
    if value(r) == xv {
        return r;
    }
    let (lo, hi) = if value(r) < xv { (r, next_up(r)) } else { (next_down(r), r) };
    match mode {
        Mode::Rn => r,
        Mode::Rz => {
            if xv > 0.0 {
                lo
            } else {
                hi
            }
        }
        Mode::Rd => lo,
        Mode::Ru => hi,
    }
}

/// `__float2bfloat16_{rn,rz,rd,ru}` and `__float2half_{rn,rz,rd,ru}` on special values
/// (signed zeros, infinities, NaN, the largest finite values, subnormals, ties) and on random bit
/// patterns.
pub fn convert(seed: u64) -> ProbeCase {
    let mut x: Vec<f32> = vec![
        0.0, -0.0, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::MAX, -f32::MAX,
        f32::MIN_POSITIVE, 1e-45, -1e-45, 65504.0, 65519.99, 65520.0, -65520.0, 65536.0, 1e-8, -1e-8,
        2f32.powi(-24), 2f32.powi(-25), 2f32.powi(-25) * 1.5, 2f32.powi(-14), 3.0e38, 1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 0.1, -0.1, 1.0 / 3.0,
    ];
    x.push(f32::from_bits(0x7f7f_8000)); // bf16 tie below infinity
    x.push(f32::from_bits(0x3f80_8000)); // bf16 tie, even below
    x.push(f32::from_bits(0x3f81_8000)); // bf16 tie, odd below
    let mut rng = Rng::new(seed ^ 0x637674);
    x.extend((0..4000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    x.extend((0..1000).map(|_| (rng.uniform() - 0.5) * 131072.0)); // the f16 range
    x.extend((0..1000).map(|_| (rng.uniform() - 0.5) * 2f32.powi(-12))); // f16 subnormals
    let n = x.len();
    let mut want = vec![0u16; 8 * n];
    for (i, &v) in x.iter().enumerate() {
        for (m, mode) in [Mode::Rn, Mode::Rz, Mode::Rd, Mode::Ru].into_iter().enumerate() {
            want[m * n + i] = reference(v, false, mode);
            want[(4 + m) * n + i] = reference(v, true, mode);
        }
    }
    let xs = x.clone();
    ProbeCase {
        name: "f32 -> bf16 / f16 conversions, rn rz rd ru".into(),
        kernel: "probe_convert",
        grid: (8, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
        args: vec![ProbeArg::In(bytes_f32(&x)), ProbeArg::Out(8 * n * 2), ProbeArg::Size(n)],
        check: Box::new(move |outs| {
            let got = u16s(&outs[1]);
            let names = ["bf16 rn", "bf16 rz", "bf16 rd", "bf16 ru", "f16 rn", "f16 rz", "f16 rd", "f16 ru"];
            for (m, name) in names.iter().enumerate() {
                let g: Vec<String> = (0..n).map(|i| format!("{:e} -> {:04x}", xs[i], got[m * n + i])).collect();
                let w: Vec<String> = (0..n).map(|i| format!("{:e} -> {:04x}", xs[i], want[m * n + i])).collect();
                compare(name, &g, &w, |_, a, b| a == b)?;
            }
            Ok(())
        }),
    }
}

/// `__bfloat162float` and `__half2float` of every 16-bit pattern (NaN inputs: any NaN).
pub fn widen() -> ProbeCase {
    let h: Vec<u16> = (0..=u16::MAX).collect();
    let n = h.len();
    ProbeCase {
        name: "bf16 / f16 -> f32, all 65536 patterns".into(),
        kernel: "probe_widen",
        grid: (64, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
        args: vec![ProbeArg::In(bytes_u16(&h)), ProbeArg::Out(2 * n * 4), ProbeArg::Size(n)],
        check: Box::new(move |outs| {
            let got = f32s(&outs[1]);
            let want: Vec<f32> = (0..n).map(|i| from_16(i as u16, false)).chain((0..n).map(|i| from_16(i as u16, true))).collect();
            compare("widened [bf16 | f16][pattern]", &got, &want, |_, g, w| g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()))
        }),
    }
}
