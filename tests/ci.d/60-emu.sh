#!/usr/bin/env bash
# Stage: the CUDA backend on the CPU device emulator. `lora selftest --device emu` runs the whole
# op table (every Backend op, QLoRA's dequantize included) through the same ops.rs and the same
# kernels/*.cu text a GPU runs, against the bf16-faithful CPU oracle, then the training
# comparison (first-step gradients, loss per step, same-seed rerun bytes); every family in its
# own child process. A wrong index in a kernel fails here with a row naming the op and its
# kernels (or, for an out-of-bounds access, the emulator's error naming kernel, block and
# thread). Then tests/gpu/run.sh --dry runs the GPU script's phases on the emulator.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-$(pwd)/target}"
cargo build -p lora
lora="$target/debug/lora"
start=$(date +%s)
"$lora" selftest --device emu --seed 2026
echo "60-emu: selftest --device emu took $(( $(date +%s) - start )) s"
# The ops again with the CUDA threads of each block run in a seeded shuffled order between
# barriers (reverse and shuffled orders expose missing __syncthreads and shared-memory races).
LORA_EMU_SCHEDULE=shuffled:7 "$lora" selftest --device emu --seed 2027 --stage ops
LORA_EMU_SCHEDULE=reverse "$lora" selftest --device emu --seed 2028 --stage ops
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
OUT="$out" bash tests/gpu/run.sh --dry "$lora"
n=$(find "$out" -type f | wc -l)
[ "$n" -le 8 ] || { echo "60-emu: run.sh --dry wrote $n files under \$OUT (the device tool returns at most 8)" >&2; exit 1; }
echo "60-emu: run.sh --dry passed with $n files"
