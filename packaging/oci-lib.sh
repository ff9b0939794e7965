# Shared by packaging/build-image.sh and packaging/modelcar.sh: daemon-less OCI image helpers over
# umoci (Debian's `umoci`), writing an OCI image layout (image-spec `image-layout.md`).
# Source it; functions exit with a message on failure.

# oci_need TOOL...: stops with the Debian package to install when a tool is missing.
oci_need() {
    local t
    for t in "$@"; do
        if ! command -v "$t" >/dev/null 2>&1; then
            echo "$(basename "$0"): needs \`$t\` (Debian: apt-get install $t)" >&2
            exit 1
        fi
    done
}

# oci_new LAYOUT TAG: a fresh, empty image LAYOUT:TAG (an existing LAYOUT is replaced).
oci_new() {
    rm -rf "$1"
    umoci init --layout "$1"
    umoci new --image "$1:$2"
}

# oci_open LAYOUT TAG BUNDLE: a fresh, empty image and its unpacked bundle; fill BUNDLE/rootfs,
# then oci_commit each layer. (Not `umoci insert`: umoci 0.4.7's insert writes layer tars without
# their end-of-archive blocks, which strict readers refuse.)
oci_open() {
    oci_new "$1" "$2"
    rm -rf "$3"
    umoci unpack --image "$1:$2" "$3" >/dev/null
}

# oci_commit LAYOUT TAG BUNDLE CREATED_BY: what changed in BUNDLE/rootfs since the last commit
# (files added, changed, or removed: whiteouts) becomes the image's next layer.
oci_commit() {
    umoci repack --refresh-bundle --image "$1:$2" --history.created_by "$4" "$3" >/dev/null
}

# oci_report LAYOUT TAG [NAME]: prints the manifest digest and the image's size (what a pull
# transfers: manifest + config + compressed layers), layer by layer.
oci_report() {
    python3 - "$@" <<'PY'
import json, os, sys
layout, tag = sys.argv[1], sys.argv[2]
name = sys.argv[3] if len(sys.argv) > 3 else tag
def blob(d):
    algo, hexd = d["digest"].split(":", 1)
    return os.path.join(layout, "blobs", algo, hexd)
index = json.load(open(os.path.join(layout, "index.json")))
desc = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
if len(desc) != 1:
    sys.exit(f"oci_report: {layout} has no single manifest tagged {tag}")
desc = desc[0]
manifest = json.load(open(blob(desc)))
def human(n):
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
total = desc["size"] + manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
print(f"image   {name}")
print(f"digest  {desc['digest']}")
print(f"size    {human(total)} ({total} bytes: manifest + config + {len(manifest['layers'])} compressed layers)")
config = json.load(open(blob(manifest["config"])))
history = [h for h in config.get("history", []) if not h.get("empty_layer")]
for i, l in enumerate(manifest["layers"]):
    what = history[i].get("created_by", "") if i < len(history) else ""
    print(f"layer {i} {l['digest'][:19]}  {human(l['size']):>10}  {what}")
PY
}

# oci_digest LAYOUT TAG: the manifest digest alone.
oci_digest() {
    oci_report "$1" "$2" | sed -n 's/^digest  //p'
}
