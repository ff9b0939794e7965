#!/usr/bin/env bash
# The loss chart renders in a real browser: write a sample chart with the same code a run uses,
# screenshot it with headless Chromium (installed from Debian if missing), check the picture is not
# blank and shows the loss lines. The PNGs (1200x1000 and 700x1600)
# stay in target/chart-check/ for people to look at.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$(pwd)/target/chart-check"
mkdir -p "$out"

if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium (Debian package)"
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi

LORA_CHART_SAMPLE="$out/loss_chart.html" cargo test -q -p lora --lib chart::sample >/dev/null
test -s "$out/loss_chart.html"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# A desktop window and a narrow one (the panels stack below 900 px).
for size in 1200,1000 700,1600; do
    png="$out/loss_chart-${size/,/x}.png"
    timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
        --screenshot="$png" --window-size="$size" "file://$out/loss_chart.html" >/dev/null 2>&1
    python3 tests/e2e/check_png.py "$png"
done
