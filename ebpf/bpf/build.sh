#!/usr/bin/env bash
# Builds the BPF objects into OUT_DIR: generates vmlinux.h from the running kernel's BTF with
# bpftool, then compiles every *.bpf.c of SRC_DIR (default: this directory) with clang
# (-target bpf -O2 -g). Used by the loader's build script, by `cargo xtask build-ebpf` and by
# the benchmark's sockmap replica, so all build the same way.
#
# Needs: clang (clang-19 or newer preferred; Debian's clang 14 lacks kfunc support in BTF),
# bpftool, libbpf-dev headers, and /sys/kernel/btf/vmlinux (a kernel with BTF).
set -euo pipefail
OUT_DIR=${1:?usage: build.sh OUT_DIR [SRC_DIR]}
HERE="$(cd "$(dirname "$0")" && pwd)"
SRC_DIR="${2:-$HERE}"
mkdir -p "$OUT_DIR"
CLANG=""
for c in ${CLANG_BPF:-} clang-22 clang-21 clang-20 clang-19 clang; do
  if command -v "$c" >/dev/null 2>&1; then CLANG=$c; break; fi
done
[ -n "$CLANG" ] || { echo "no clang found: apt-get install clang-19" >&2; exit 2; }
BPFTOOL=$(command -v bpftool || echo /usr/sbin/bpftool)
[ -x "$BPFTOOL" ] || { echo "no bpftool found: apt-get install bpftool" >&2; exit 2; }
[ -r /sys/kernel/btf/vmlinux ] || { echo "/sys/kernel/btf/vmlinux missing: the kernel has no BTF" >&2; exit 2; }
[ -r /usr/include/bpf/bpf_helpers.h ] || { echo "libbpf headers missing: apt-get install libbpf-dev" >&2; exit 2; }
if [ ! -s "$OUT_DIR/vmlinux.h" ]; then
  "$BPFTOOL" btf dump file /sys/kernel/btf/vmlinux format c >"$OUT_DIR/vmlinux.h.tmp"
  mv "$OUT_DIR/vmlinux.h.tmp" "$OUT_DIR/vmlinux.h"
fi
ARCH=$(uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
for src in "$SRC_DIR"/*.bpf.c; do
  obj="$OUT_DIR/$(basename "${src%.c}").o"
  "$CLANG" -target bpf -O2 -g -D__TARGET_ARCH_"$ARCH" -I"$OUT_DIR" -I/usr/include/"$(uname -m)"-linux-gnu \
    -c "$src" -o "$obj"
  echo "built $obj with $CLANG"
done
