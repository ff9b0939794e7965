#!/usr/bin/env bash
# The test command: sets up what the tests need (Rust target, Python venvs, tools) and runs
# every test. Works on a fresh clone; `.ci/run` calls it.
#
#   bash tests/run.sh            # everything
#   LORA_TEST_QUICK=1 bash tests/run.sh   # cargo tests only, no stage scripts
#
# Stage scripts in tests/ci.d/ run in name order after `cargo test`; each sets up its own
# environment (a venv under .venv-<stage>/, a wheel, a Debian package) and exits non-zero on
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# The toolchain file pins Rust 1.95 and the wasm32-wasip2 target; make sure the target is there.
if command -v rustup >/dev/null 2>&1; then
    rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
fi

echo "== cargo test (workspace)"
cargo test --workspace --no-fail-fast 2>&1 | tee "${TMPDIR:-/tmp}/lora-cargo-test.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || { echo "cargo test failed"; exit "$status"; }

if [ -z "${LORA_TEST_QUICK:-}" ]; then
    for stage in "$root"/tests/ci.d/*.sh; do
        [ -e "$stage" ] || continue
        echo "== stage $(basename "$stage")"
        bash "$stage"
    done
fi
echo "all tests passed"
