#!/usr/bin/env bash
# Stage: the lora component against the real kfp SDK (tests/kfp/test_kfp.py).
# Creates .venv-kfp/ with kfp==2.17.3 (idempotent), builds the lora binary and a tiny model,
# runs the test (the contract checks, and a kfp.local pipeline training that model).
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
# The kfp.local check trains a tiny model made by the engine (an ignored e2e test writes it).
model=$(mktemp -d)
trap 'rm -rf "$model"' EXIT
LORA_TINY_MODEL_DIR="$model/tiny" cargo test -q -p lora --test e2e write_tiny_model -- --ignored --exact >/dev/null
LORA_BIN="$target_dir/debug/lora" LORA_TINY_MODEL="$model/tiny" "$venv/bin/python" tests/kfp/test_kfp.py
