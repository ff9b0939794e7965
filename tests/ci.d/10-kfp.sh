#!/usr/bin/env bash
# Stage: the lora component against the real kfp SDK (tests/kfp/test_kfp.py).
# Creates .venv-kfp/ with kfp==2.17.3 (idempotent), builds the lora binary, runs the test.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
venv="$root/.venv-kfp"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import kfp, yaml, jsonschema; assert kfp.__version__ == "2.17.3"' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'kfp==2.17.3' 'pyyaml>=6' 'jsonschema>=4'
fi
cargo build -p lora --quiet
target_dir=$(cargo metadata --format-version 1 --no-deps | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
LORA_BIN="$target_dir/debug/lora" "$venv/bin/python" tests/kfp/test_kfp.py
