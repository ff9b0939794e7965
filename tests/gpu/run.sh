#!/usr/bin/env bash
# The whole GPU proof of issue 7, in one command, for a lent GPU machine (H200, CUDA 13, driver,
# python3 with torch 2.11 + transformers + peft; no Rust, no network). Writes every log under
# $OUT (default ./gpu-out) and prints the tables:
#   1. `lora selftest --device cuda`: every Backend op, GPU vs its CPU twin, on random inputs of
#      several shapes; then 20 training steps of a tiny model on GPU and CPU (loss per step within
#      1e-2 relative, adapter within bf16 tolerance, same seed twice on GPU = identical bytes).
#   2. `lora bench --device cuda --shape qwen2.5-1.5b` (rows of 8192, 32768 tokens per step).
#   3. tests/gpu/peft_bench.py: PyTorch + PEFT on the same shape and batch, sdpa, plain and with
#      gradient checkpointing, and with Liger kernels if a liger_kernel wheel was carried in
#      tests/gpu/wheels/ (get it here with: pip download liger-kernel --no-deps -d tests/gpu/wheels).
#   4. A side-by-side summary with the ratio.
#
#   bash tests/gpu/run.sh target/release/lora            # on the GPU machine
#   bash tests/gpu/run.sh --dry target/debug/lora        # here, CPU only: shakes out the script
#
# With the session's device tool (no Rust there, so carry the binary; tests/gpu/bin and
# tests/gpu/wheels are git-ignored):
#   cargo build --release -p lora && mkdir -p tests/gpu/bin && cp "$CARGO_TARGET_DIR/release/lora" tests/gpu/bin/
#   pip download liger-kernel --no-deps -d tests/gpu/wheels
#   run: command "bash tests/gpu/run.sh tests/gpu/bin/lora", carry ["tests/gpu/bin", "tests/gpu/wheels"],
#        timeout_s 600. It writes 7 files under $OUT (the tool returns at most 8).
# Each phase has its own time limit (SELFTEST_TIMEOUT 120 s, BENCH_TIMEOUT 240 s,
# PEFT_TIMEOUT 200 s; 560 s in all, under the tool's 600 s) so one slow phase cannot eat the budget.
#
# Environment: LORA_BENCH_ARGS overrides the bench arguments; PEFT_CONFIGS the PEFT list;
# LORA_CUDA_INCLUDE / CUDA_HOME point NVRTC at the CUDA headers (default /usr/local/cuda/include).
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry" ]; then dry=1; shift; fi
bin=${1:?usage: tests/gpu/run.sh [--dry] <path to the lora binary>}
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0
note() { printf '\n== %s\n' "$*" | tee -a "$out/summary.txt"; }
fail() { echo "FAILED: $*" | tee -a "$out/summary.txt"; status=1; }
: > "$out/summary.txt"

if [ $dry = 1 ]; then
    device=cpu; shape=smollm2-135m; seq_len=128; bench_args=${LORA_BENCH_ARGS:---device cpu --shape smollm2-135m --rows 1 --seq-len 128 --steps 1 --warmup 0}
    peft_args="--device cpu --shape tiny --seq-len 64 --tokens 128 --steps 2 --warmup 1"  # shake-out only
else
    device=cuda; shape=qwen2.5-1.5b; seq_len=8192; bench_args=${LORA_BENCH_ARGS:---device cuda --shape qwen2.5-1.5b}
    peft_args="--device cuda --shape qwen2.5-1.5b --seq-len 8192 --tokens 32768"
    command -v nvidia-smi >/dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1
    # NVRTC from the toolkit, or from the pip wheels that come with torch.
    if [ -z "${LORA_CUDA_INCLUDE:-}" ] && [ ! -f "${CUDA_HOME:-/usr/local/cuda}/include/cuda_bf16.h" ]; then
        cu13=$("$py" -c 'import nvidia, os; print(next((os.path.join(p, "cu13") for p in nvidia.__path__ if os.path.isfile(os.path.join(p, "cu13/include/cuda_bf16.h"))), ""))' 2>/dev/null)
        if [ -n "$cu13" ]; then
            export LORA_CUDA_INCLUDE=$cu13/include
            export LD_LIBRARY_PATH=$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        fi
    fi
fi
echo "binary: $bin ($("$bin" --version 2>&1 | head -1)); device $device; logs in $out" | tee -a "$out/summary.txt"

note "1. lora selftest --device $device"
if "$bin" selftest --help > /dev/null 2>&1; then
    timeout "${SELFTEST_TIMEOUT:-120}" "$bin" selftest --device "$device" > "$out/selftest.txt" 2>&1 || fail "selftest (exit $?; 124 = timed out)"
    tail -n 80 "$out/selftest.txt" | tee -a "$out/summary.txt"
else
    fail "this binary has no 'selftest' subcommand (wire lora_engine::selftest::run into the CLI)"
fi

note "2. lora bench $bench_args"
if "$bin" bench --help > /dev/null 2>&1; then
    # The issue's batch: rows of 8192, 32768 tokens per step (4 rows), if the CLI takes sizes.
    if [ $dry = 0 ] && [ -z "${LORA_BENCH_ARGS:-}" ] && "$bin" bench --help 2>&1 | grep -q -- "--rows"; then
        bench_args="$bench_args --rows 4 --seq-len 8192"
        # Keeping every f32 activation of 28 layers x 32768 tokens needs ~150 GB: recompute each
        # layer in backward (the counterpart of PEFT's gradient checkpointing).
        if "$bin" bench --help 2>&1 | grep -q -- "--recompute"; then bench_args="$bench_args --recompute"; fi
    fi
    echo "lora bench $bench_args" | tee -a "$out/summary.txt"
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-240}" "$bin" bench $bench_args > "$out/bench_lora.txt" 2>&1 || fail "lora bench (exit $?; 124 = timed out)"
    cat "$out/bench_lora.txt" | tee -a "$out/summary.txt"
else
    fail "this binary has no 'bench' subcommand"
fi

note "3. PyTorch + PEFT ($peft_args)"
if [ -d "$here/wheels" ] && ls "$here"/wheels/*.whl > /dev/null 2>&1; then
    "$py" -m pip install --no-index --find-links "$here/wheels" --no-deps --quiet "$here"/wheels/*.whl \
        > "$out/pip_liger.txt" 2>&1 || echo "liger wheel did not install (see pip_liger.txt); Liger rows are skipped"
fi
# shellcheck disable=SC2086
timeout "${PEFT_TIMEOUT:-200}" "$py" "$here/peft_bench.py" $peft_args --configs "${PEFT_CONFIGS:-peft,peft+ckpt,liger,liger+ckpt}" \
    > "$out/bench_peft.jsonl" 2> "$out/bench_peft.stderr" || fail "peft_bench.py (exit $?; 124 = timed out; see bench_peft.stderr)"
cat "$out/bench_peft.jsonl" | tee -a "$out/summary.txt"

note "4. side by side"
"$py" - "$out/bench_lora.txt" "$out/bench_peft.jsonl" "$here" "$shape" "${seq_len}" <<'PY' 2>&1 | tee -a "$out/summary.txt"
# Our bench prints lora_engine::bench::BenchResult as JSON (tokens_per_sec, peak_device_bytes);
# plain "N tokens/s" text is accepted too. MFU uses peft_bench.py's formula for both sides.
import json, os, re, sys
sys.path.insert(0, sys.argv[3])
from peft_bench import SHAPES, PEAK_TFLOPS, model_flops_per_token
shape, seq = sys.argv[4], int(sys.argv[5])
text = open(sys.argv[1]).read() if os.path.exists(sys.argv[1]) else ""
ours, ours_mem = None, None
for line in text.splitlines():
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if isinstance(r, dict) and "tokens_per_sec" in r:
        ours = r["tokens_per_sec"]
        b = r.get("peak_device_bytes") or r.get("peak_rss_bytes")
        ours_mem = f"{b / 2**30:.2f} GiB" if b else None
if ours is None:
    m = re.search(r"([0-9][0-9,.]*)\s*tokens/s", text)
    ours = float(m.group(1).replace(",", "")) if m else None
    m = re.search(r"peak[^\n]*?([0-9][0-9.]*)\s*(GiB|MiB)", text)
    ours_mem = f"{m.group(1)} {m.group(2)}" if m else None
peft = []
for line in (open(sys.argv[2]) if os.path.exists(sys.argv[2]) else []):
    try:
        peft.append(json.loads(line))
    except ValueError:
        pass
gpu = next((r["gpu"] for r in peft if "gpu" in r), "")
peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
fpt = model_flops_per_token(SHAPES[shape], seq) if shape in SHAPES else None
def mfu(tps):
    return f"{fpt * tps / (peak * 1e12):.3f}" if (tps and fpt and peak) else "-"
print(f"{'system':<12} {'tokens/s':>10} {'MFU':>6} {'peak mem':>11} {'lora/this':>10}")
print(f"{'lora':<12} {ours if ours else float('nan'):>10.1f} {mfu(ours):>6} {ours_mem or '?':>11} {'1.00':>10}")
for r in peft:
    tps = r.get("tokens_per_s")
    mem = f"{r['peak_gib']} GiB" if "peak_gib" in r else ("OOM" if r.get("oom") else "-")
    ratio = f"{ours / tps:.2f}" if (ours and tps) else "-"
    note = f"  ({r['skipped']})" if "skipped" in r else ""
    print(f"{r['config']:<12} {tps if tps else float('nan'):>10.1f} {mfu(tps):>6} {mem:>11} {ratio:>10}{note}")
if ours is None:
    print("(could not read tokens/s from the lora bench output)")
PY

if [ $dry = 1 ]; then
    if [ $status = 0 ]; then note "dry run passed (CPU only: nothing ran on a GPU; the shapes of lora and PEFT differ here)"; else note "DRY RUN FAILED"; fi
elif [ $status = 0 ]; then note "all GPU checks passed"; else note "SOME GPU CHECKS FAILED"; fi
exit $status
