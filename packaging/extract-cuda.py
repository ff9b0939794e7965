#!/usr/bin/env python3
"""Copies the CUDA user-space files lora loads out of NVIDIA's wheels (packaging/cuda-wheels.txt).

    extract-cuda.py WHEEL_DIR OUT_DIR

OUT_DIR/lib64: cuBLAS, cuBLASLt, NVRTC + its builtins, NCCL (with the `libnccl.so` name cudarc
looks for); OUT_DIR/include: the CUDA runtime headers NVRTC needs for `cuda_bf16.h`;
OUT_DIR/licenses/<wheel>/: each wheel's licence files. Nothing else (no static libraries, no
`.alt` NVRTC variants, no libnvblas, no libcudart: lora uses the driver API). Used by
packaging/build-image.sh and packaging/Containerfile alike.
"""
import os
import pathlib
import stat
import sys
import zipfile

LIBS = {"libcublas.so.13", "libcublasLt.so.13", "libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnccl.so.2"}
HEADERS = "nvidia/cu13/include/"  # from nvidia-cuda-runtime


def main(wheels: pathlib.Path, out: pathlib.Path) -> int:
    found = set()
    headers = 0
    for whl in sorted(wheels.glob("*.whl")):
        dist = whl.name.split("-")[0]
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                name = info.filename.rsplit("/", 1)[-1]
                parts = info.filename.split("/")
                if len(parts) >= 2 and parts[-2] == "lib" and name in LIBS:
                    dest, mode = out / "lib64" / name, 0o755
                    found.add(name)
                elif dist == "nvidia_cuda_runtime" and info.filename.startswith(HEADERS):
                    rel = info.filename[len(HEADERS):]
                    if ".." in rel.split("/"):
                        raise SystemExit(f"{whl.name}: refusing header path {info.filename}")
                    dest, mode = out / "include" / rel, 0o644
                    headers += 1
                elif ".dist-info/" in info.filename and name.lower().startswith(("licen", "copying", "notice")):
                    dest, mode = out / "licenses" / dist / name, 0o644
                else:
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.chmod(dest, mode)
    missing = sorted(LIBS - found)
    if missing:
        print(f"extract-cuda: the wheels in {wheels} lack {', '.join(missing)}", file=sys.stderr)
        return 1
    if not (out / "include" / "cuda_bf16.h").is_file():
        print(f"extract-cuda: no cuda_bf16.h among the {headers} headers of nvidia-cuda-runtime", file=sys.stderr)
        return 1
    link = out / "lib64" / "libnccl.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("libnccl.so.2")
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        os.chmod(d, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    print(f"extract-cuda: {len(found)} libraries, {headers} headers into {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])))
