#!/usr/bin/env bash
# Stage: every CUDA kernel source (host/engine/kernels/*.cu, the probe families included)
# compiles with NVRTC for Hopper (sm_90), and its PTX assembles with ptxas for sm_90, on a machine
# without a GPU. NVRTC passes inline PTX (kernels/mma.cuh: mma.sync, ldmatrix, cp.async) through
# unchecked; ptxas is what parses it. NVRTC, ptxas and the CUDA headers come from PyPI wheels
# pinned to CUDA 13.0 (the GPU machine's driver), installed into .venv-nvrtc/. A kernel syntax
# error fails here, not on the GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.venv-nvrtc
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvcc==13.0.88
cu13=$("$venv/bin/python" - <<'PY'
import nvidia, os
for base in nvidia.__path__:
    p = os.path.join(base, "cu13")
    if os.path.isdir(os.path.join(p, "lib")) and os.path.isfile(os.path.join(p, "include", "cuda_bf16.h")):
        print(p)
        break
PY
)
if [ -z "$cu13" ]; then
    echo "50-nvrtc: the nvidia wheels did not provide nvidia/cu13/{lib,include/cuda_bf16.h}" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LORA_CUDA_INCLUDE="$cu13/include"
cargo test -p lora-engine --lib cuda::nvrtc -- --ignored --nocapture
ptx=$(mktemp -d)
trap 'rm -rf "$ptx"' EXIT
LORA_PTX_OUT="$ptx" cargo test -p lora-engine --lib cuda::emu::tests::every_family_and_probe_compiles_with_nvrtc_for_sm90 \
    -- --ignored --nocapture
ptxas="$cu13/bin/ptxas"
[ -x "$ptxas" ] || { echo "50-nvrtc: no ptxas in $cu13/bin (nvidia-cuda-nvcc wheel)" >&2; exit 1; }
"$ptxas" --version | tail -1
count=0
for f in "$ptx"/*.ptx; do
    log=$("$ptxas" -v -arch=sm_90 "$f" -o "${f%.ptx}.cubin" 2>&1) || { echo "$log" >&2; echo "50-nvrtc: ptxas rejects $(basename "$f")" >&2; exit 1; }
    # Registers and spills per kernel of the flash family (the kernels whose register pressure
    # decides their speed); the other families use few.
    case "$f" in *flash*) echo "$log" | awk -v q="'" '/Compiling entry function/ {split($0, a, q); k=a[2]} /spill stores/ {split($0, b, ","); s=b[2]} /Used [0-9]+ registers/ {match($0, /Used [0-9]+ registers/); print "  " k ": " substr($0, RSTART, RLENGTH) "," s}' ;; esac
    count=$((count + 1))
done
[ "$count" -gt 0 ] || { echo "50-nvrtc: no PTX was written" >&2; exit 1; }
echo "50-nvrtc: $count families assemble with ptxas for sm_90"
