#!/usr/bin/env bash
# Interop with the Python stack: our PEFT adapter loads in PEFT and matches our logits; our
# merged model loads in transformers and matches PEFT's merge_and_unload() (tests/e2e/interop.py).
#
# transformers + PEFT need torch (~3 GB from PyPI), too heavy for every CI run. This stage runs
# when LORA_INTEROP=1 (it then builds .venv-interop from PyPI), or when LORA_INTEROP_PYTHON names
# an interpreter that already has torch, transformers and peft, or when .venv-interop exists
# from an earlier run. Otherwise it says so and passes.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

py="${LORA_INTEROP_PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x "$root/.venv-interop/bin/python" ]; then
        py="$root/.venv-interop/bin/python"
    elif [ "${LORA_INTEROP:-}" = "1" ]; then
        python3 -m venv "$root/.venv-interop"
        "$root/.venv-interop/bin/pip" install -q "torch==2.11.*" "transformers==5.17.*" "peft==0.21.2" safetensors numpy
        py="$root/.venv-interop/bin/python"
    else
        echo "skipped: set LORA_INTEROP=1 (installs torch+transformers+peft into .venv-interop, ~3 GB) or LORA_INTEROP_PYTHON=/path/to/python"
        exit 0
    fi
fi

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
LORA_INTEROP_DIR="$dir" cargo test -q -p lora --test e2e write_interop_fixture -- --ignored
"$py" tests/e2e/interop.py "$dir"
