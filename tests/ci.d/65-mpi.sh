#!/usr/bin/env bash
# Stage: data parallel for real, several CPU processes under Open MPI (tests/e2e/mpi.rs): 2 and 3
# ranks train the 1-process adapter within float-summation tolerance and repeat it bit for bit;
# a crashing rank stops the run naming it and the run resumes with the same ranks only; a rank
# killed with SIGKILL from outside mid-run stops the run (mpirun names it), leaves no process and
# a checkpoint the run resumes from; a process count that disagrees with mpirun is refused by
# name. Installs Open MPI and libclang from Debian when root (`mpi-sys` runs bindgen at build time). Builds `lora` with
# `--features mpi`, which `cargo test --workspace` does not: bindgen changes shared proc-macro
# features, so the first run rebuilds most of the workspace: measured on 2 cores with the test
# command's own build already in place, about 5.5 min (1.6 lora-engine + mpi-sys, 3.8 the rest,
# wasmtime included), then about 35 s for the four tests (33.5 s measured). The Debian packages:
# about 1 min.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
for pkg in libopenmpi-dev libclang-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "65-mpi: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "skipped: needs ${missing[*]} (Debian packages); run as root with apt-get to install them"
        exit 0
    fi
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# One test at a time: each starts up to 3 ranks on a 2-core machine.
cargo test -p lora --features mpi --test mpi -- --test-threads 1 --nocapture
