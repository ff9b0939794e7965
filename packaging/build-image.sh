#!/usr/bin/env bash
# Builds the lora container image without a container daemon, as an OCI image layout: the same
# image packaging/Containerfile describes for people who have docker or podman.
#
#   packaging/build-image.sh [--binary PATH] [--out DIR]
#
# Layers, in the order they change least to most (a new release pulls only the last):
#   0. Debian bookworm, `essential` variant + ca-certificates + libstdc++6 (NCCL and NVRTC's
#      builtins need it), by mmdebstrap in root mode, docs and locales left out; user `lora`
#      (1000:1000, home /home/lora);
#   1. /usr/local/cuda/{lib64,include,licenses}: cuBLAS, cuBLASLt, NVRTC + builtins, NCCL and the
#      CUDA headers NVRTC needs, from NVIDIA's PyPI wheels pinned in packaging/cuda-wheels.txt
#      (packaging/extract-cuda.py picks the files);
#   2. /usr/local/bin/lora: the release binary (default: $CARGO_TARGET_DIR/release/lora, built by
#      `cargo build --release -p lora`).
# Config: user 1000:1000, workdir /home/lora, entrypoint lora, environment packaging/image.env.
# The CUDA driver (libcuda.so.1) comes from the node through the NVIDIA container runtime.
#
# The tag is the component spec's `image` (`lora component`, from the crate version): one source.
# Output: DIR (default target/image/oci) holds the layout; push it with
#   skopeo copy oci:DIR:<tag> docker://<image>
# Needs root, mmdebstrap, umoci, python3 with pip, and network to Debian's mirror and PyPI (the
# .debs and wheels are kept in target/image/{debs,wheels}, so a rebuild downloads nothing).
# DEBIAN_MIRROR and DEBIAN_SECURITY_MIRROR change the mirrors.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
. "$here/oci-lib.sh"

binary="${CARGO_TARGET_DIR:-$root/target}/release/lora"
work="${LORA_IMAGE_WORK:-$root/target/image}"
out="$work/oci"
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image: unknown argument \`$1\` (see --help)" >&2; exit 2 ;;
    esac
done
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

if [ "$(id -u)" != 0 ]; then
    echo "build-image: run as root (mmdebstrap's root mode, and root-owned files in the layers)" >&2
    exit 1
fi
oci_need mmdebstrap umoci python3
python3 -m pip --version >/dev/null 2>&1 || { echo "build-image: needs pip for python3 (Debian: apt-get install python3-pip)" >&2; exit 1; }
if [ ! -x "$binary" ]; then
    echo "build-image: no release binary at $binary: build it with \`cargo build --release -p lora\`, or pass --binary" >&2
    exit 1
fi
image=$("$binary" component | sed -n 's/^ *image: *//p' | head -n 1)
if [ -z "$image" ]; then
    echo "build-image: \`$binary component\` names no image" >&2
    exit 1
fi
tag=${image##*:}
version=$("$binary" --version)
started=$(date +%s)
step() { echo "== build-image: $* ($(( $(date +%s) - started )) s)"; }

bundle="$work/bundle"
rootfs="$bundle/rootfs"
mkdir -p "$work/debs" "$work/wheels"
trap 'rm -rf "$bundle"' EXIT
oci_open "$out" "$tag" "$bundle"

step "root filesystem: Debian $suite (mmdebstrap)"
mmdebstrap --quiet --mode=root --variant=essential --include=ca-certificates,libstdc++6 --format=directory \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --skip=download/empty --skip=essential/unlink \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
    --setup-hook="sync-in $work/debs /var/cache/apt/archives" \
    --customize-hook="sync-out /var/cache/apt/archives $work/debs" \
    --customize-hook='echo "lora:x:1000:1000:lora:/home/lora:/usr/sbin/nologin" >> "$1/etc/passwd"' \
    --customize-hook='echo "lora:x:1000:" >> "$1/etc/group"' \
    --customize-hook='install -d -o 1000 -g 1000 -m 0755 "$1/home/lora"' \
    --customize-hook='rm -rf "$1"/var/log/* "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old' \
    "$suite" "$rootfs" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main"
rm -f "$work"/debs/lock "$work"/debs/partial 2>/dev/null || true
oci_commit "$out" "$tag" "$bundle" "Debian $suite essential + ca-certificates, libstdc++6 (mmdebstrap); user lora"

step "CUDA libraries (packaging/cuda-wheels.txt)"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --require-hashes \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_18_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    -d "$work/wheels" -r "$here/cuda-wheels.txt"
python3 "$here/extract-cuda.py" "$work/wheels" "$rootfs/usr/local/cuda"
oci_commit "$out" "$tag" "$bundle" "CUDA 13.0 user-space libraries (packaging/cuda-wheels.txt)"

step "the binary, the config ($image)"
install -D -m 0755 "$binary" "$rootfs/usr/local/bin/lora"
oci_commit "$out" "$tag" "$bundle" "$version"
env_args=()
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    env_args+=(--config.env "$line")
done < "$here/image.env"
umoci config --image "$out:$tag" --os linux --architecture amd64 \
    --config.user 1000:1000 --config.workingdir /home/lora \
    --config.entrypoint /usr/local/bin/lora --config.cmd=--help \
    "${env_args[@]}" \
    --config.label "org.opencontainers.image.title=lora" \
    --config.label "org.opencontainers.image.version=${tag}" \
    --config.label "org.opencontainers.image.source=https://github.com/lora-rs/lora" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0" \
    --history.created_by "config: user lora, entrypoint lora, packaging/image.env"
umoci gc --layout "$out"

step "done"
oci_report "$out" "$tag" "$image"
echo "layout: $(du -sh "$out" | cut -f1) on disk; push with: skopeo copy oci:$out:$tag docker://$image"
