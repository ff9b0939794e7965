//! The CPU device emulator as a device: the emulated instructions against their documented
//! layouts (the probe kernels), the race detector, and every bug it must turn into an error naming
//! the kernel (divergent barriers, bad shuffle masks, out-of-bounds and freed memory, endless
//! loops, ...), its memory API and launch checks. The real kernel families are in emu_kernels.rs.

mod emu_util;

use std::time::Duration;

use emu_util::{Dev, i32a, ptr};
use lora_engine::cuda::emu::{ContextSwitch, EmuArg, EmuOptions, Emulator, Schedule, probes};

/// `faults.cu:<line>` of the line of the fault probes holding `marker`.
fn at(marker: &str) -> String {
    let src = lora_engine::cuda::emu::FAULT_PROBES.source;
    let line = src.lines().position(|l| l.contains(marker)).unwrap_or_else(|| panic!("no `{marker}` in faults.cu"));
    format!("faults.cu:{}", line + 1)
}

const SCHEDULES: [Schedule; 4] = [Schedule::Forward, Schedule::Reverse, Schedule::Shuffled(1), Schedule::Shuffled(0xfeed)];

fn run_probes(filter: &str) {
    let cases: Vec<_> = probes::all(7).into_iter().filter(|c| c.kernel.contains(filter)).collect();
    assert!(!cases.is_empty(), "no probe matches {filter}");
    for s in SCHEDULES {
        let dev = Dev::new(s);
        for c in &cases {
            probes::run_on_emulator(&dev.emu, c).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        }
    }
}

// ---- emulated instructions against their documented layouts ------------------------------------

/// mma.sync.m16n8k16 (bf16 and f16 in, f32 accumulate) with fragments built from the PTX ISA's
/// layout tables equals the plain matrix product: bit for bit on exact inputs, within 2^-20 of
/// the terms' magnitude on random reals.
#[test]
fn mma_sync_m16n8k16_matches_plain_matrix_products() {
    run_probes("probe_mma");
}

/// ldmatrix x1/x2/x4 with and without .trans deliver each element to the lane and register half
/// the PTX ISA names (every element is distinct, so a wrong position shows).
#[test]
fn ldmatrix_delivers_the_documented_fragments() {
    run_probes("probe_ldmatrix");
}

/// The tensor-core tile pipeline: cp.async.cg, then ldmatrix.x4 / .x2.trans, give exactly mma's
/// fragments (the product is right).
#[test]
fn cp_async_ldmatrix_mma_pipeline_computes_the_product() {
    run_probes("probe_tile_mma");
}

/// cp.async ca.4/.8/.16 and cg.16 with src-size zero-fill (a src-size 0 source is not read), and
/// commit/wait_group completing the older group first.
#[test]
fn cp_async_copies_zero_fills_and_completes_by_group() {
    run_probes("probe_cp_async");
}

/// Shuffles (idx, up, down, xor; widths 4, 8, 16; a partial mask; 64-bit values) and votes
/// (ballot, any, all, partial) as the CUDA guide defines them.
#[test]
fn shuffles_and_votes_follow_the_cuda_definitions() {
    run_probes("probe_shfl");
}

/// atomicAdd/Min/Max/CAS/Or/Exch across blocks give the order-independent totals.
#[test]
fn atomics_across_blocks_give_the_totals() {
    run_probes("probe_atomics");
}

/// f32 -> bf16/f16 in the four rounding modes (ties, subnormals, overflow, NaN -> 0x7FFF), and
/// bf16/f16 -> f32 for all 65536 patterns.
#[test]
fn conversions_round_as_the_device_does() {
    run_probes("probe_convert");
    run_probes("probe_widen");
}

// ---- the race detector ---------------------------------------------------------------------------

/// A kernel whose threads read what other threads wrote, with no barrier between, gives different
/// bytes under different orders (and a wrong answer under one of them); the same kernel with its
/// barrier gives the right answer under every order.
#[test]
fn a_missing_barrier_changes_the_result_between_orders() {
    let n = 128usize;
    let want: Vec<f32> = (0..n).map(|i| ((n - 1 - i) * 3 + 1) as f32).collect();
    let run = |s: Schedule, sync: i32| {
        let dev = Dev::new(s);
        let out = dev.out(n * 4);
        dev.run("probe_race", (1, 1, 1), (n as u32, 1, 1), 0, &[ptr(out), EmuArg::I32(sync)]);
        dev.get(out, n * 4)
    };
    let with: Vec<Vec<u8>> = SCHEDULES.iter().map(|&s| run(s, 1)).collect();
    for (s, bytes) in SCHEDULES.iter().zip(&with) {
        let got: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, want, "{s:?}: with the barrier the result must be right");
    }
    let without: Vec<Vec<u8>> = SCHEDULES.iter().map(|&s| run(s, 0)).collect();
    assert_ne!(without[0], without[1], "forward and reverse orders must disagree without the barrier");
    assert!(without.iter().any(|b| *b != with[0]), "the race must be visible in some order");
}

// ---- barriers and warp collectives that cannot complete --------------------------------------------

#[test]
fn threads_at_different_syncthreads_are_an_error_naming_both_lines() {
    let dev = Dev::new(Schedule::Forward);
    let out = dev.out(64 * 4);
    let e = dev.try_run("probe_divergent_barrier", (1, 1, 1), (64, 1, 1), 0, &[ptr(out)]);
    assert!(e.contains("backend `emu` op `launch`"), "{e}");
    assert!(e.contains("kernel probe_divergent_barrier, block (0,0,0), thread (32,0,0)"), "{e}");
    assert!(e.contains("divergent __syncthreads"), "{e}");
    assert!(e.contains(&at("divergent barrier A")) && e.contains(&at("divergent barrier B")), "both barrier lines: {e}");
}

#[test]
fn a_barrier_some_thread_never_reaches_is_an_error_under_every_order() {
    for s in SCHEDULES {
        let dev = Dev::new(s);
        let out = dev.out(64 * 4);
        let e = dev.try_run("probe_barrier_after_exit", (1, 1, 1), (64, 1, 1), 0, &[ptr(out)]);
        assert!(e.contains("kernel probe_barrier_after_exit, block (0,0,0)"), "{s:?}: {e}");
        assert!(e.contains(&format!("__syncthreads at {}", at("barrier after exit"))), "{s:?}: {e}");
        assert!(e.contains("exited"), "{s:?}: {e}");
    }
}

#[test]
fn a_shuffle_mask_naming_lanes_that_do_not_take_part_is_an_error() {
    for s in SCHEDULES {
        let dev = Dev::new(s);
        let out = dev.out(64 * 4);
        let e = dev.try_run("probe_shfl_missing_lanes", (1, 1, 1), (64, 1, 1), 0, &[ptr(out)]);
        assert!(e.contains("kernel probe_shfl_missing_lanes, block (0,0,0), thread ("), "{s:?}: {e}");
        assert!(e.contains(&format!("__shfl_xor_sync at {} (mask 0xffffffff)", at("half-warp shuffle"))), "{s:?}: {e}");
        assert!(e.contains("exited"), "lanes 16..31 exit without shuffling: {s:?}: {e}");
    }
    let dev = Dev::new(Schedule::Forward);
    let out = dev.out(32 * 4);
    let e = dev.try_run("probe_shfl_mask_without_self", (1, 1, 1), (32, 1, 1), 0, &[ptr(out)]);
    assert!(e.contains("thread (1,0,0)") && e.contains("does not include the calling lane 1"), "{e}");
    let e = dev.try_run("probe_mismatched_collectives", (1, 1, 1), (32, 1, 1), 0, &[ptr(out)]);
    assert!(e.contains("__ballot_sync") && e.contains("__shfl_sync") && e.contains("same collective"), "{e}");
}

/// A full-mask shuffle in a block whose last warp is partial names lanes that do not exist.
#[test]
fn a_full_mask_in_a_partial_warp_is_an_error() {
    let dev = Dev::new(Schedule::Forward);
    let out = dev.out(48 * 4);
    let e = dev.try_run("probe_shfl_missing_lanes", (1, 1, 1), (16, 1, 1), 0, &[ptr(out)]);
    assert!(e.contains("thread (0,0,0)") && e.contains("this warp has only 16 threads (the block has 16)"), "{e}");
}

// ---- memory faults ---------------------------------------------------------------------------------

#[test]
fn out_of_bounds_reads_and_writes_are_errors_naming_kernel_thread_and_allocation() {
    let dev = Dev::new(Schedule::Forward);
    let n = 64usize;
    let x = dev.f32s(&vec![1.0; n]);
    let out = dev.out(32 * 4);
    let e = dev.try_run("probe_oob_read", (1, 1, 1), (32, 1, 1), 0, &[ptr(x), ptr(out), i32a(n)]);
    assert!(e.contains("kernel probe_oob_read, block (0,0,0), thread (0,0,0): invalid read at"), "{e}");
    assert!(e.contains(&format!("0 bytes past the end of allocation {x:#x} (256 bytes)")), "{e}");

    let e = dev.try_run("probe_oob_write", (1, 1, 1), (32, 1, 1), 0, &[ptr(x), i32a(n), i32a(16)]);
    assert!(e.contains("kernel probe_oob_write, block (0,0,0), thread (0,0,0): invalid write at"), "{e}");
    assert!(e.contains(&format!("past the end of allocation {x:#x}")), "{e}");

    // An overrun that stays within the allocation's last 16-byte granule is found after the launch.
    let y = dev.f32s(&[0.0; 5]);
    let e = dev.try_run("probe_oob_write", (1, 1, 1), (1, 1, 1), 0, &[ptr(y), i32a(5), i32a(0)]);
    assert!(e.contains("kernel probe_oob_write wrote past the end of allocation") && e.contains("(20 bytes)"), "{e}");

    // The emulator goes on after a fault.
    dev.run("probe_oob_write", (1, 1, 1), (32, 1, 1), 0, &[ptr(x), i32a(0), i32a(1)]);
    assert_eq!(dev.get_f32(x, n)[..32], [1.0; 32]);
}

#[test]
fn reads_after_free_and_through_null_are_named() {
    let dev = Dev::new(Schedule::Forward);
    let x = dev.f32s(&[2.0; 64]);
    let out = dev.out(32 * 4);
    dev.emu.free(x).unwrap();
    let e = dev.try_run("probe_oob_read", (1, 1, 1), (32, 1, 1), 0, &[ptr(x), ptr(out), i32a(0)]);
    assert!(e.contains("invalid read") && e.contains("which has been freed"), "{e}");
    let e = dev.try_run("probe_oob_read", (1, 1, 1), (32, 1, 1), 0, &[ptr(0), ptr(out), i32a(0)]);
    assert!(e.contains("null pointer"), "{e}");
}

#[test]
fn dynamic_shared_memory_has_exactly_the_launch_size() {
    let dev = Dev::new(Schedule::Forward);
    let out = dev.out(32 * 4);
    // In bounds: fine.
    dev.run("probe_dynamic_smem_overflow", (1, 1, 1), (32, 1, 1), 400, &[ptr(out), i32a(100), i32a(0)]);
    // One element past 400 bytes: within the granule, found when the block ends.
    let e = dev.try_run("probe_dynamic_smem_overflow", (1, 1, 1), (32, 1, 1), 404, &[ptr(out), i32a(101), i32a(1)]);
    assert!(e.contains("wrote past the end of its 404 bytes of dynamic shared memory"), "{e}");
    // Far past it: the guard page.
    let e = dev.try_run("probe_dynamic_smem_overflow", (1, 1, 1), (32, 1, 1), 400, &[ptr(out), i32a(100), i32a(64)]);
    assert!(e.contains("invalid write") && e.contains("past the end of the launch's 400 bytes of dynamic shared memory"), "{e}");
}

#[test]
fn fresh_memory_is_poisoned_with_nan_bytes() {
    let dev = Dev::new(Schedule::Forward);
    let p = dev.out(64);
    assert!(dev.get(p, 64).iter().all(|&b| b == 0xFF));
    assert!(dev.get_f32(p, 16).iter().all(|x| x.is_nan()));
    // A kernel that reads memory nothing wrote produces NaN.
    let y = dev.zeros(16 * 4);
    dev.run("axpy_f32", (1, 1, 1), (32, 1, 1), 0, &[EmuArg::F32(1.0), ptr(p), ptr(y), EmuArg::Size(16)]);
    assert!(dev.get_f32(y, 16).iter().all(|x| x.is_nan()));
}

/// A kernel reading its cp.async tile before the wait sees the poison the copy has not yet
/// replaced (the copies land at the wait under the forward order).
#[test]
fn reading_a_cp_async_tile_before_waiting_is_visible() {
    let dev = Dev::new(Schedule::Forward);
    let src = dev.f32s(&(0..128).map(|i| i as f32).collect::<Vec<_>>());
    let out = dev.out(128 * 4);
    dev.run("probe_cp_async_early_read", (1, 1, 1), (32, 1, 1), 0, &[ptr(src), ptr(out)]);
    let got = dev.get_f32(out, 128);
    assert!(got.iter().all(|x| x.is_nan()), "the tile was read before it landed: {:?}", &got[..4]);
}

#[test]
fn ldmatrix_from_global_memory_is_an_error() {
    let dev = Dev::new(Schedule::Forward);
    let src = dev.bytes(&[0u8; 256]);
    let out = dev.out(32 * 4);
    let e = dev.try_run("probe_ldmatrix_global", (1, 1, 1), (32, 1, 1), 0, &[ptr(src), ptr(out)]);
    // The wrapper in mma.cuh names its caller's line.
    assert!(e.contains(&format!("ldmatrix at {}", at("ldmatrix_x1(r, src"))) && e.contains("is not in shared memory"), "{e}");
}

// ---- other faults ------------------------------------------------------------------------------------

#[test]
fn an_endless_loop_stops_at_the_time_limit() {
    let dev = Dev::with(EmuOptions { time_limit: Duration::from_millis(300), ..Default::default() });
    let flag = dev.i32s(&[0]);
    let out = dev.out(4);
    let t = std::time::Instant::now();
    let e = dev.try_run("probe_spin", (1, 1, 1), (1, 1, 1), 0, &[ptr(flag), ptr(out)]);
    assert!(e.contains("kernel probe_spin, block (0,0,0), thread (0,0,0)") && e.contains("time limit"), "{e}");
    // 0.3 s of CPU time; the wall time depends on how busy the machine is.
    assert!(t.elapsed() < Duration::from_secs(60), "stopped after {:?}", t.elapsed());
    // And the emulator still works afterwards.
    dev.emu.copy_htod(flag, &1i32.to_le_bytes()).unwrap();
    dev.run("probe_spin", (1, 1, 1), (1, 1, 1), 0, &[ptr(flag), ptr(out)]);
}

#[test]
fn division_by_zero_and_stack_overflow_are_errors() {
    let dev = Dev::new(Schedule::Forward);
    let zero = dev.i32s(&[0]);
    let out = dev.out(32 * 4);
    let e = dev.try_run("probe_divide", (1, 1, 1), (32, 1, 1), 0, &[ptr(zero), ptr(out)]);
    assert!(e.contains("kernel probe_divide, block (0,0,0), thread (0,0,0): integer division by zero"), "{e}");
    let e = dev.try_run("probe_stack_overflow", (1, 1, 1), (1, 1, 1), 0, &[ptr(out), i32a(1 << 20)]);
    assert!(e.contains("kernel probe_stack_overflow") && e.contains("stack (64 KiB) overflowed"), "{e}");
    // A shallow recursion is fine.
    dev.run("probe_stack_overflow", (1, 1, 1), (1, 1, 1), 0, &[ptr(out), i32a(4)]);
}

/// A spin lock on atomicCAS terminates (atomics let the other threads run) and counts every thread.
#[test]
fn a_spin_lock_on_atomics_makes_progress() {
    for s in SCHEDULES {
        let dev = Dev::new(s);
        let (lock, counter) = (dev.i32s(&[0]), dev.i32s(&[0]));
        dev.run("probe_spin_lock", (3, 1, 1), (96, 1, 1), 0, &[ptr(lock), ptr(counter)]);
        assert_eq!(dev.get_u32(counter, 1), [288], "{s:?}");
    }
}

// ---- memory API and launch checks -------------------------------------------------------------------

#[test]
fn copies_are_checked_against_their_allocation() {
    let dev = Dev::new(Schedule::Forward);
    let p = dev.out(100);
    let e = dev.emu.copy_htod(p + 90, &[0u8; 20]).unwrap_err().to_string();
    assert!(e.contains("backend `emu` op `copy_htod`") && e.contains("run 10 bytes past the end of allocation"), "{e}");
    let mut host = [0u8; 8];
    let e = dev.emu.copy_dtoh(p + 200, &mut host).unwrap_err().to_string();
    assert!(e.contains("copy_dtoh") && e.contains("past the end of allocation"), "{e}");
    let q = dev.out(50);
    assert!(dev.emu.copy_dtod(q, p, 60).is_err());
    dev.emu.copy_dtod(q, p + 50, 50).unwrap();
    assert!(dev.emu.memset(p, 0, 101).is_err());
    let e = dev.emu.copy_htod(0x7e57_0000_0000, &[0u8; 4]).unwrap_err().to_string();
    assert!(e.contains("0x7e5700000000 is in no device allocation"), "{e}");
    let e = dev.emu.copy_htod(12, &[0u8; 4]).unwrap_err().to_string();
    assert!(e.contains("null pointer"), "{e}");

    dev.emu.free(q).unwrap();
    let e = dev.emu.free(q).unwrap_err().to_string();
    assert!(e.contains("already freed"), "{e}");
    let e = dev.emu.free(p + 4).unwrap_err().to_string();
    assert!(e.contains("is not an allocation"), "{e}");
    let other = Dev::new(Schedule::Forward);
    let e = other.emu.free(p).unwrap_err().to_string();
    assert!(e.contains("another emulator"), "{e}");
    assert!(other.emu.copy_htod(p, &[1]).unwrap_err().to_string().contains("another emulator"));
}

#[test]
fn the_memory_limit_is_an_error_not_an_abort() {
    let dev = Dev::with(EmuOptions { memory_limit: 1 << 20, ..Default::default() });
    let a = dev.emu.alloc(600 << 10).unwrap();
    let e = dev.emu.alloc(600 << 10).unwrap_err().to_string();
    assert!(e.contains("out of emulated device memory") && e.contains("memory_limit"), "{e}");
    assert_eq!(dev.emu.memory_in_use(), 600 << 10);
    dev.emu.free(a).unwrap();
    assert_eq!(dev.emu.memory_in_use(), 0);
    dev.emu.alloc(600 << 10).unwrap();
}

#[test]
fn bad_launches_are_refused_naming_the_kernel() {
    let dev = Dev::new(Schedule::Forward);
    let p = dev.out(64);
    let args = [EmuArg::F32(1.0), ptr(p), ptr(p), EmuArg::Size(16)];
    let refuse = |kernel: &str, grid, block, smem, args: &[EmuArg]| dev.emu.launch_args(kernel, grid, block, smem, args).unwrap_err().to_string();
    let e = refuse("axpy_f32", (1, 1, 1), (1025, 1, 1), 0, &args);
    assert!(e.contains("kernel axpy_f32: block (1025,1,1) is not a valid block"), "{e}");
    let e = refuse("axpy_f32", (0, 1, 1), (32, 1, 1), 0, &args);
    assert!(e.contains("grid (0,1,1)"), "{e}");
    let e = refuse("axpy_f32", (1, 1, 1), (32, 1, 1), 300_000, &args);
    assert!(e.contains("300000 bytes of dynamic shared memory"), "{e}");
    let e = refuse("axpy_f32", (1, 1, 1), (32, 1, 1), 0, &args[..3]);
    assert!(e.contains("takes 4 parameters (float alpha, const float* x, float* y, size_t n), 3 given"), "{e}");
    let e = refuse("axpy_f32", (1, 1, 1), (32, 1, 1), 0, &[EmuArg::F32(1.0), ptr(p), ptr(p), EmuArg::I32(16)]);
    assert!(e.contains("parameter 3 (`size_t n`) is 8 bytes"), "{e}");
    let e = refuse("no_such_kernel", (1, 1, 1), (32, 1, 1), 0, &args);
    assert!(e.contains("no kernel `no_such_kernel`"), "{e}");
    let info = dev.emu.kernel("attention_fwd_f32").unwrap();
    assert_eq!(info.file, "attention.cu");
    assert_eq!(info.params[0], "const float* q");
    assert_eq!(info.param_sizes.len(), 13);
}

/// Launches from several threads at once (as cargo runs tests) are safe and each gets its own
/// right answer.
#[test]
fn concurrent_launches_from_several_threads() {
    std::thread::scope(|s| {
        for t in 0..4u32 {
            s.spawn(move || {
                let dev = Dev::new(if t % 2 == 0 { Schedule::Forward } else { Schedule::Shuffled(u64::from(t)) });
                for round in 0..20 {
                    let n = 300 + 17 * round;
                    let x = dev.f32s(&vec![t as f32; n]);
                    let y = dev.zeros(n * 4);
                    dev.run("axpy_f32", emu_util::grid1d(n), (256, 1, 1), 0, &[EmuArg::F32(2.0), ptr(x), ptr(y), EmuArg::Size(n)]);
                    assert!(dev.get_f32(y, n).iter().all(|&v| v == 2.0 * t as f32));
                    dev.emu.free(x).unwrap();
                    dev.emu.free(y).unwrap();
                }
            });
        }
    });
}

/// Both context switches run the same kernels to the same bytes.
#[test]
fn ucontext_and_the_native_switch_agree() {
    let run = |cs: ContextSwitch| {
        let dev = Dev::with(EmuOptions { context_switch: cs, ..Default::default() });
        let out = dev.out(4 * 256 * 4);
        dev.run("probe_barrier_loop", (4, 1, 1), (256, 1, 1), 0, &[ptr(out), i32a(10)]);
        for c in probes::all(3).iter().filter(|c| c.kernel.contains("mma") || c.kernel.contains("shfl")) {
            probes::run_on_emulator(&dev.emu, c).unwrap();
        }
        dev.get(out, 4 * 256 * 4)
    };
    assert_eq!(run(ContextSwitch::Native), run(ContextSwitch::Ucontext));
}

#[test]
fn an_emulator_frees_its_memory_when_dropped() {
    let p = {
        let dev = Dev::new(Schedule::Forward);
        dev.out(1 << 20)
    };
    let dev = Dev::new(Schedule::Forward);
    let e = dev.emu.copy_htod(p, &[0]).unwrap_err().to_string();
    assert!(e.contains("in no device allocation"), "{e}");
    let _ = Emulator::new(EmuOptions { time_limit: Duration::ZERO, ..Default::default() }).err().expect("a zero time limit is refused");
}
