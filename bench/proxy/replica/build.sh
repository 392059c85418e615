#!/usr/bin/env bash
# Builds the sockmap replica (replica.c + replica.bpf.c) into OUT_DIR. Needs what the BPF
# build needs (clang, bpftool, libbpf-dev, kernel BTF) plus a C compiler.
set -euo pipefail
OUT_DIR=${1:?usage: build.sh OUT_DIR}
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT_DIR"
CLANG=""
for c in clang-22 clang-21 clang-20 clang-19 clang; do
  if command -v "$c" >/dev/null 2>&1; then CLANG=$c; break; fi
done
[ -n "$CLANG" ] || { echo "no clang found" >&2; exit 2; }
if [ ! -s "$OUT_DIR/vmlinux.h" ]; then
  bpftool btf dump file /sys/kernel/btf/vmlinux format c >"$OUT_DIR/vmlinux.h"
fi
"$CLANG" -target bpf -O2 -g -I"$OUT_DIR" -c "$HERE/replica.bpf.c" -o "$OUT_DIR/replica.bpf.o"
"$CLANG" -O2 -Wall -o "$OUT_DIR/replica" "$HERE/replica.c" -lbpf
echo "built $OUT_DIR/replica"
