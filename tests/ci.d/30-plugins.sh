#!/usr/bin/env bash
# Stage: the guest side of the plugin contract. `cargo test --workspace` already builds every
# guest plugin from source and runs them through the host (host/plugins/tests); this stage runs
# the guests' own unit tests (e.g. the redaction rules) natively, and checks each example builds
# in release as a third party would ship it.
set -euo pipefail
cd "$(dirname "$0")/../../plugins"
export CARGO_TARGET_DIR="${LORA_PLUGINS_WASM_TARGET:-$(pwd)/target}"
cargo test -q -p ticket-redactor --lib
for p in ticket-redactor schedules csv-reporter; do
    cargo build -q --release --target wasm32-wasip2 -p "$p"
done
ls -l "$CARGO_TARGET_DIR"/wasm32-wasip2/release/*.wasm
# The third-party template builds on its own, outside both workspaces.
(cd ../examples/plugins/constant-lr && cargo build -q --release --target wasm32-wasip2)
test -s "$CARGO_TARGET_DIR/wasm32-wasip2/release/constant_lr.wasm"
