#!/usr/bin/env bash
# Where the kernel path's added cost goes: context switches per transaction, machine-wide,
# under `pgbench -S -M prepared` at -c 1 and -c 16, directly and through tendril's default
# proxy (and userspace io_uring for comparison). Switches into a kernel worker ("kworker")
# are counted apart: a stream verdict's redirect is sent by the target psock's backlog
# worker, never from the softirq that ran the verdict, so each redirected reply costs one
# worker wake-up unless several wait for the same one. Counting only (perf stat on the
# sched_switch tracepoint, one filtered copy for kworkers), so the run is barely disturbed.
#
# TOPOLOGY=remote (the default here: the deployment, PostgreSQL on another "host") or local.
# Needs perf and the release binaries in TENDRIL_BIN; starts and stops its own PostgreSQL,
# etcd and proxies (setup.sh, tendril-up.sh, teardown.sh). Writes results/switches-<ts>/.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
: "${TOPOLOGY:=remote}"
. "$HERE/env.sh"
: "${TENDRIL_BIN:?set TENDRIL_BIN to the directory of the release binaries}"
: "${SECONDS_PER_RUN:=10}"
: "${ROUNDS:=2}"
PERF=$(command -v perf || ls /usr/bin/perf_* 2>/dev/null | head -1 || true)
[ -n "$PERF" ] || { echo "perf not found: apt-get install linux-perf" >&2; exit 2; }
OUT="$HERE/results/switches-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
trap 'bash "$HERE/teardown.sh" >/dev/null 2>&1 || true' EXIT
bash "$HERE/setup.sh" >/dev/null
TENDRIL_BIN="$TENDRIL_BIN" bash "$HERE/tendril-up.sh" >/dev/null

# round target host port clients -> one line: target clients tps switches/txn kworker/txn
measure() {
  local round=$1 target=$2 host=$3 port=$4 clients=$5 jobs=1 pid tps all kw run
  [ "$clients" -gt 1 ] && jobs=2
  run="r$round-$target-c$clients"
  "$PGBIN/pgbench" -h "$host" -p "$port" -U "$PG_USER" -S -M prepared -c "$clients" -j "$jobs" \
    -T "$((SECONDS_PER_RUN + 3))" -P 1 "$PG_DB" >"$OUT/pgbench-$run.txt" 2>&1 &
  pid=$!
  sleep 1.5
  "$PERF" stat -a -x, -e sched:sched_switch -e sched:sched_switch --filter 'next_comm ~ "kworker*"' \
    -o "$OUT/stat-$run.csv" -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1
  wait "$pid"
  # Transactions in the counted window: the per-second progress lines inside it.
  tps=$(awk -v from=2 -v to=$((SECONDS_PER_RUN + 1)) '/^progress:/ { t = $2 + 0; if (t > from && t <= to) { s += $4; n++ } }
    END { if (n) printf "%.0f", s / n; else print 0 }' "$OUT/pgbench-$run.txt")
  all=$(awk -F, '/sched_switch/ { print $1; exit }' "$OUT/stat-$run.csv")
  kw=$(awk -F, '/sched_switch/ { n++; if (n == 2) { print $1; exit } }' "$OUT/stat-$run.csv")
  [ "${tps:-0}" -gt 0 ] && [ -n "$all" ] && [ -n "$kw" ] || {
    echo "$target c$clients: no progress lines or no counts (see $OUT/*-$run.*)" >&2
    return 1
  }
  python3 -c "
tps, all_, kw, secs = $tps, $all, $kw, $SECONDS_PER_RUN
txns = tps * secs
print(f'$target c$clients tps={tps} switches_per_txn={all_ / txns:.2f} kworker_per_txn={kw / txns:.2f}')"
}

{
  echo "# context switches per transaction, topology $TOPOLOGY, $(nproc) CPUs, $(uname -r)"
  for round in $(seq "$ROUNDS"); do
    for clients in 1 16; do
      measure "$round" direct "$PG_HOST" "$PG_PORT" "$clients"
      measure "$round" tendril-default 127.0.0.1 "${TENDRIL_DEFAULT_PORT:-25507}" "$clients"
      measure "$round" tendril-uring 127.0.0.1 "${TENDRIL_URING_PORT:-25500}" "$clients"
    done
  done
} | tee "$OUT/summary.txt"
