#!/usr/bin/env bash
# Builds the sockmap replica into OUT_DIR: replica.bpf.c with the project's BPF build
# (ebpf/bpf/build.sh: same clang, same vmlinux.h), replica.c with the system C compiler.
set -euo pipefail
OUT_DIR=${1:?usage: build.sh OUT_DIR}
HERE="$(cd "$(dirname "$0")" && pwd)"
bash "$HERE/../../../ebpf/bpf/build.sh" "$OUT_DIR" "$HERE"
cc -O2 -Wall -o "$OUT_DIR/replica" "$HERE/replica.c" -lbpf
echo "built $OUT_DIR/replica"
