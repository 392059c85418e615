#!/usr/bin/env bash
# CPU profiles of tendril under `pgbench -S -M prepared -c16 -j2` (perf, cpu-clock, call
# graphs): the userspace proxy process (io_uring driver, two workers and one), and the whole machine while the
# kernel path forwards. Writes perf reports to results/profile-<ts>/. Needs perf
# (linux-perf) and the release binaries in TENDRIL_BIN; starts and stops its own PostgreSQL,
# etcd and proxies with setup.sh, tendril-up.sh and teardown.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
: "${TOPOLOGY:=local}"   # what setup.sh starts, not what a previous setup recorded
. "$HERE/env.sh"
: "${TENDRIL_BIN:?set TENDRIL_BIN to the directory of the release binaries}"
: "${SECONDS_PER_PROFILE:=15}"
PERF=$(command -v perf || ls /usr/bin/perf_* 2>/dev/null | head -1 || true)
[ -n "$PERF" ] || { echo "perf not found: apt-get install linux-perf" >&2; exit 2; }
OUT="$HERE/results/profile-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
trap 'bash "$HERE/teardown.sh" >/dev/null 2>&1 || true' EXIT
bash "$HERE/setup.sh" >/dev/null
TENDRIL_BIN="$TENDRIL_BIN" bash "$HERE/tendril-up.sh"
# Started in the background of this shell (not in a command substitution) so `wait` works.
load() {
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$1" -U "$PG_USER" -S -M prepared -c 16 -j 2 \
    -T "$((SECONDS_PER_PROFILE + 2))" "$PG_DB" >"$OUT/pgbench-$2.txt" 2>&1 &
}
# Userspace forwarding: the proxy process only.
load 25500 uring
pid=$!
sleep 1
"$PERF" record -q -e cpu-clock -F 999 -g -p "$(cat "$RUN_DIR/tendril-uring.pid")" \
  -o "$OUT/uring.data" -- sleep "$SECONDS_PER_PROFILE" 2>/dev/null
wait "$pid" || true
"$PERF" report -i "$OUT/uring.data" --no-children -g none --percent-limit 0.5 --sort dso,sym --stdio 2>/dev/null \
  | grep -v '^$' | head -80 >"$OUT/uring-report.txt" || true
# The same userspace path with one worker (every connection on one ring).
load 25506 uring-w1
pid=$!
sleep 1
"$PERF" record -q -e cpu-clock -F 999 -g -p "$(cat "$RUN_DIR/tendril-uring-w1.pid")" \
  -o "$OUT/uring-w1.data" -- sleep "$SECONDS_PER_PROFILE" 2>/dev/null
wait "$pid" || true
"$PERF" report -i "$OUT/uring-w1.data" --no-children -g none --percent-limit 0.5 --sort dso,sym --stdio 2>/dev/null \
  | grep -v '^$' | head -80 >"$OUT/uring-w1-report.txt" || true
# Kernel forwarding: nothing runs in the proxy, so profile every CPU.
load 25502 kernel
pid=$!
sleep 1
"$PERF" record -q -e cpu-clock -F 999 -g -a -o "$OUT/kernel.data" -- sleep "$SECONDS_PER_PROFILE" 2>/dev/null
wait "$pid" || true
"$PERF" report -i "$OUT/kernel.data" --no-children -g none --percent-limit 0.4 --sort comm,sym --stdio 2>/dev/null \
  | grep -v '^$' | head -120 >"$OUT/kernel-report.txt" || true
# Totals: where the proxy's time goes (its code, libc, the kernel), and which processes and
# kernel threads use the machine while the kernel path forwards.
"$PERF" report -i "$OUT/uring.data" --no-children -g none --sort dso --stdio 2>/dev/null \
  | grep -v '^$' >"$OUT/uring-by-dso.txt" || true
"$PERF" report -i "$OUT/uring-w1.data" --no-children -g none --sort dso --stdio 2>/dev/null \
  | grep -v '^$' >"$OUT/uring-w1-by-dso.txt" || true
"$PERF" report -i "$OUT/kernel.data" --no-children -g none --sort comm --stdio 2>/dev/null \
  | grep -v '^$' >"$OUT/kernel-by-comm.txt" || true
rm -f "$OUT"/*.data
grep -h "tps = \|latency average" "$OUT"/pgbench-*.txt || true
echo "profiles in $OUT"
