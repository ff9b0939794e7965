#!/usr/bin/env bash
# Experiment trackers against the real tools: real lora runs log to TensorBoard event files, a
# real `mlflow server` on 127.0.0.1 (started and stopped here) and a W&B offline run; the
# `tensorboard`, `mlflow` and `wandb` packages read them back and the values must equal
# training_metrics.jsonl (tests/e2e/check_trackers.py).
#
# The packages live in .venv-trackers/ (pinned; reused once an install finished), unless
# LORA_TRACKERS_PYTHON names an interpreter that has them. LORA_TRACKERS=0 skips the stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

if [ "${LORA_TRACKERS:-1}" = "0" ]; then
    echo "skipped: LORA_TRACKERS=0"
    exit 0
fi
py="${LORA_TRACKERS_PYTHON:-}"
if [ -z "$py" ]; then
    venv="$root/.venv-trackers"
    if [ ! -f "$venv/.installed" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check "tensorboard==2.21.0" "mlflow==3.17.2" "wandb==0.31.0"
        "$venv/bin/python" -c "import tensorboard, mlflow, wandb"
        touch "$venv/.installed"
    fi
    py="$venv/bin/python"
fi

dir=$(mktemp -d)
server_pid=""
cleanup() {
    # The server runs in its own process group (setsid): its workers go with it.
    if [ -n "$server_pid" ]; then kill -- "-$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT

# The tracking server the runs log to (a sqlite store and an artifact folder in the temp dir).
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$dir/server"
setsid "$py" -m mlflow server --host 127.0.0.1 --port "$port" --workers 1 \
    --backend-store-uri "sqlite:///$dir/server/mlflow.db" --artifacts-destination "$dir/server/artifacts" \
    >"$dir/server/log" 2>&1 &
server_pid=$!
uri="http://127.0.0.1:$port"
for _ in $(seq 1 600); do
    if curl -sf "$uri/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then cat "$dir/server/log"; echo "mlflow server exited"; exit 1; fi
    sleep 1
done
curl -sf "$uri/health" >/dev/null || { cat "$dir/server/log"; echo "mlflow server did not start"; exit 1; }

export WANDB_SILENT=true WANDB_DISABLE_CODE=true
LORA_TRACKERS_DIR="$dir/runs" LORA_TRACKERS_MLFLOW_URI="$uri" LORA_TRACKERS_PYTHON="$py" \
    cargo test -q -p lora --test trackers write_tracker_fixture -- --ignored --nocapture
"$py" tests/e2e/check_trackers.py "$dir/runs"
