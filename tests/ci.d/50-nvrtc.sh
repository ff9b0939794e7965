#!/usr/bin/env bash
# Stage: every CUDA kernel source (host/engine/kernels/*.cu) compiles with NVRTC for Hopper
# (sm_90), on a machine without a GPU. NVRTC and the CUDA headers come from PyPI wheels pinned to
# CUDA 13.0 (the GPU machine's driver), installed into .venv-nvrtc/. A kernel syntax error fails
# here, not on the GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.venv-nvrtc
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
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
