#!/usr/bin/env bash
# Interop with the Python stack: our PEFT adapter loads in PEFT and matches our logits; our
# merged model loads in transformers and matches PEFT's merge_and_unload(); QLoRA: our adapter over
# our bitsandbytes 4-bit checkpoint matches PEFT + bitsandbytes, and the merged model is the 16-bit
# weights plus the adapter bit for bit (tests/e2e/interop.py).
#
# transformers + PEFT + bitsandbytes need torch (~3 GB from PyPI; about 3-5 minutes to install
# here). The test command sets them up itself in .venv-interop/ (kept between runs), unless
# LORA_INTEROP=0 skips the stage (for quick local runs), or LORA_INTEROP_PYTHON names an
# interpreter that already has torch, transformers, peft and bitsandbytes 0.50.2.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

py="${LORA_INTEROP_PYTHON:-}"
if [ -z "$py" ]; then
    # A venv is reused only once its install finished (an interrupted pip, e.g. a full disk,
    # leaves a venv without torch; it is installed again rather than failing every later run).
    if [ -f "$root/.venv-interop/.installed" ]; then
        py="$root/.venv-interop/bin/python"
    elif [ "${LORA_INTEROP:-1}" = "0" ]; then
        echo "skipped: LORA_INTEROP=0 (unset it to install torch+transformers+peft into .venv-interop and run the interop check)"
        exit 0
    else
        python3 -m venv "$root/.venv-interop"
        "$root/.venv-interop/bin/pip" install -q "torch==2.11.*" "transformers==5.17.*" "peft==0.21.2" "bitsandbytes==0.50.2" safetensors numpy
        "$root/.venv-interop/bin/python" -c "import torch, transformers, peft, bitsandbytes"
        touch "$root/.venv-interop/.installed"
        py="$root/.venv-interop/bin/python"
    fi
    # A venv installed before QLoRA's checks lacks bitsandbytes: add it (small, no torch reinstall).
    if ! "$py" -c "import bitsandbytes" >/dev/null 2>&1; then
        "$root/.venv-interop/bin/pip" install -q "bitsandbytes==0.50.2"
    fi
fi
"$py" -c "import bitsandbytes, sys; v = bitsandbytes.__version__; sys.exit(0 if v == '0.50.2' else 'interop needs bitsandbytes 0.50.2, found ' + v)"

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
LORA_INTEROP_DIR="$dir" cargo test -q -p lora --test e2e write_interop_fixture -- --ignored
"$py" tests/e2e/interop.py "$dir"
