#!/usr/bin/env bash
# Stage: the guest side of the plugin contract. `cargo test --workspace` already builds every
# guest plugin from source and runs them through the host (host/plugins/tests); this stage runs
# the guests' own unit tests (e.g. the redaction rules) natively, checks each example and the
# third-party template build in release as they would ship, and runs the Python guest
# (componentize-py from PyPI, in .venv-plugins/) through the host.
set -euo pipefail
cd "$(dirname "$0")/../../plugins"
host_target="${CARGO_TARGET_DIR:-}"   # the host crates' target dir, restored for the host test
export CARGO_TARGET_DIR="${LORA_PLUGINS_WASM_TARGET:-$(pwd)/target}"
cargo test -q -p ticket-redactor --lib
cargo test -q -p lora-plugin --features reporter,http --lib   # the SDK's URL handling, natively
for p in ticket-redactor schedules csv-reporter webhook-reporter; do
    cargo build -q --release --target wasm32-wasip2 -p "$p"
done
ls -l "$CARGO_TARGET_DIR"/wasm32-wasip2/release/*.wasm
# The third-party template builds on its own, outside both workspaces.
(cd ../examples/plugins/constant-lr && cargo build -q --release --target wasm32-wasip2)
test -s "$CARGO_TARGET_DIR/wasm32-wasip2/release/constant_lr.wasm"

# A Python guest (componentize-py from PyPI) through the same host and sandbox.
cd ..
if [ ! -x .venv-plugins/bin/componentize-py ]; then
    python3 -m venv .venv-plugins
    .venv-plugins/bin/pip install -q "componentize-py==0.25.*"
fi
(cd plugins/py-alpaca && ../../.venv-plugins/bin/componentize-py -d ../../wit -w preprocessor \
    componentize app -o "$CARGO_TARGET_DIR/py_alpaca.wasm" >/dev/null)
py_plugin="$CARGO_TARGET_DIR/py_alpaca.wasm"
if [ -n "$host_target" ]; then export CARGO_TARGET_DIR="$host_target"; else unset CARGO_TARGET_DIR; fi
LORA_PY_PLUGIN="$py_plugin" cargo test -q -p lora-plugins --test python
