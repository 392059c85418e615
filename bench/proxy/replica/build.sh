#!/usr/bin/env bash
# Builds the benchmark's sockmap stand-ins into OUT_DIR: the *.bpf.c here with the project's
# BPF build (ebpf/bpf/build.sh: same clang, same vmlinux.h), replica.c (the probe's design)
# and msg.c (forwarding on the client's socket) with the system C compiler.
set -euo pipefail
OUT_DIR=${1:?usage: build.sh OUT_DIR}
HERE="$(cd "$(dirname "$0")" && pwd)"
bash "$HERE/../../../ebpf/bpf/build.sh" "$OUT_DIR" "$HERE"
cc -O2 -Wall -o "$OUT_DIR/replica" "$HERE/replica.c" -lbpf
cc -O2 -Wall -o "$OUT_DIR/msg" "$HERE/msg.c" -lbpf
echo "built $OUT_DIR/replica and $OUT_DIR/msg"
