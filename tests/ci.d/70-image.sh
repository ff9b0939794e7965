#!/usr/bin/env bash
# Stage: the container image. packaging/build-image.sh builds it here without a container daemon
# (mmdebstrap + umoci; needs root), then the built image itself is unpacked (umoci unpack) and,
# inside its root filesystem (unshare: own mount, pid and network namespaces, no network; chroot
# as the image's user with exactly the image's environment):
#   - `lora --version`, `lora selftest --device cpu` and a tiny CPU training run succeed;
#   - `lora selftest --device cuda` fails saying no CUDA driver is present;
#   - the binary and every CUDA library resolve their shared libraries in the image;
#   - NVRTC from the image compiles every kernel family for sm_90 with the image's headers
#     (the engine's nvrtc test binary, run inside);
# and the image's tag is the component spec's `image`, and packaging/Containerfile's ENV lines
# are packaging/image.env. Prints the image's digest and size.
#
# Reuses the release build (`cargo build --release -p lora`, ~15 min cold on 2 cores, seconds
# warm), the .debs and wheels kept in target/image/ (~0.75 GB, a cold download ~2-4 min). The
# image layout (~0.7 GB) and the unpacked bundle are removed at the end (LORA_IMAGE_KEEP=1 keeps
# the layout in target/image/oci). LORA_IMAGE=0 skips the stage; LORA_IMAGE_BINARY=PATH puts that
# lora binary in the image instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
if [ "${LORA_IMAGE:-1}" = 0 ]; then
    echo "skipped: LORA_IMAGE=0 (unset it to build the container image and test inside it)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "skipped: building the image needs root (mmdebstrap root mode, chroot); run the test command as root"
    exit 0
fi
missing=()
for t in mmdebstrap umoci unshare; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]/unshare/util-linux}" >/dev/null
fi
started=$(date +%s)
target="${CARGO_TARGET_DIR:-$root/target}"
work="$root/target/image"
bundle="$work/test-bundle"
cleanup() {
    rm -rf "$bundle"
    [ "${LORA_IMAGE_KEEP:-0}" = 1 ] || rm -rf "$work/oci"
}
trap cleanup EXIT

binary="${LORA_IMAGE_BINARY:-$target/release/lora}"
if [ -z "${LORA_IMAGE_BINARY:-}" ]; then
    echo "== 70-image: release binary"
    cargo build --release -p lora
fi
mkdir -p "$work"
bash packaging/build-image.sh --binary "$binary" | tee "$work/build.log"
built=$((  $(date +%s) - started ))

image=$(sed -n 's/^image   //p' "$work/build.log")
spec_image=$("$binary" component | sed -n 's/^ *image: *//p' | head -n 1)
[ "$image" = "$spec_image" ] || { echo "70-image: built $image, the component spec names $spec_image" >&2; exit 1; }
grep -q "image: $image\$" examples/kfp/lora.component.yaml || { echo "70-image: examples/kfp/lora.component.yaml does not name $image" >&2; exit 1; }
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    grep -qxF "ENV $line" packaging/Containerfile || { echo "70-image: packaging/Containerfile lacks ENV $line (packaging/image.env)" >&2; exit 1; }
done < packaging/image.env

echo "== 70-image: unpack ${image##*:} and run inside it"
rm -rf "$bundle"
umoci unpack --image "$work/oci:${image##*:}" "$bundle" >/dev/null
rootfs="$bundle/rootfs"
# The image's process settings, as a runtime would apply them.
mapfile -t envs < <(python3 -c 'import json,sys; [print(e) for e in json.load(open(sys.argv[1]))["process"]["env"]]' "$bundle/config.json")
user=$(python3 -c 'import json,sys; u=json.load(open(sys.argv[1]))["process"]["user"]; print("%d:%d" % (u["uid"], u["gid"]))' "$bundle/config.json")
[ "$user" = "1000:1000" ] || { echo "70-image: the image runs as $user, expected the non-root 1000:1000" >&2; exit 1; }
inside() {
    unshare --mount --pid --net --fork --mount-proc="$rootfs/proc" \
        chroot --userspec="$user" "$rootfs" /usr/bin/env -i "${envs[@]}" "$@"
}

# Fixtures: a tiny model (made by the e2e helpers), the capitals dataset, the nvrtc test binary.
LORA_TINY_MODEL_DIR="$rootfs/home/lora/base" cargo test -q -p lora --test e2e write_tiny_model_fixture -- --ignored >/dev/null
cp examples/data/capitals.jsonl "$rootfs/home/lora/"
nvrtc_test=$(cargo test -p lora-engine --lib --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "lora_engine": print(m["executable"])' | tail -n 1)
install -m 0755 "$nvrtc_test" "$rootfs/home/lora/nvrtc-test"
chown -R 1000:1000 "$rootfs/home/lora"

check() { echo "-- $*"; }
check "lora --version"
v_in=$(inside lora --version)
v_out=$("$binary" --version)
[ "$v_in" = "$v_out" ] || { echo "70-image: $v_in inside, $v_out outside" >&2; exit 1; }
echo "$v_in"

check "shared libraries resolve inside the image"
for f in /usr/local/bin/lora /usr/local/cuda/lib64/libcublas.so.13 /usr/local/cuda/lib64/libcublasLt.so.13 \
         /usr/local/cuda/lib64/libnvrtc.so.13 /usr/local/cuda/lib64/libnvrtc-builtins.so.13.0 /usr/local/cuda/lib64/libnccl.so; do
    out=$(inside /lib64/ld-linux-x86-64.so.2 --list "$f")
    if grep -q "not found" <<<"$out"; then echo "70-image: $f: $out" >&2; exit 1; fi
done
echo "ok"

check "lora selftest --device cpu"
inside lora selftest --device cpu | tail -n 3

check "tiny CPU training run"
inside lora train --training-base-model /home/lora/base --dataset /home/lora/capitals.jsonl \
    --output-model /home/lora/out/model --output-metrics /home/lora/out/metrics.json \
    --output-loss-chart /home/lora/out/loss_chart.html --pvc-path /home/lora/pvc \
    --training-device cpu --training-max-seq-len 256 --training-max-tokens-per-gpu 1024 \
    --training-effective-batch-size 8 --training-num-epochs 1 2>&1 | tail -n 2
for f in adapter/adapter_model.safetensors adapter/adapter_config.json model.safetensors run_manifest.json; do
    [ -s "$rootfs/home/lora/out/model/$f" ] || { echo "70-image: the run inside wrote no out/model/$f" >&2; exit 1; }
done
echo "ok: outputs written by uid $(stat -c %u "$rootfs/home/lora/out/model/adapter/adapter_model.safetensors")"

check "lora selftest --device cuda (no driver here)"
set +e
cuda_out=$(inside lora selftest --device cuda 2>&1)
cuda_rc=$?
set -e
echo "$cuda_out" | tail -n 3
if [ "$cuda_rc" -eq 0 ] || ! grep -q "no CUDA driver found" <<<"$cuda_out" || grep -q "panicked" <<<"$cuda_out"; then
    echo "70-image: expected a clear no-driver failure, got rc=$cuda_rc" >&2
    exit 1
fi

check "NVRTC in the image compiles every kernel family for sm_90"
inside /home/lora/nvrtc-test cuda::nvrtc --ignored 2>&1 | grep -E "^test |test result"

echo "70-image: image $image built in ${built} s, whole stage $(( $(date +%s) - started )) s"
grep -E "^(digest|size) " "$work/build.log"
