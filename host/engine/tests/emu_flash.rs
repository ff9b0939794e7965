//! The tensor-core flash attention (`kernels/flash_attention.cu`) in the CPU device emulator,
//! launched with the CUDA backend's geometry (`flash_cfg`, `flash_smem_bytes`): forward and
//! backward against the bf16-faithful CPU oracle (`CpuBackend::cuda_numerics`) at head dims 64,
//! 128, 256 with uneven documents, GQA ratios 1, 2, 6 and sliding windows; identical bytes under
//! four thread orders (the backward's determinism); and the planted bug of `build.rs` (the dk/dv
//! kernel's causal bound off by one) failing the same comparison, naming its kernel.

mod emu_util;

use emu_util::{CpuBackend, Dev, cpu_buf, cpu_get, cpu_u32, i32a, ptr, values};
use lora_engine::cuda::emu::{EmuArg, PLANTED_BUG, PLANTED_MUTATION, Schedule};
use lora_engine::cuda::{flash_cfg, flash_smem_bytes};
use lora_engine::{Attn, Backend};

/// Documents, query heads, kv heads, head dim, window.
type Case = (&'static [usize], usize, usize, usize, usize);

fn attn(c: Case) -> (Attn, Vec<u32>) {
    let (docs, h, hkv, hd, window) = c;
    let mut cu = vec![0u32];
    for &n in docs {
        cu.push(cu.last().unwrap() + n as u32);
    }
    let t = *cu.last().unwrap() as usize;
    let a = Attn { tokens: t, n_docs: docs.len(), max_seqlen: *docs.iter().max().unwrap(), n_heads: h, n_kv_heads: hkv, head_dim: hd, scale: 1.0 / (hd as f32).sqrt(), window };
    (a, cu)
}

/// q, k, v, dout in [-1, 1) (f32; the device gets them rounded to bf16, as the backend's casts do).
fn inputs(a: &Attn, seed: u64) -> [Vec<f32>; 4] {
    let (nq, nkv) = (a.tokens * a.n_heads * a.head_dim, a.tokens * a.n_kv_heads * a.head_dim);
    [values(nq, seed), values(nkv, seed + 1), values(nkv, seed + 2), values(nq, seed + 3)]
}

/// out, lse, dq, dk, dv as bytes.
struct Run {
    outs: [Vec<u8>; 5],
}

const NAMES: [&str; 5] = ["out", "lse", "dq", "dk", "dv"];

/// The four flash kernels (`prefix` "" for the real ones, "planted_" for the planted bug).
fn flash_on(dev: &Dev, prefix: &str, a: Attn, cu: &[u32], x: &[Vec<f32>; 4]) -> Run {
    let (t, h, hkv, hd) = (a.tokens, a.n_heads, a.n_kv_heads, a.head_dim);
    let (pq, pk, pv, pdo, pcu) = (dev.bf16s(&x[0]), dev.bf16s(&x[1]), dev.bf16s(&x[2]), dev.bf16s(&x[3]), dev.u32s(cu));
    let (pout, plse, pdelta) = (dev.out(t * h * hd * 4), dev.out(h * t * 4), dev.out(h * t * 4));
    let (pdq, pdk, pdv) = (dev.out(t * h * hd * 4), dev.out(t * hkv * hd * 4), dev.out(t * hkv * hd * 4));
    let sizes = [i32a(t), i32a(a.n_docs), i32a(h), i32a(hkv), EmuArg::F32(a.scale), i32a(a.window)];
    let (s_fwd, s_dq, s_dkv) = flash_smem_bytes(hd);
    let geo = |rows, heads, smem| {
        let c = flash_cfg(rows, heads, smem);
        (c.grid_dim, c.block_dim, c.shared_mem_bytes)
    };
    let run = |kernel: &str, (grid, block, smem): ((u32, u32, u32), (u32, u32, u32), u32), args: &[EmuArg]| {
        dev.run(&format!("{prefix}{kernel}"), grid, block, smem, args);
    };
    let mut args = vec![ptr(pq), ptr(pk), ptr(pv), ptr(pcu), ptr(pout), ptr(plse)];
    args.extend(sizes);
    run(&format!("flash_fwd_hd{hd}"), geo(t, h, s_fwd), &args);
    run("flash_bwd_delta", (((t * h).div_ceil(8) as u32, 1, 1), (256, 1, 1), 0), &[ptr(pout), ptr(pdo), ptr(pdelta), i32a(t), i32a(h), i32a(hd)]);
    let common = [ptr(pq), ptr(pk), ptr(pv), ptr(pcu), ptr(plse), ptr(pdelta), ptr(pdo)];
    let mut args = common.to_vec();
    args.push(ptr(pdq));
    args.extend(sizes);
    run(&format!("flash_bwd_dq_hd{hd}"), geo(t, h, s_dq), &args);
    let mut args = common.to_vec();
    args.extend([ptr(pdk), ptr(pdv)]);
    args.extend(sizes);
    run(&format!("flash_bwd_dkv_hd{hd}"), geo(t, hkv, s_dkv), &args);
    let outs = [dev.get(pout, t * h * hd * 4), dev.get(plse, h * t * 4), dev.get(pdq, t * h * hd * 4), dev.get(pdk, t * hkv * hd * 4), dev.get(pdv, t * hkv * hd * 4)];
    for p in [pq, pk, pv, pdo, pcu, pout, plse, pdelta, pdq, pdk, pdv] {
        dev.emu.free(p).unwrap();
    }
    Run { outs }
}

/// The oracle's out, lse, dq, dk, dv (its own forward feeds its backward).
fn oracle(a: Attn, cu: &[u32], x: &[Vec<f32>; 4]) -> [Vec<f32>; 5] {
    let cpu = CpuBackend::cuda_numerics();
    let (t, h, hkv, hd) = (a.tokens, a.n_heads, a.n_kv_heads, a.head_dim);
    let (q, k, v, dout, c) = (cpu_buf(&cpu, &x[0]), cpu_buf(&cpu, &x[1]), cpu_buf(&cpu, &x[2]), cpu_buf(&cpu, &x[3]), cpu_u32(&cpu, cu));
    let (mut out, mut lse) = (cpu_buf(&cpu, &vec![0.0; t * h * hd]), cpu_buf(&cpu, &vec![0.0; h * t]));
    cpu.attention_fwd(a, &q, &k, &v, &c, &mut out, &mut lse).unwrap();
    let (mut dq, mut dk, mut dv) = (cpu_buf(&cpu, &vec![0.0; t * h * hd]), cpu_buf(&cpu, &vec![0.0; t * hkv * hd]), cpu_buf(&cpu, &vec![0.0; t * hkv * hd]));
    cpu.attention_bwd(a, &q, &k, &v, &c, &out, &lse, &dout, &mut dq, &mut dk, &mut dv).unwrap();
    [cpu_get(&cpu, &out), cpu_get(&cpu, &lse), cpu_get(&cpu, &dq), cpu_get(&cpu, &dk), cpu_get(&cpu, &dv)]
}

fn as_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The selftest's rule against the oracle: |got - want| <= 1e-3 |want| + 1e-3 max|want|, per
/// output; Err names the kernel that wrote the first output beyond it. Ok: the largest relative
/// error (against |want| + the absolute part) of each output.
fn compare(prefix: &str, a: Attn, run: &Run, want: &[Vec<f32>; 5]) -> Result<[f64; 5], String> {
    let hd = a.head_dim;
    let kernels = [format!("flash_fwd_hd{hd}"), format!("flash_fwd_hd{hd}"), format!("flash_bwd_dq_hd{hd}"), format!("flash_bwd_dkv_hd{hd}"), format!("flash_bwd_dkv_hd{hd}")];
    let mut worst = [0f64; 5];
    for o in 0..5 {
        let got = as_f32(&run.outs[o]);
        let scale = want[o].iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        let atol = 1e-3 * scale;
        for (i, (&g, &w)) in got.iter().zip(&want[o]).enumerate() {
            let (g, w) = (g as f64, w as f64);
            let e = (g - w).abs();
            if !g.is_finite() || e > atol + 1e-3 * w.abs() {
                return Err(format!("{prefix}{}: {} [{i}] = {g:e}, oracle {w:e} (tolerance {:e})", kernels[o], NAMES[o], atol + 1e-3 * w.abs()));
            }
            worst[o] = worst[o].max(e / (w.abs() + atol).max(f64::MIN_POSITIVE));
        }
    }
    Ok(worst)
}

const CASES: [Case; 6] = [
    (&[1, 70, 9], 4, 2, 64, 0),
    (&[33, 40], 6, 1, 64, 0),
    (&[1, 80, 5], 6, 1, 64, 7),
    (&[45, 1, 30], 4, 2, 128, 0),
    (&[20, 1, 19], 2, 2, 128, 16),
    (&[37, 1, 28], 2, 1, 256, 5),
];

#[test]
fn flash_forward_and_backward_match_the_bf16_oracle() {
    let dev = Dev::new(Schedule::Forward);
    for (n, c) in CASES.into_iter().enumerate() {
        let (a, cu) = attn(c);
        let x = inputs(&a, 10 + n as u64);
        let run = flash_on(&dev, "", a, &cu, &x);
        let worst = compare("", a, &run, &oracle(a, &cu, &x)).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        println!("{c:?}: max relative error out {:.1e} lse {:.1e} dq {:.1e} dk {:.1e} dv {:.1e}", worst[0], worst[1], worst[2], worst[3], worst[4]);
    }
}

/// Same inputs, same bytes: forward and backward under forward, reverse and two shuffled thread
/// (and block) orders, and with cp.async copies landing at seeded points before their wait.
#[test]
fn flash_kernels_give_identical_bytes_under_every_thread_order() {
    let (a, cu) = attn((&[1, 70, 9], 6, 1, 64, 7));
    let x = inputs(&a, 3);
    let first = flash_on(&Dev::new(Schedule::Forward), "", a, &cu, &x);
    for s in [Schedule::Reverse, Schedule::Shuffled(11), Schedule::Shuffled(12)] {
        let r = flash_on(&Dev::new(s), "", a, &cu, &x);
        for o in 0..5 {
            assert!(r.outs[o] == first.outs[o], "{}: bytes differ under {s:?} from the forward order", NAMES[o]);
        }
    }
}

/// The planted bug fails the comparison and the failure names the kernel it is in; the real
/// source passes the same comparison on the same inputs. The planted text is the real file with
/// exactly the one mutation (and the kernel names' prefix), so the test follows the real kernel.
#[test]
fn a_planted_bug_in_the_backward_fails_the_comparison_naming_its_kernel() {
    let (file, from, to) = PLANTED_MUTATION;
    let real = lora_engine::cuda::kernels::FAMILIES.iter().find(|f| f.file == file).expect("the planted file is a family");
    assert_eq!(real.source.matches(from).count(), 1, "the mutation applies once");
    let planted = real.source.replace(from, to).replace("void flash_", "void planted_flash_").replace("FLASH_WARPS) flash_", "FLASH_WARPS) planted_flash_");
    assert!(planted == PLANTED_BUG.source, "the emulator's planted variant is not the real file with the one mutation");

    let dev = Dev::new(Schedule::Forward);
    let (a, cu) = attn((&[1, 30, 9], 4, 2, 64, 0));
    let x = inputs(&a, 5);
    let want = oracle(a, &cu, &x);
    compare("", a, &flash_on(&dev, "", a, &cu, &x), &want).unwrap_or_else(|e| panic!("the real kernels fail: {e}"));
    let e = compare("planted_", a, &flash_on(&dev, "planted_", a, &cu, &x), &want).expect_err("the planted bug passed the comparison");
    assert!(e.starts_with("planted_flash_bwd_dkv_hd64: dk") || e.starts_with("planted_flash_bwd_dkv_hd64: dv"), "{e}");
    println!("planted bug ({from:?} -> {to:?}) caught: {e}");
}
