#!/usr/bin/env bash
# Builds the benchmark's sockmap stand-in into OUT_DIR: replica.bpf.c with the project's BPF
# build (ebpf/bpf/build.sh: same clang, same vmlinux.h) and replica.c (the probe's design)
# with the system C compiler.
set -euo pipefail
OUT_DIR=${1:?usage: build.sh OUT_DIR}
HERE="$(cd "$(dirname "$0")" && pwd)"
bash "$HERE/../../../ebpf/bpf/build.sh" "$OUT_DIR" "$HERE"
cc -O2 -Wall -o "$OUT_DIR/replica" "$HERE/replica.c" -lbpf
echo "built $OUT_DIR/replica"
