#!/usr/bin/env bash
# Stage: lora-engine built without its CPU device emulator, as on a machine with no C++ compiler
# (LORA_EMU=off makes host/engine/build.rs skip the C++). The crate must still build, and the
# emulator must answer "built without a C++ compiler" instead of failing later
# (cuda::emu::tests::built_or_says_why). Uses its own target folder, so the main build is not
# rebuilt; the first run builds lora-engine's dependencies there (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-$(pwd)/target}/emu-off"
LORA_EMU=off CARGO_TARGET_DIR="$target" cargo test -p lora-engine --lib cuda::emu -- --nocapture
