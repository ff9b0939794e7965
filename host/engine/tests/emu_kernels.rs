//! Every real kernel family of the CUDA backend, run in the CPU device emulator on a small case,
//! against the CPU backend (the engine's fp32 reference) or a plain host computation, with the
//! launch geometry ops.rs uses; and the race detector on the real kernels: the same launch under
//! forward, reverse and shuffled thread orders gives identical bytes. (The selftest's
//! `--device emu` covers the whole op table through ops.rs; these prove the emulator.)

mod emu_util;

use emu_util::{CpuBackend, Dev, assert_close, cpu_buf, cpu_get, cpu_u32, grid1d, i32a, per_row, ptr, values};
use lora_engine::cuda::emu::{EmuArg, Schedule};
use lora_engine::{AdamW, Attn, Backend, DType, dropout_keep};

const ORDERS: [Schedule; 4] = [Schedule::Forward, Schedule::Reverse, Schedule::Shuffled(11), Schedule::Shuffled(12)];

fn f32a(v: f32) -> EmuArg {
    EmuArg::F32(v)
}
fn size(v: usize) -> EmuArg {
    EmuArg::Size(v)
}

#[test]
fn elementwise_kernels_match_the_host() {
    let dev = Dev::new(Schedule::Forward);
    let n = 1000;
    let mut x = values(n, 1);
    x[..6].copy_from_slice(&[0.0, -0.0, f32::INFINITY, f32::NAN, 1.0 + 2f32.powi(-8), 3.0e38]);
    let y = values(n, 2);

    let px = dev.f32s(&x);
    let pb = dev.out(n * 2);
    dev.run("cast_f32_bf16", grid1d(n), (256, 1, 1), 0, &[ptr(px), ptr(pb), size(n)]);
    let got = dev.get_u16(pb, n);
    for i in 0..n {
        let want = if x[i].is_nan() { 0x7fff } else { half::bf16::from_f32(x[i]).to_bits() };
        assert_eq!(got[i], want, "cast_f32_bf16 [{i}] of {}", x[i]);
    }
    let pf = dev.out(n * 4);
    dev.run("cast_bf16_f32", grid1d(n), (256, 1, 1), 0, &[ptr(pb), ptr(pf), size(n)]);
    let back = dev.get_f32(pf, n);
    assert!((0..n).all(|i| back[i].to_bits() == half::bf16::from_bits(got[i]).to_f32().to_bits()));

    let pfill = dev.out(n * 4);
    dev.run("fill_f32", grid1d(n), (256, 1, 1), 0, &[ptr(pfill), size(n), f32a(2.5)]);
    assert!(dev.get_f32(pfill, n).iter().all(|&v| v == 2.5));
    dev.run("fill_u32", grid1d(n), (256, 1, 1), 0, &[ptr(pfill), size(n), EmuArg::U32(7)]);
    assert!(dev.get_u32(pfill, n).iter().all(|&v| v == 7));
    dev.run("fill_bf16", grid1d(n), (256, 1, 1), 0, &[ptr(pb), size(n), f32a(-1.5)]);
    assert!(dev.get_u16(pb, n).iter().all(|&v| v == half::bf16::from_f32(-1.5).to_bits()));

    let py = dev.f32s(&y);
    dev.run("axpy_f32", grid1d(n), (256, 1, 1), 0, &[f32a(0.5), ptr(px), ptr(py), size(n)]);
    let want: Vec<f32> = (0..n).map(|i| y[i] + 0.5 * x[i]).collect();
    assert_close("axpy_f32", &dev.get_f32(py, n)[6..], &want[6..], 0.0, 0.0);
    dev.run("scale_f32", grid1d(n), (256, 1, 1), 0, &[f32a(-2.0), ptr(py), size(n)]);
    let want: Vec<f32> = want.iter().map(|v| v * -2.0).collect();
    assert_close("scale_f32", &dev.get_f32(py, n)[6..], &want[6..], 0.0, 0.0);

    let (rows, cols) = (7, 13);
    let m = values(rows * cols, 3);
    let bias = values(cols, 4);
    let pm = dev.f32s(&m);
    let pbias = dev.f32s(&bias);
    dev.run("add_bias_f32", grid1d(rows * cols), (256, 1, 1), 0, &[ptr(pbias), ptr(pm), i32a(rows), i32a(cols)]);
    let want: Vec<f32> = (0..rows * cols).map(|i| m[i] + bias[i % cols]).collect();
    assert_close("add_bias_f32", &dev.get_f32(pm, rows * cols), &want, 0.0, 0.0);
    let pbias16 = dev.bf16s(&bias);
    dev.run("add_bias_bf16", grid1d(rows * cols), (256, 1, 1), 0, &[ptr(pbias16), ptr(pm), i32a(rows), i32a(cols)]);
    let want: Vec<f32> = (0..rows * cols).map(|i| want[i] + half::bf16::from_f32(bias[i % cols]).to_f32()).collect();
    assert_close("add_bias_bf16", &dev.get_f32(pm, rows * cols), &want, 0.0, 0.0);

    let a = values(rows * cols, 5);
    let (pa, pout) = (dev.f32s(&a), dev.f32s(&vec![1.0; rows * cols]));
    for acc in [0, 1] {
        dev.run("scale_cols_f32", grid1d(rows * cols), (256, 1, 1), 0, &[ptr(pa), ptr(pbias), ptr(pout), i32a(rows), i32a(cols), EmuArg::I32(acc)]);
    }
    let want: Vec<f32> = (0..rows * cols).map(|i| 2.0 * a[i] * bias[i % cols]).collect();
    assert_close("scale_cols_f32", &dev.get_f32(pout, rows * cols), &want, 1e-7, 1e-6);
    let pdot = dev.f32s(&vec![1.0; cols]);
    dev.run("col_dot_f32", ((cols as u32).div_ceil(128), 1, 1), (128, 1, 1), 0, &[ptr(pa), ptr(pm), ptr(pdot), i32a(rows), i32a(cols), EmuArg::I32(1)]);
    let mm = dev.get_f32(pm, rows * cols);
    let want: Vec<f32> = (0..cols).map(|c| 1.0 + (0..rows).map(|r| a[r * cols + c] * mm[r * cols + c]).sum::<f32>()).collect();
    assert_close("col_dot_f32", &dev.get_f32(pdot, cols), &want, 1e-6, 1e-5);

    let parts = dev.zeros(16 * 8);
    dev.run("sum_squares_f32", (16, 1, 1), (256, 1, 1), 0, &[ptr(py), size(n), ptr(parts)]);
    let yy = dev.get_f32(py, n);
    let want: f64 = yy[6..].iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
    let got: f64 = dev.get_f64(parts, 16).iter().sum::<f64>();
    assert!(got.is_nan(), "x held an infinity and a NaN: the sum of squares is NaN");
    let clean = dev.f32s(&yy[6..]);
    dev.run("sum_squares_f32", (16, 1, 1), (256, 1, 1), 0, &[ptr(clean), size(n - 6), ptr(parts)]);
    let got: f64 = dev.get_f64(parts, 16).iter().sum::<f64>();
    assert!((got - want).abs() <= 1e-12 * want, "sum_squares_f32 {got} vs {want}");

    let pq = dev.out(n * 4);
    dev.run("div_f32", grid1d(n), (256, 1, 1), 0, &[ptr(px), ptr(clean), ptr(pq), size(n - 6)]);
    let want: Vec<f32> = (0..n - 6).map(|i| x[i] / yy[6 + i]).collect();
    let got = dev.get_f32(pq, n - 6);
    assert!((0..n - 6).all(|i| got[i].to_bits() == want[i].to_bits()), "div_f32");
}

#[test]
fn rmsnorm_kernels_match_the_cpu_backend() {
    let cpu = CpuBackend::new();
    let dev = Dev::new(Schedule::Forward);
    let (rows, dim, eps) = (5, 200, 1e-5);
    let x = values(rows * dim, 6);
    let w = values(dim, 7);
    let dy = values(rows * dim, 8);
    for (kernel, wk) in [("f32", w.clone()), ("bf16", bf16_rounded(&w))] {
        // The reference gets the weight the kernel sees (bf16-rounded for the bf16 kernel).
        let (cx, cw, cdy) = (cpu_buf(&cpu, &x), cpu_buf(&cpu, &wk), cpu_buf(&cpu, &dy));
        let (mut cy, mut crstd) = (cpu.zeros(rows * dim, DType::F32).unwrap(), cpu.zeros(rows, DType::F32).unwrap());
        cpu.rmsnorm_fwd(&cx, &cw, &mut cy, &mut crstd, rows, dim, eps).unwrap();
        let mut cdx = cpu_buf(&cpu, &vec![0.5; rows * dim]);
        cpu.rmsnorm_bwd(&cdy, &cx, &cw, &crstd, &mut cdx, rows, dim, true).unwrap();

        let pw = if kernel == "f32" { dev.f32s(&w) } else { dev.bf16s(&w) };
        let (px, pdy) = (dev.f32s(&x), dev.f32s(&dy));
        let (py, prstd) = (dev.out(rows * dim * 4), dev.out(rows * 4));
        let fwd = format!("rmsnorm_fwd_{kernel}");
        dev.run(&fwd, (rows as u32, 1, 1), per_row(dim), 0, &[ptr(px), ptr(pw), ptr(py), ptr(prstd), i32a(rows), i32a(dim), f32a(eps)]);
        let pdx = dev.f32s(&vec![0.5; rows * dim]);
        let bwd = format!("rmsnorm_bwd_{kernel}");
        dev.run(&bwd, (rows as u32, 1, 1), per_row(dim), 0, &[ptr(pdy), ptr(px), ptr(pw), ptr(prstd), ptr(pdx), i32a(rows), i32a(dim), EmuArg::I32(1)]);
        assert_close(&fwd, &dev.get_f32(py, rows * dim), &cpu_get(&cpu, &cy), 1e-6, 1e-5);
        assert_close("rstd", &dev.get_f32(prstd, rows), &cpu_get(&cpu, &crstd), 0.0, 1e-5);
        assert_close(&bwd, &dev.get_f32(pdx, rows * dim), &cpu_get(&cpu, &cdx), 1e-5, 1e-4);
    }
}

fn bf16_rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

#[test]
fn rope_matches_the_cpu_backend_both_ways() {
    let cpu = CpuBackend::new();
    let dev = Dev::new(Schedule::Forward);
    let (tokens, heads, hd) = (9, 3, 16);
    let x = values(tokens * heads * hd, 9);
    let pos: Vec<u32> = (0..tokens as u32).map(|t| t % 5).collect();
    // Whole heads, and partial rotary (12 of 16 dims) with a LongRoPE cos/sin factor.
    for (rd, scale) in [(hd, 1.0f32), (12, 1.19)] {
        let inv: Vec<f32> = (0..rd / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / rd as f32)).collect();
        for inverse in [false, true] {
            let mut cx = cpu_buf(&cpu, &x);
            cpu.rope_partial(&mut cx, &cpu_u32(&cpu, &pos), &cpu_buf(&cpu, &inv), tokens, heads, hd, rd, scale, inverse).unwrap();
            let px = dev.f32s(&x);
            let n = tokens * heads * rd / 2;
            dev.run("rope_f32", grid1d(n), (256, 1, 1), 0, &[ptr(px), ptr(dev.u32s(&pos)), ptr(dev.f32s(&inv)), i32a(tokens), i32a(heads), i32a(hd), i32a(rd), EmuArg::F32(scale), EmuArg::I32(inverse as i32)]);
            assert_close("rope_f32", &dev.get_f32(px, tokens * heads * hd), &cpu_get(&cpu, &cx), 1e-6, 1e-5);
        }
    }
}

/// The attention shape of these tests: 3 documents (29 + 1 + 34 tokens), 4 query heads sharing
/// 2 kv heads, head_dim 40 (not a multiple of 32: the lanes' column split has a tail).
fn attn() -> (Attn, Vec<u32>) {
    let cu = vec![0u32, 29, 30, 64];
    let a = Attn { tokens: 64, n_docs: 3, max_seqlen: 34, n_heads: 4, n_kv_heads: 2, head_dim: 40, scale: 1.0 / 40f32.sqrt(), window: 0 };
    (a, cu)
}

struct AttnRun {
    out: Vec<u8>,
    lse: Vec<u8>,
    dq: Vec<u8>,
    dk: Vec<u8>,
    dv: Vec<u8>,
}

/// The four attention kernels with ops.rs's geometry and shared-memory sizes.
fn attention_on(dev: &Dev, a: Attn, cu: &[u32], q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> AttnRun {
    let (t, h, hkv, hd) = (a.tokens, a.n_heads, a.n_kv_heads, a.head_dim);
    let (pq, pk, pv, pcu, pdo) = (dev.f32s(q), dev.f32s(k), dev.f32s(v), dev.u32s(cu), dev.f32s(dout));
    let (pout, plse, pdelta) = (dev.out(t * h * hd * 4), dev.out(h * t * 4), dev.out(h * t * 4));
    let (pdq, pdk, pdv) = (dev.out(t * h * hd * 4), dev.out(t * hkv * hd * 4), dev.out(t * hkv * hd * 4));
    let sizes = [i32a(t), i32a(a.n_docs), i32a(h), i32a(hkv), i32a(hd), f32a(a.scale), i32a(a.window)];
    let grid = ((t as u32).div_ceil(4), h as u32, 1);
    let mut args = vec![ptr(pq), ptr(pk), ptr(pv), ptr(pcu), ptr(pout), ptr(plse)];
    args.extend(sizes);
    dev.run("attention_fwd_f32", grid, (128, 1, 1), ((2 * 32 * (hd + 1) + 4 * hd) * 4) as u32, &args);
    dev.run("attention_bwd_delta_f32", ((t * h).div_ceil(8) as u32, 1, 1), (256, 1, 1), 0, &[ptr(pout), ptr(pdo), ptr(pdelta), i32a(t), i32a(h), i32a(hd)]);
    let common = [ptr(pq), ptr(pk), ptr(pv), ptr(pcu), ptr(plse), ptr(pdelta), ptr(pdo)];
    let mut args = common.to_vec();
    args.push(ptr(pdq));
    args.extend(sizes);
    dev.run("attention_bwd_dq_f32", grid, (128, 1, 1), ((2 * 32 * (hd + 1) + 8 * hd) * 4) as u32, &args);
    let mut args = common.to_vec();
    args.extend([ptr(pdk), ptr(pdv)]);
    args.extend(sizes);
    let grid_kv = ((t as u32).div_ceil(4), hkv as u32, 1);
    dev.run("attention_bwd_dkv_f32", grid_kv, (128, 1, 1), ((2 * 32 * (hd + 1) + 64 + 8 * hd) * 4) as u32, &args);
    AttnRun {
        out: dev.get(pout, t * h * hd * 4),
        lse: dev.get(plse, h * t * 4),
        dq: dev.get(pdq, t * h * hd * 4),
        dk: dev.get(pdk, t * hkv * hd * 4),
        dv: dev.get(pdv, t * hkv * hd * 4),
    }
}

fn as_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn attention_inputs(a: Attn) -> [Vec<f32>; 4] {
    let nq = a.tokens * a.n_heads * a.head_dim;
    let nkv = a.tokens * a.n_kv_heads * a.head_dim;
    [values(nq, 10), values(nkv, 11), values(nkv, 12), values(nq, 13)]
}

/// Plain causal, and a sliding window of 7 (shorter than two of the documents, so it cuts them).
#[test]
fn attention_forward_and_backward_match_the_cpu_backend() {
    for window in [0, 7] {
        let (a, cu) = attn();
        attention_matches_cpu(Attn { window, ..a }, &cu);
    }
}

fn attention_matches_cpu(a: Attn, cu: &[u32]) {
    let cpu = CpuBackend::new();
    let [q, k, v, dout] = attention_inputs(a);
    let (cq, ck, cv, ccu, cdo) = (cpu_buf(&cpu, &q), cpu_buf(&cpu, &k), cpu_buf(&cpu, &v), cpu_u32(&cpu, cu), cpu_buf(&cpu, &dout));
    let (nq, nkv) = (q.len(), k.len());
    let mut cout = cpu.zeros(nq, DType::F32).unwrap();
    let mut clse = cpu.zeros(a.n_heads * a.tokens, DType::F32).unwrap();
    cpu.attention_fwd(a, &cq, &ck, &cv, &ccu, &mut cout, &mut clse).unwrap();
    let (mut cdq, mut cdk, mut cdv) = (cpu.zeros(nq, DType::F32).unwrap(), cpu.zeros(nkv, DType::F32).unwrap(), cpu.zeros(nkv, DType::F32).unwrap());
    cpu.attention_bwd(a, &cq, &ck, &cv, &ccu, &cout, &clse, &cdo, &mut cdq, &mut cdk, &mut cdv).unwrap();

    let dev = Dev::new(Schedule::Forward);
    let r = attention_on(&dev, a, cu, &q, &k, &v, &dout);
    assert_close("attention out", &as_f32(&r.out), &cpu_get(&cpu, &cout), 1e-6, 1e-5);
    assert_close("attention lse", &as_f32(&r.lse), &cpu_get(&cpu, &clse), 1e-6, 1e-5);
    assert_close("attention dq", &as_f32(&r.dq), &cpu_get(&cpu, &cdq), 1e-5, 1e-4);
    assert_close("attention dk", &as_f32(&r.dk), &cpu_get(&cpu, &cdk), 1e-5, 1e-4);
    assert_close("attention dv", &as_f32(&r.dv), &cpu_get(&cpu, &cdv), 1e-5, 1e-4);
}

#[test]
fn swiglu_matches_the_cpu_backend() {
    let cpu = CpuBackend::new();
    let dev = Dev::new(Schedule::Forward);
    let n = 700;
    let (g, u, dh) = (values(n, 14), values(n, 15), values(n, 16));
    let mut ch = cpu.zeros(n, DType::F32).unwrap();
    let (cg, cu, cdh) = (cpu_buf(&cpu, &g), cpu_buf(&cpu, &u), cpu_buf(&cpu, &dh));
    cpu.swiglu_fwd(&cg, &cu, &mut ch).unwrap();
    let (mut cdg, mut cdu) = (cpu.zeros(n, DType::F32).unwrap(), cpu.zeros(n, DType::F32).unwrap());
    cpu.swiglu_bwd(&cg, &cu, &cdh, &mut cdg, &mut cdu).unwrap();
    let (pg, pu, pdh) = (dev.f32s(&g), dev.f32s(&u), dev.f32s(&dh));
    let (ph, pdg, pdu) = (dev.out(n * 4), dev.out(n * 4), dev.out(n * 4));
    dev.run("swiglu_fwd_f32", grid1d(n), (256, 1, 1), 0, &[ptr(pg), ptr(pu), ptr(ph), size(n)]);
    dev.run("swiglu_bwd_f32", grid1d(n), (256, 1, 1), 0, &[ptr(pg), ptr(pu), ptr(pdh), ptr(pdg), ptr(pdu), size(n)]);
    assert_close("swiglu h", &dev.get_f32(ph, n), &cpu_get(&cpu, &ch), 1e-7, 1e-5);
    assert_close("swiglu dgate", &dev.get_f32(pdg, n), &cpu_get(&cpu, &cdg), 1e-7, 1e-5);
    assert_close("swiglu dup", &dev.get_f32(pdu, n), &cpu_get(&cpu, &cdu), 1e-7, 1e-5);
}

#[test]
fn geglu_matches_the_cpu_backend() {
    let cpu = CpuBackend::new();
    let dev = Dev::new(Schedule::Reverse);
    let n = 700;
    let (g, u, dh) = (values(n, 17), values(n, 18), values(n, 19));
    let mut ch = cpu.zeros(n, DType::F32).unwrap();
    let (cg, cu, cdh) = (cpu_buf(&cpu, &g), cpu_buf(&cpu, &u), cpu_buf(&cpu, &dh));
    cpu.geglu_fwd(&cg, &cu, &mut ch).unwrap();
    let (mut cdg, mut cdu) = (cpu.zeros(n, DType::F32).unwrap(), cpu.zeros(n, DType::F32).unwrap());
    cpu.geglu_bwd(&cg, &cu, &cdh, &mut cdg, &mut cdu).unwrap();
    let (pg, pu, pdh) = (dev.f32s(&g), dev.f32s(&u), dev.f32s(&dh));
    let (ph, pdg, pdu) = (dev.out(n * 4), dev.out(n * 4), dev.out(n * 4));
    dev.run("geglu_fwd_f32", grid1d(n), (256, 1, 1), 0, &[ptr(pg), ptr(pu), ptr(ph), size(n)]);
    dev.run("geglu_bwd_f32", grid1d(n), (256, 1, 1), 0, &[ptr(pg), ptr(pu), ptr(pdh), ptr(pdg), ptr(pdu), size(n)]);
    assert_close("geglu h", &dev.get_f32(ph, n), &cpu_get(&cpu, &ch), 1e-6, 1e-5);
    assert_close("geglu dgate", &dev.get_f32(pdg, n), &cpu_get(&cpu, &cdg), 1e-6, 1e-5);
    assert_close("geglu dup", &dev.get_f32(pdu, n), &cpu_get(&cpu, &cdu), 1e-6, 1e-5);
}

#[test]
fn embedding_gathers_scatters_and_names_the_first_bad_id() {
    let cpu = CpuBackend::new();
    let dev = Dev::new(Schedule::Reverse);
    let (vocab, dim, tokens, scale) = (11, 70, 6, 0.5);
    let table = values(vocab * dim, 17);
    let ids = [3u32, 10, 0, 3, 7, 1];
    for (dtype, ptab, tref) in [("f32", dev.f32s(&table), table.clone()), ("bf16", dev.bf16s(&table), bf16_rounded(&table))] {
        let mut cout = cpu.zeros(tokens * dim, DType::F32).unwrap();
        cpu.embedding(&cpu_u32(&cpu, &ids), &cpu_buf(&cpu, &tref), &mut cout, tokens, dim, scale).unwrap();
        let (pids, pout, bad) = (dev.u32s(&ids), dev.out(tokens * dim * 4), dev.u32s(&[u32::MAX]));
        let k = format!("embedding_fwd_{dtype}");
        dev.run(&k, (tokens as u32, 1, 1), per_row(dim), 0, &[ptr(pids), ptr(ptab), ptr(pout), i32a(tokens), i32a(dim), i32a(vocab), f32a(scale), ptr(bad)]);
        assert_eq!(dev.get_u32(bad, 1), [u32::MAX], "{k}: no bad id");
        assert_close(&k, &dev.get_f32(pout, tokens * dim), &cpu_get(&cpu, &cout), 0.0, 0.0);
    }
    // Ids 11 and 12 are outside the vocabulary: the smallest position (2) is recorded, rows zeroed.
    let ids_bad = [3u32, 4, 11, 0, 12, 1];
    let (pids, pout, bad) = (dev.u32s(&ids_bad), dev.out(tokens * dim * 4), dev.u32s(&[u32::MAX]));
    dev.run("embedding_fwd_f32", (tokens as u32, 1, 1), per_row(dim), 0, &[ptr(pids), ptr(dev.f32s(&table)), ptr(pout), i32a(tokens), i32a(dim), i32a(vocab), f32a(scale), ptr(bad)]);
    assert_eq!(dev.get_u32(bad, 1), [2]);
    assert!(dev.get_f32(pout, tokens * dim)[2 * dim..3 * dim].iter().all(|&v| v == 0.0));

    let dout = values(tokens * dim, 18);
    let pdt = dev.zeros(vocab * dim * 4);
    dev.run("embedding_bwd_f32", ((dim as u32).div_ceil(128), 1, 1), (128, 1, 1), 0, &[ptr(dev.u32s(&ids)), ptr(dev.f32s(&dout)), ptr(pdt), i32a(tokens), i32a(dim), i32a(vocab), f32a(scale)]);
    let mut want = vec![0f32; vocab * dim];
    for (t, &id) in ids.iter().enumerate() {
        for i in 0..dim {
            want[id as usize * dim + i] += dout[t * dim + i] * scale;
        }
    }
    assert_close("embedding_bwd_f32", &dev.get_f32(pdt, vocab * dim), &want, 0.0, 0.0);
}

#[test]
fn cross_entropy_loss_and_gradient_match_the_host() {
    let dev = Dev::new(Schedule::Shuffled(5));
    let (rows, vocab, ls, gs) = (5usize, 300usize, 0.7f32, 0.25f32);
    let logits: Vec<f32> = values(rows * vocab, 19).iter().map(|v| v * 6.0).collect();
    let targets = [4u32, 299, u32::MAX, 0, 123];
    let (pl, pt, ploss, pd) = (dev.f32s(&logits), dev.u32s(&targets), dev.out(rows * 4), dev.out(rows * vocab * 2));
    let threads = (vocab.div_ceil(32) * 32).min(1024) as u32;
    dev.run("cross_entropy_fwd_bwd_f32", (rows as u32, 1, 1), (threads, 1, 1), 0, &[ptr(pl), ptr(pt), ptr(ploss), ptr(pd), i32a(rows), i32a(vocab), f32a(ls), f32a(gs)]);
    let loss = dev.get_f32(ploss, rows);
    let d = dev.get_u16(pd, rows * vocab);
    for r in 0..rows {
        let z: Vec<f64> = (0..vocab).map(|i| f64::from(logits[r * vocab + i]) * f64::from(ls)).collect();
        if targets[r] == u32::MAX {
            assert_eq!(loss[r], 0.0);
            assert!(d[r * vocab..(r + 1) * vocab].iter().all(|&b| b == 0), "ignored row's gradient is zero");
            continue;
        }
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        let t = targets[r] as usize;
        assert!((f64::from(loss[r]) - (lse - z[t])).abs() < 1e-5 * (lse - z[t]).abs().max(1.0), "row {r} loss");
        for i in 0..vocab {
            let p = (z[i] - lse).exp() - if i == t { 1.0 } else { 0.0 };
            let want = (f64::from(gs) * f64::from(ls) * p) as f32;
            let got = half::bf16::from_bits(d[r * vocab + i]).to_f32();
            assert!((got - want).abs() <= 1e-7 + 8e-3 * want.abs(), "dlogits [{r}][{i}] {got} vs {want}");
        }
    }
}

#[test]
fn dropout_and_dora_norm_match_the_cpu_backend() {
    let cpu = CpuBackend::new();
    let dev = Dev::new(Schedule::Forward);
    let n = 999;
    let x = values(n, 20);
    let (p, seed) = (0.3f32, 0xabcdefu64);
    let pout = dev.out(n * 4);
    dev.run("dropout_f32", grid1d(n), (256, 1, 1), 0, &[ptr(dev.f32s(&x)), ptr(pout), size(n), f32a(p), EmuArg::U64(seed)]);
    let got = dev.get_f32(pout, n);
    for i in 0..n {
        let want = if dropout_keep(seed, i as u64, p) { x[i] / (1.0 - p) } else { 0.0 };
        assert!((got[i] - want).abs() <= 1e-6 * want.abs(), "dropout [{i}]");
    }

    let (out_f, in_f, r, scale) = (6, 50, 4, 1.5);
    let (w, a, b) = (values(out_f * in_f, 21), values(r * in_f, 22), values(out_f * r, 23));
    for (k, pw, wref) in [("dora_weight_norm_f32", dev.f32s(&w), w.clone()), ("dora_weight_norm_bf16", dev.bf16s(&w), bf16_rounded(&w))] {
        let mut cnorm = cpu.zeros(out_f, DType::F32).unwrap();
        cpu.dora_weight_norm(&cpu_buf(&cpu, &wref), &cpu_buf(&cpu, &a), &cpu_buf(&cpu, &b), scale, &mut cnorm, out_f, in_f, r).unwrap();
        let pn = dev.out(out_f * 4);
        dev.run(k, (out_f as u32, 1, 1), per_row(in_f), 0, &[ptr(pw), ptr(dev.f32s(&a)), ptr(dev.f32s(&b)), f32a(scale), ptr(pn), i32a(out_f), i32a(in_f), i32a(r)]);
        assert_close(k, &dev.get_f32(pn, out_f), &cpu_get(&cpu, &cnorm), 1e-6, 1e-5);
    }
}

#[test]
fn adamw_matches_the_cpu_backend() {
    let cpu = CpuBackend::new();
    let dev = Dev::new(Schedule::Forward);
    let n = 513;
    let (p0, g, m0, v0) = (values(n, 24), values(n, 25), values(n, 26), values(n, 27).iter().map(|v| v.abs()).collect::<Vec<_>>());
    let o = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 3, grad_scale: 0.5 };
    let (mut cp, mut cm, mut cv) = (cpu_buf(&cpu, &p0), cpu_buf(&cpu, &m0), cpu_buf(&cpu, &v0));
    cpu.adamw(o, &mut cp, &cpu_buf(&cpu, &g), &mut cm, &mut cv).unwrap();
    let step_size = f64::from(o.lr) / (1.0 - f64::from(o.beta1).powi(3));
    let bc2 = (1.0 - f64::from(o.beta2).powi(3)).sqrt();
    let (pp, pm, pv) = (dev.f32s(&p0), dev.f32s(&m0), dev.f32s(&v0));
    dev.run("adamw_f32", grid1d(n), (256, 1, 1), 0, &[
        ptr(pp), ptr(dev.f32s(&g)), ptr(pm), ptr(pv), size(n), f32a(o.lr), f32a(o.beta1), f32a(o.beta2), f32a(o.eps),
        f32a(o.weight_decay), f32a(step_size as f32), f32a(bc2 as f32), f32a(o.grad_scale),
    ]);
    assert_close("adamw param", &dev.get_f32(pp, n), &cpu_get(&cpu, &cp), 1e-7, 1e-5);
    assert_close("adamw m", &dev.get_f32(pm, n), &cpu_get(&cpu, &cm), 1e-7, 1e-5);
    assert_close("adamw v", &dev.get_f32(pv, n), &cpu_get(&cpu, &cv), 1e-7, 1e-5);
}

/// The race detector on the real kernels: under four thread and block orders, attention forward
/// and backward, RMSNorm, cross-entropy and the sum of squares give identical bytes (no kernel
/// depends on an order its barriers do not enforce; also the determinism the engine promises).
#[test]
fn real_kernels_give_identical_bytes_under_every_order() {
    let (a, cu) = attn();
    let [q, k, v, dout] = attention_inputs(a);
    let mut first: Option<Vec<Vec<u8>>> = None;
    for s in ORDERS {
        let dev = Dev::new(s);
        let r = attention_on(&dev, a, &cu, &q, &k, &v, &dout);
        let mut bytes = vec![r.out, r.lse, r.dq, r.dk, r.dv];

        let (rows, dim) = (6, 300);
        let (px, pw) = (dev.f32s(&values(rows * dim, 30)), dev.f32s(&values(dim, 31)));
        let (py, prstd) = (dev.out(rows * dim * 4), dev.out(rows * 4));
        dev.run("rmsnorm_fwd_f32", (rows as u32, 1, 1), per_row(dim), 0, &[ptr(px), ptr(pw), ptr(py), ptr(prstd), i32a(rows), i32a(dim), f32a(1e-6)]);
        bytes.push(dev.get(py, rows * dim * 4));

        let vocab = 1000;
        let (pl, pt) = (dev.f32s(&values(rows * vocab, 32)), dev.u32s(&[1, 2, 3, 4, 5, 999]));
        let (ploss, pd) = (dev.out(rows * 4), dev.out(rows * vocab * 2));
        dev.run("cross_entropy_fwd_bwd_f32", (rows as u32, 1, 1), (1000u32.div_ceil(32) * 32, 1, 1), 0, &[ptr(pl), ptr(pt), ptr(ploss), ptr(pd), i32a(rows), i32a(vocab), f32a(1.0), f32a(1.0)]);
        bytes.push(dev.get(ploss, rows * 4));
        bytes.push(dev.get(pd, rows * vocab * 2));

        let parts = dev.out(64 * 8);
        dev.run("sum_squares_f32", (64, 1, 1), (256, 1, 1), 0, &[ptr(pl), size(rows * vocab), ptr(parts)]);
        bytes.push(dev.get(parts, 64 * 8));

        match &first {
            None => first = Some(bytes),
            Some(f) => {
                for (i, (x, y)) in f.iter().zip(&bytes).enumerate() {
                    assert!(x == y, "output {i} differs between {:?} and {s:?}", ORDERS[0]);
                }
            }
        }
    }
}

/// `Backend::alloc` on the emulated CUDA backend: no memset (`zeros` costs one, `alloc` none),
/// and every element is NaN (f32 and bf16) until written. So an op that reads its output before
/// writing it shows: rmsnorm_bwd told to accumulate into an `alloc`ed dx (what a wrong
/// `accumulate` flag in layer.rs would do) gives NaN in every element, while the same op
/// overwriting it matches the CPU backend.
#[test]
fn alloc_skips_the_memset_and_a_read_before_write_is_nan() {
    let emu = lora_engine::cuda::open_emulated().unwrap();
    let c0 = emu.device_counts().unwrap();
    let a = emu.alloc(300, DType::F32).unwrap();
    let b = emu.alloc(301, DType::BF16).unwrap();
    assert_eq!(emu.device_counts().unwrap().since(c0).memsets, 0, "alloc memset its buffers");
    assert!(emu.download_f32(&a).unwrap().iter().all(|x| x.is_nan()), "fresh f32 memory is not NaN");
    assert!(emu.download_f32(&b).unwrap().iter().all(|x| x.is_nan()), "fresh bf16 memory is not NaN");
    let c1 = emu.device_counts().unwrap();
    let z = emu.zeros(300, DType::F32).unwrap();
    let d = emu.device_counts().unwrap().since(c1);
    assert_eq!((d.memsets, d.memset_bytes), (1, 1200));
    assert!(emu.download_f32(&z).unwrap().iter().all(|&x| x == 0.0));

    let cpu = CpuBackend::new();
    let (rows, dim, eps) = (3, 100, 1e-5);
    let (x, w, dy) = (values(rows * dim, 21), values(dim, 22), values(rows * dim, 23));
    let up = |v: &[f32]| emu.upload(lora_engine::HostData::F32(v), DType::F32).unwrap();
    let (ex, ew, edy) = (up(&x), up(&w), up(&dy));
    let (mut ey, mut erstd) = (emu.alloc(rows * dim, DType::F32).unwrap(), emu.alloc(rows, DType::F32).unwrap());
    emu.rmsnorm_fwd(&ex, &ew, &mut ey, &mut erstd, rows, dim, eps).unwrap();
    let (cx, cw, cdy) = (cpu_buf(&cpu, &x), cpu_buf(&cpu, &w), cpu_buf(&cpu, &dy));
    let (mut cy, mut crstd) = (cpu.alloc(rows * dim, DType::F32).unwrap(), cpu.alloc(rows, DType::F32).unwrap());
    cpu.rmsnorm_fwd(&cx, &cw, &mut cy, &mut crstd, rows, dim, eps).unwrap();
    assert_close("rmsnorm_fwd into alloc", &emu.download_f32(&ey).unwrap(), &cpu_get(&cpu, &cy), 1e-6, 1e-5);
    let mut cdx = cpu.alloc(rows * dim, DType::F32).unwrap();
    cpu.rmsnorm_bwd(&cdy, &cx, &cw, &crstd, &mut cdx, rows, dim, false).unwrap();
    let mut edx = emu.alloc(rows * dim, DType::F32).unwrap();
    emu.rmsnorm_bwd(&edy, &ex, &ew, &erstd, &mut edx, rows, dim, false).unwrap();
    assert_close("rmsnorm_bwd overwriting alloc", &emu.download_f32(&edx).unwrap(), &cpu_get(&cpu, &cdx), 1e-5, 1e-4);
    let mut planted = emu.alloc(rows * dim, DType::F32).unwrap();
    emu.rmsnorm_bwd(&edy, &ex, &ew, &erstd, &mut planted, rows, dim, true).unwrap();
    assert!(emu.download_f32(&planted).unwrap().iter().all(|x| x.is_nan()), "accumulating into fresh memory did not show");
}

/// SwiGLU and GeGLU on bf16 activations through the backend (ops.rs routes bf16 buffers to the
/// `_bf16` kernels: 16-byte packs of eight, then the n % 8 tail) against the bf16-faithful CPU
/// oracle, which rounds each output once where the kernels store it: every element within one
/// bf16 ulp (t = |ref| 2^-8; the f32 math differs only in expf's last bits) and at least 97% bit
/// identical (a second rounding point, as in rounding act(gate) before the product, breaks that).
/// Lengths: packs and a tail, packs only, tail only. Mixed dtypes are refused by name.
#[test]
fn gated_activations_on_bf16_buffers_match_the_bf16_oracle() {
    let emu = lora_engine::cuda::open_emulated().unwrap();
    let cpu = CpuBackend::cuda_numerics();
    for n in [301usize, 64, 5] {
        let (g, u, dh) = (values(n, 31), values(n, 32), values(n, 33));
        let run = |be: &dyn Backend, geglu: bool| -> Vec<Vec<f32>> {
            let up16 = |v: &[f32]| be.upload(lora_engine::HostData::F32(v), DType::BF16).unwrap();
            let (bg, bu, bdh) = (up16(&g), up16(&u), up16(&dh));
            let mut h = be.alloc(n, DType::BF16).unwrap();
            let (mut dg, mut du) = (be.alloc(n, DType::BF16).unwrap(), be.alloc(n, DType::BF16).unwrap());
            if geglu {
                be.geglu_fwd(&bg, &bu, &mut h).unwrap();
                be.geglu_bwd(&bg, &bu, &bdh, &mut dg, &mut du).unwrap();
            } else {
                be.swiglu_fwd(&bg, &bu, &mut h).unwrap();
                be.swiglu_bwd(&bg, &bu, &bdh, &mut dg, &mut du).unwrap();
            }
            [h, dg, du].iter().map(|b| be.download_f32(b).unwrap()).collect()
        };
        for geglu in [false, true] {
            let (got, want) = (run(emu.as_ref(), geglu), run(&cpu, geglu));
            for ((what, got), want) in ["h", "dgate", "dup"].iter().zip(&got).zip(&want) {
                let what = format!("{} {what} n={n}", if geglu { "geglu" } else { "swiglu" });
                assert_close(&what, got, want, 0.0, 1.0 / 256.0);
                let same = got.iter().zip(want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                assert!(same * 100 >= n * 97, "{what}: only {same} of {n} elements bit-identical to the oracle");
            }
        }
    }
    let f = emu.alloc(8, DType::F32).unwrap();
    let b = emu.alloc(8, DType::BF16).unwrap();
    let mut h = emu.alloc(8, DType::BF16).unwrap();
    let e = emu.swiglu_fwd(&f, &b, &mut h).unwrap_err().to_string();
    assert!(e.contains("`up` is BF16 but `gate` is F32"), "{e}");
}
