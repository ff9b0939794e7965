//! `cargo run -p lora-engine --example emu_speed [-- --tokens 256 --reps 5]`
//! How fast the CPU device emulator runs, side by side: the cost of one thread reaching one
//! `__syncthreads` with the native x86_64 switch and with ucontext, launches per second of a
//! trivial kernel, and attention forward/backward at a small shape (with the CPU backend's fp32
//! attention on the same shape for scale). Times are CPU seconds of the process, best of `--reps`
//! (the emulator runs one block at a time on the calling thread; the CPU backend's attention uses
//! every core, and its CPU time counts them all).

use lora_engine::cpu::CpuBackend;
use lora_engine::cuda::emu::{ContextSwitch, EmuArg, EmuOptions, Emulator};
use lora_engine::{Attn, Backend, DType, HostData};

fn fail(msg: &str) -> ! {
    eprintln!("emu_speed: {msg}");
    std::process::exit(2)
}

fn emulator(cs: ContextSwitch) -> Emulator {
    Emulator::new(EmuOptions { context_switch: cs, ..Default::default() }).unwrap_or_else(|e| fail(&e.to_string()))
}

fn upload(emu: &Emulator, x: &[f32]) -> u64 {
    let p = emu.alloc(x.len() * 4).unwrap_or_else(|e| fail(&e.to_string()));
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    emu.copy_htod(p, &bytes).unwrap_or_else(|e| fail(&e.to_string()));
    p
}

fn launch(emu: &Emulator, k: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[EmuArg]) {
    emu.launch_args(k, grid, block, smem, args).unwrap_or_else(|e| fail(&e.to_string()));
}

/// CPU seconds this process has used (every thread): on a shared machine the wall time would
/// also count other processes.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        fail("clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best of `reps` CPU times of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = cpu_seconds();
            f();
            cpu_seconds() - t
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str, d: usize| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse().unwrap_or_else(|_| fail(&format!("{k} wants a number, got {v}"))))
            .unwrap_or(d)
    };
    let (tokens, reps) = (get("--tokens", 256), get("--reps", 5));

    println!("{:<44} {:>14} {:>14}", "", "native switch", "ucontext");
    let (blocks, threads, barriers) = (8u32, 256u32, 200i32);
    let mut per_barrier = Vec::new();
    let mut per_launch = Vec::new();
    for cs in [ContextSwitch::Native, ContextSwitch::Ucontext] {
        let emu = emulator(cs);
        let out = emu.alloc((blocks * threads) as usize * 4).unwrap_or_else(|e| fail(&e.to_string()));
        let args = [EmuArg::Ptr(out), EmuArg::I32(barriers)];
        let t = best(reps, || launch(&emu, "probe_barrier_loop", (blocks, 1, 1), (threads, 1, 1), 0, &args));
        per_barrier.push(t * 1e9 / f64::from(blocks * threads) / f64::from(barriers));
        let x = upload(&emu, &[1.0; 256]);
        let axpy = [EmuArg::F32(1.0), EmuArg::Ptr(x), EmuArg::Ptr(x), EmuArg::Size(256)];
        let n = 200;
        let t = best(reps, || (0..n).for_each(|_| launch(&emu, "axpy_f32", (1, 1, 1), (256, 1, 1), 0, &axpy)));
        per_launch.push(f64::from(n) / t);
    }
    println!("{:<44} {:>11.1} ns {:>11.1} ns", "one thread at one __syncthreads", per_barrier[0], per_barrier[1]);
    println!("{:<44} {:>12.0}/s {:>12.0}/s", "launches of axpy_f32 (1 block of 256)", per_launch[0], per_launch[1]);

    // Attention at a small shape: 2 documents, 8 heads over 2 kv heads, head_dim 64.
    let (h, hkv, hd) = (8usize, 2usize, 64usize);
    let cu = [0u32, (tokens / 2) as u32, tokens as u32];
    let a = Attn { tokens, n_docs: 2, max_seqlen: tokens / 2, n_heads: h, n_kv_heads: hkv, head_dim: hd, scale: 1.0 / (hd as f32).sqrt(), window: 0 };
    let fill = |n: usize, s: u32| (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) as f32 / 16777216.0 - 0.5).collect::<Vec<f32>>();
    let (q, k, v, dout) = (fill(tokens * h * hd, 1), fill(tokens * hkv * hd, 2), fill(tokens * hkv * hd, 3), fill(tokens * h * hd, 4));
    let emu = emulator(ContextSwitch::Native);
    let (pq, pk, pv, pdo) = (upload(&emu, &q), upload(&emu, &k), upload(&emu, &v), upload(&emu, &dout));
    let pcu = emu.alloc(12).unwrap_or_else(|e| fail(&e.to_string()));
    emu.copy_htod(pcu, &cu.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>()).unwrap_or_else(|e| fail(&e.to_string()));
    let alloc = |n: usize| emu.alloc(n * 4).unwrap_or_else(|e| fail(&e.to_string()));
    let (pout, plse, pdelta, pdq, pdk, pdv) = (alloc(tokens * h * hd), alloc(h * tokens), alloc(h * tokens), alloc(tokens * h * hd), alloc(tokens * hkv * hd), alloc(tokens * hkv * hd));
    let sizes = [EmuArg::I32(tokens as i32), EmuArg::I32(2), EmuArg::I32(h as i32), EmuArg::I32(hkv as i32), EmuArg::I32(hd as i32), EmuArg::F32(a.scale)];
    let grid = ((tokens as u32).div_ceil(4), h as u32, 1);
    let mut fwd_args = vec![EmuArg::Ptr(pq), EmuArg::Ptr(pk), EmuArg::Ptr(pv), EmuArg::Ptr(pcu), EmuArg::Ptr(pout), EmuArg::Ptr(plse)];
    fwd_args.extend(sizes);
    let fwd_smem = ((2 * 32 * (hd + 1) + 4 * hd) * 4) as u32;
    let t_fwd = best(reps, || launch(&emu, "attention_fwd_f32", grid, (128, 1, 1), fwd_smem, &fwd_args));
    let t_bwd = best(reps, || {
        launch(&emu, "attention_bwd_delta_f32", ((tokens * h).div_ceil(8) as u32, 1, 1), (256, 1, 1), 0, &[
            EmuArg::Ptr(pout), EmuArg::Ptr(pdo), EmuArg::Ptr(pdelta), EmuArg::I32(tokens as i32), EmuArg::I32(h as i32), EmuArg::I32(hd as i32),
        ]);
        let common = [EmuArg::Ptr(pq), EmuArg::Ptr(pk), EmuArg::Ptr(pv), EmuArg::Ptr(pcu), EmuArg::Ptr(plse), EmuArg::Ptr(pdelta), EmuArg::Ptr(pdo)];
        let mut dq = common.to_vec();
        dq.push(EmuArg::Ptr(pdq));
        dq.extend(sizes);
        launch(&emu, "attention_bwd_dq_f32", grid, (128, 1, 1), ((2 * 32 * (hd + 1) + 8 * hd) * 4) as u32, &dq);
        let mut dkv = common.to_vec();
        dkv.extend([EmuArg::Ptr(pdk), EmuArg::Ptr(pdv)]);
        dkv.extend(sizes);
        launch(&emu, "attention_bwd_dkv_f32", ((tokens as u32).div_ceil(4), hkv as u32, 1), (128, 1, 1), ((2 * 32 * (hd + 1) + 64 + 8 * hd) * 4) as u32, &dkv);
    });
    let cpu = CpuBackend::new();
    let up = |x: &[f32]| cpu.upload(HostData::F32(x), DType::F32).unwrap_or_else(|e| fail(&e.to_string()));
    let (cq, ck, cv, cdo) = (up(&q), up(&k), up(&v), up(&dout));
    let ccu = cpu.upload(HostData::U32(&cu), DType::U32).unwrap_or_else(|e| fail(&e.to_string()));
    let zeros = |n: usize| cpu.zeros(n, DType::F32).unwrap_or_else(|e| fail(&e.to_string()));
    let (mut cout, mut clse) = (zeros(tokens * h * hd), zeros(h * tokens));
    let c_fwd = best(reps, || cpu.attention_fwd(a, &cq, &ck, &cv, &ccu, &mut cout, &mut clse).unwrap_or_else(|e| fail(&e.to_string())));
    let (mut cdq, mut cdk, mut cdv) = (zeros(tokens * h * hd), zeros(tokens * hkv * hd), zeros(tokens * hkv * hd));
    let c_bwd = best(reps, || cpu.attention_bwd(a, &cq, &ck, &cv, &ccu, &cout, &clse, &cdo, &mut cdq, &mut cdk, &mut cdv).unwrap_or_else(|e| fail(&e.to_string())));
    let fwd_threads = f64::from(grid.0 * grid.1 * 128);
    println!();
    println!("attention, {tokens} tokens in 2 documents, {h} heads / {hkv} kv heads, head_dim {hd}:");
    println!("{:<44} {:>14} {:>14}", "", "emulator", "CPU backend");
    println!("{:<44} {:>11.2} ms {:>11.2} ms", "forward (attention_fwd_f32)", t_fwd * 1e3, c_fwd * 1e3);
    println!("{:<44} {:>11.2} ms {:>11.2} ms", "backward (delta + dq + dkv)", t_bwd * 1e3, c_bwd * 1e3);
    println!("{:<44} {:>11.0}/s", "forward launches", 1.0 / t_fwd);
    println!("{:<44} {:>11.2} µs", "forward, per emulated thread", t_fwd * 1e6 / fwd_threads);
}
