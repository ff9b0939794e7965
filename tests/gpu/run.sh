#!/usr/bin/env bash
# The GPU proof in one device call of at most ~8 minutes (the phase limits add up to 475 s), for a lent GPU machine (H200, CUDA 13,
# driver, python3 with the nvidia wheels; no Rust, no network). Every phase has its own time limit
# and its own file under $OUT (7 files; the device tool returns at most 8), and prints as it goes,
# so a phase that hangs or crashes costs that phase only:
#   preflight.txt          driver, GPU, the libraries on the loader path and whether NVRTC (with its
#                          builtins) and cuBLASLt actually load; LD_LIBRARY_PATH set from the
#                          toolkit and the pip wheels; `lora selftest --stage env` (versions, SMs,
#                          shared-memory limit, L2)
#   selftest-ops.txt       every op vs the bf16-faithful CPU oracle, one row per line as it
#                          finishes, one child process per op family, LORA_CUDA_SYNC=1
#   sanitizer.txt          compute-sanitizer memcheck and racecheck on small shapes
#   selftest-training.txt  first-step gradients, loss per step, same-seed rerun bytes; with
#                          LORA_CUDA_POISON=1 (uninitialised buffers hold NaN bytes, so a read
#                          before a write fails the comparison, as on the emulator)
#   per-op.txt             one layer's forward + backward timed per op at t = 8192 and 32768, then
#                          the flash attention kernels' TFLOP/s at each t (causal FLOPs: forward
#                          2 t^2 hd h, backward 5 t^2 hd h; targets at t = 8192: >= 350 / >= 250)
#   bench.jsonl            one bench step at 8192 tokens, one JSON line per step, then the result
#   summary.txt            what passed, what failed, each phase's wall time
# PEFT is not re-measured (its numbers are in ../shared/gpu/ANCHORS.md; tests/gpu/peft_bench.py
# still runs by hand).
#
#   bash tests/gpu/run.sh target/release/lora            # on the GPU machine
#   bash tests/gpu/run.sh --dry target/debug/lora        # here: the same phases on the CPU device
#                                                        # emulator (--device emu), small shapes
#
# With the session's device tool (no Rust there, so carry the binary; tests/gpu/bin is ignored):
#   cargo build --release -p lora && mkdir -p tests/gpu/bin && cp "$CARGO_TARGET_DIR/release/lora" tests/gpu/bin/
#   run: command "bash tests/gpu/run.sh tests/gpu/bin/lora", carry ["tests/gpu/bin"], timeout_s 560.
#
# Environment: PHASE_SCALE multiplies every phase's limit; LORA_CUDA_INCLUDE / CUDA_HOME point
# NVRTC at the CUDA headers (default /usr/local/cuda/include, else the nvidia wheels').
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry" ]; then dry=1; shift; fi
bin=${1:?usage: tests/gpu/run.sh [--dry] <path to the lora binary>}
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
scale=${PHASE_SCALE:-1}
status=0
t_all=$(date +%s)
summary=$out/summary.txt
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
# phase NAME LIMIT FILE CMD...: runs CMD under `timeout -k 5`, output streamed to FILE and the
# terminal; records pass/fail and wall time in the summary.
phase() {
    local name=$1 limit=$2 file=$3; shift 3
    limit=$(( limit * scale ))
    printf '\n== %s (limit %s s)\n' "$name" "$limit" | tee -a "$out/$file"
    local t0; t0=$(date +%s)
    # Through bash so that the phase can be one of the functions below (exported).
    timeout -k 5 "$limit" bash -c '"$@"' phase "$@" 2>&1 | tee -a "$out/$file"
    local rc=${PIPESTATUS[0]}
    local secs=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then
        say "ok    $name (${secs} s)"
    else
        status=1
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            say "FAIL  $name: timed out after ${secs} s (limit ${limit} s); see $file"
        else
            say "FAIL  $name: exit $rc after ${secs} s; see $file"
        fi
    fi
}

if [ $dry = 1 ]; then
    device=emu
    ops_args=(--family gemm --family elementwise --family attention --family cross_entropy --family dequant)
    san_families=""
    train_args=(--family training:rslora)
    # One layer of a small shape (the emulator runs every CUDA thread as a fiber).
    # Head dim 64, so the flash kernels are in the table.
    perop_shape="--layers 1 --hidden 256 --intermediate 128 --heads 4 --kv-heads 2 --vocab 256"
    perop_heads=4
    perop_lens="32 64"
    bench_shape=(--layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --vocab 256)
    bench_len=64
else
    device=cuda
    ops_args=()
    san_families="gemm elementwise embedding rmsnorm rope attention swiglu geglu cross_entropy adapters adamw dequant"
    train_args=()
    perop_shape="--shape qwen2.5-1.5b --layers 1"
    perop_heads=12
    perop_lens="8192 32768"
    bench_shape=(--shape qwen2.5-1.5b)
    bench_len=8192
fi
export dry bin device py scale san_families perop_shape perop_heads perop_lens
say "binary: $bin ($("$bin" --version 2>&1 | head -1)); device $device; logs in $out"

# --- preflight ---------------------------------------------------------------------------
preflight() {
    if [ $dry = 1 ]; then
        echo "dry run: no driver or CUDA libraries are needed for --device emu"
    else
        if command -v nvidia-smi > /dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit --format=csv
            nvidia-smi -q | grep -E 'CUDA Version|Product Name|MIG Mode|Persistence|Compute Mode' -A0 | head -20
        else
            echo "no nvidia-smi on PATH"
        fi
        echo "-- loader cache:"
        ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc|libcublasLt' || echo "(none of libcuda, libnvrtc, libcublasLt in ldconfig -p)"
        echo "-- ${CUDA_HOME:-/usr/local/cuda}/lib64:"
        ls "${CUDA_HOME:-/usr/local/cuda}/lib64" 2>/dev/null | grep -E 'nvrtc|cublasLt' || echo "(missing or no nvrtc/cublasLt there)"
        echo "-- LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        echo "-- LORA_CUDA_INCLUDE=${LORA_CUDA_INCLUDE:-<unset>}"
        # Each library by the name cudarc asks for, from the path just set; the builtins are
        # opened by libnvrtc by name, so their folder must be on the loader path (CUDA-REVIEW S1).
        "$py" - <<'PY'
import ctypes
ok = True
for name in ["libcuda.so.1", "libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libcublasLt.so.13"]:
    try:
        ctypes.CDLL(name)
        print(f"loads: {name}")
    except OSError as e:
        ok = False
        print(f"DOES NOT LOAD: {name}: {e}")
raise SystemExit(0 if ok else 1)
PY
    fi
    "$bin" selftest --device "$device" --stage env --seed 1
}
if [ $dry = 0 ]; then
    # NVRTC, its builtins and cuBLASLt from the toolkit and from the pip wheels, both on the
    # loader path whether or not the toolkit has headers (CUDA-REVIEW S1).
    cuda_home=${CUDA_HOME:-/usr/local/cuda}
    [ -d "$cuda_home/lib64" ] && export LD_LIBRARY_PATH=$cuda_home/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    cu13=$("$py" -c 'import nvidia, os; print(next((os.path.join(p, "cu13") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "cu13/lib"))), ""))' 2>/dev/null)
    if [ -n "$cu13" ]; then
        export LD_LIBRARY_PATH=$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        if [ -z "${LORA_CUDA_INCLUDE:-}" ] && [ ! -f "$cuda_home/include/cuda_bf16.h" ] && [ -f "$cu13/include/cuda_bf16.h" ]; then
            export LORA_CUDA_INCLUDE=$cu13/include
        fi
    fi
fi
export -f preflight
phase "preflight" 60 preflight.txt preflight

# --- ops, streamed, one child per family, synchronised after every launch ------------------
phase "ops" 75 selftest-ops.txt env LORA_CUDA_SYNC=1 "$bin" selftest --device "$device" --stage ops --seed 2026 --family-timeout 60 "${ops_args[@]}"

# --- compute-sanitizer -----------------------------------------------------------------------
sanitize() {
    local cs
    cs=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
    if [ $dry = 1 ] || [ -z "$cs" ]; then
        echo "skipped: ${cs:-no compute-sanitizer found}${cs:+ (dry run)}; on the emulator every access is bounds-checked by guard pages already"
        return 0
    fi
    local fams=() f rc=0
    for f in $san_families; do fams+=(--family "$f"); done
    # Small shapes (no real-vocabulary cross-entropy), in one process so the tool sees every launch.
    export LORA_SELFTEST_SMALL=1
    echo "-- memcheck"
    timeout -k 5 $(( 70 * scale )) "$cs" --tool memcheck --leak-check no --error-exitcode 99 "$bin" selftest --device cuda --in-process --stage ops --seed 3 "${fams[@]}" || rc=1
    echo "-- racecheck (shared-memory hazards)"
    timeout -k 5 $(( 45 * scale )) "$cs" --tool racecheck --racecheck-report hazard --error-exitcode 99 "$bin" selftest --device cuda --in-process --stage ops --seed 3 --family attention --family rmsnorm --family cross_entropy --family adapters --family elementwise || rc=1
    return $rc
}
export -f sanitize
phase "compute-sanitizer" 120 sanitizer.txt sanitize

# --- training parity --------------------------------------------------------------------------
phase "training" 75 selftest-training.txt env LORA_CUDA_SYNC=1 LORA_CUDA_POISON=1 "$bin" selftest --device "$device" --stage training --seed 2026 --family-timeout 70 "${train_args[@]}"

# --- per-op time of one layer ---------------------------------------------------------------------
perop() {
    local t rc=0 table
    table=$(mktemp)
    for t in $perop_lens; do
        echo "-- one layer, t = $t"
        # shellcheck disable=SC2086
        "$bin" bench --device "$device" $perop_shape --rows 1 --seq-len "$t" --steps 1 --warmup 1 --per-op | tee "$table" || rc=1
        flash_rate "$t" "$perop_heads" "$table" || rc=1
    done
    rm -f "$table"
    return $rc
}
# flash_rate T HEADS TABLE (a per-op table): TFLOP/s of the flash kernels of one layer at one document of
# T tokens (rows 1), causal FLOPs counted: forward 2 T^2 hd h; backward (delta + dq + dk/dv)
# 5 T^2 hd h. The bf16 casts around them are listed apart (they go once activations are bf16).
flash_rate() {
    "$py" - "$1" "$2" "$3" <<'PY'
import re, sys
t, h = int(sys.argv[1]), int(sys.argv[2])
rows = {}
for line in open(sys.argv[3]):
    m = re.match(r"^(attention_(?:fwd|bwd)) \((\w+)\)\s+(\d+)\s+([\d.]+)", line)
    if m:
        rows[(m.group(1), m.group(2))] = (int(m.group(3)), float(m.group(4)))
hd = next((int(k[1].rsplit("hd", 1)[1]) for k in rows if k[1].startswith("flash_fwd_hd")), None)
if hd is None:
    print(f"flash attention at t = {t}: no flash kernel in the per-op table (head dim not 64/128/256?)")
    raise SystemExit(1)
def per_call(keys):
    ms = 0.0
    for k in keys:
        calls, ms_step = rows.get(k, (0, 0.0))
        ms += ms_step / max(calls, 1)
    return ms
fwd = per_call([("attention_fwd", f"flash_fwd_hd{hd}")])
bwd = per_call([("attention_bwd", "flash_bwd_delta"), ("attention_bwd", f"flash_bwd_dq_hd{hd}"), ("attention_bwd", f"flash_bwd_dkv_hd{hd}")])
casts = sum(rows.get(k, (0, 0.0))[1] for k in [("attention_fwd", "cast_f32_bf16"), ("attention_bwd", "cast_f32_bf16")])
for name, ms, flops, target in [("forward", fwd, 2 * t * t * hd * h, 350), ("backward", bwd, 5 * t * t * hd * h, 250)]:
    rate = flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")
    print(f"flash {name} t={t} h={h} hd={hd}: {ms:.3f} ms per call, {rate:.1f} TFLOP/s causal (target at t=8192: >= {target})")
print(f"bf16 casts around them (q, k, v; again with dout): {casts:.3f} ms per step")
PY
}
export -f perop flash_rate
phase "per-op" 100 per-op.txt perop

# --- one bench step, a JSON line per step -------------------------------------------------------
phase "bench" 45 bench.jsonl "$bin" bench --device "$device" "${bench_shape[@]}" --rows 1 --seq-len "$bench_len" --steps 1 --warmup 0 --step-json --json

say "total $(( $(date +%s) - t_all )) s"
if [ $dry = 1 ]; then
    if [ $status = 0 ]; then say "dry run passed (CPU device emulator: nothing ran on a GPU)"; else say "DRY RUN FAILED"; fi
elif [ $status = 0 ]; then say "all GPU checks passed"; else say "SOME GPU CHECKS FAILED"; fi
exit $status
