#!/usr/bin/env bash
# Stage: wasi:nn for preprocessors (host/plugins feature `wasi-nn`). ONNX Runtime 1.31.1 comes
# from the PyPI `onnxruntime` wheel (its libonnxruntime.so, loaded at run time through
# ORT_DYLIB_PATH), the test models are written by tests/nn/make_test_models.py with `onnx` +
# `numpy`, all in .venv-nn/ (kept between runs). The tests build the guest plugins/hostile/nn
# and run every hostile case (ungranted name, load of raw bytes, i64 into f32, wrong rank, a
# 2 GiB tensor, the per-plugin tensor limit, a model past the deadline) through the sandbox,
# then a missing ONNX Runtime library in a process of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
if [ ! -f "$root/.venv-nn/.installed" ]; then
    python3 -m venv "$root/.venv-nn"
    "$root/.venv-nn/bin/pip" install -q "onnxruntime==1.31.1" "onnx==1.23.*" numpy
    touch "$root/.venv-nn/.installed"
fi
lib=$(ls "$root"/.venv-nn/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1)
export ORT_DYLIB_PATH="$lib" LORA_NN_PYTHON="$root/.venv-nn/bin/python"
cargo test -q -p lora-plugins --features wasi-nn --test nn --test nn_missing_ort
