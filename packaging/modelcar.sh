#!/usr/bin/env bash
# Builds a modelcar (a model image in the KServe layout: the model folder under /models) from a
# Hugging Face model folder, without a container daemon, as an OCI image layout.
#
#   packaging/modelcar.sh MODEL_DIR LAYOUT TAG
#
# Then push it, e.g. `skopeo copy oci:LAYOUT:TAG docker://registry.example.com/models/name:TAG`,
# and train from it with `--training-base-model oci://registry.example.com/models/name:TAG`.
# The image holds /models only (no shell): KServe's modelcar sidecar needs a shell, lora does not.
# Extra layers: LORA_MODELCAR_EXTRA=DIR adds DIR's files as a second layer under /models;
# LORA_MODELCAR_WHITEOUT=name adds a layer deleting /models/name (both used by the tests).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/oci-lib.sh"
[ $# -eq 3 ] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
model=$1 layout=$2 tag=$3
[ -f "$model/config.json" ] || { echo "modelcar: $model has no config.json: is it a Hugging Face model folder?" >&2; exit 1; }
oci_need umoci python3
bundle=$(mktemp -d)/bundle
trap 'rm -rf "$(dirname "$bundle")"' EXIT
oci_open "$layout" "$tag" "$bundle"
mkdir -p "$bundle/rootfs/models"
cp -a "$model/." "$bundle/rootfs/models/"
oci_commit "$layout" "$tag" "$bundle" "model files from $(basename "$model")"
if [ -n "${LORA_MODELCAR_EXTRA:-}" ]; then
    cp -a "$LORA_MODELCAR_EXTRA/." "$bundle/rootfs/models/"
    oci_commit "$layout" "$tag" "$bundle" "extra files"
fi
if [ -n "${LORA_MODELCAR_WHITEOUT:-}" ]; then
    rm -rf "$bundle/rootfs/models/$LORA_MODELCAR_WHITEOUT"
    oci_commit "$layout" "$tag" "$bundle" "remove /models/$LORA_MODELCAR_WHITEOUT"
fi
umoci config --image "$layout:$tag" --os linux --architecture amd64 \
    --config.label "org.opencontainers.image.title=$(basename "$model")" --history.created_by "modelcar config"
umoci gc --layout "$layout"
oci_report "$layout" "$tag"
