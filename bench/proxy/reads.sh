#!/usr/bin/env bash
# The read benchmark (`cargo xtask bench reads`): pgbench -S (select only) with CLIENTS
# clients through one proxy's listen address (every read on the master) and through its
# read-only listener (the reads spread over the two standbys), alternating, ROUNDS rounds of
# DURATION seconds each. Reported per run: transactions per second, whole-machine CPU per
# transaction (every non-idle jiffy of /proc/stat: pgbench, the proxy and all three
# PostgreSQL servers share the machine's cores), and the read-only connections the proxy
# sent to standbys and to the master (its metrics). Expects the cluster that
# `cargo xtask up --release --state-dir STATE` started (the xtask does it), PostgreSQL on
# this host (loopback). Results: results/<UTC timestamp>-reads/.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
: "${STATE:?set STATE to the state directory of the cluster}"
: "${PROXY_PORT:=25432}"
: "${READ_ONLY_PORT:=25450}"
: "${PROXY_METRICS:=127.0.0.1:25489}"
: "${CLIENTS:=16}"
: "${DURATION:=20}"
: "${ROUNDS:=3}"
: "${SCALE:=10}"
PGBIN=/usr/lib/postgresql/15/bin
export PGPASSWORD="$(cat "$STATE/su.pw")" PGUSER=postgres PGDATABASE=postgres PGHOST=127.0.0.1

OUT="$HERE/results/$(date -u +%Y%m%dT%H%M%SZ)-reads"
mkdir -p "$OUT"

echo "== pgbench -i -s $SCALE through the master listener"
"$PGBIN/pgbench" -i -q -s "$SCALE" -p "$PROXY_PORT" >"$OUT/init.out" 2>&1

metric() {
  curl -sf "http://$PROXY_METRICS/metrics" | awk -v m="$1" 'index($0, m) == 1 { print $2 }' | head -1
}
eligible() {
  curl -sf "http://$PROXY_METRICS/metrics" | grep -c '^tendril_proxy_standby_eligible{.*reason="eligible"} 1' || true
}
echo "== waiting for both standbys to be eligible for reads (replayed the load)"
for _ in $(seq 600); do [ "$(eligible)" = 2 ] && break; sleep 0.1; done
[ "$(eligible)" = 2 ] || { echo "the standbys did not become eligible:" >&2; curl -s "http://$PROXY_METRICS/metrics" | grep standby >&2; exit 1; }

busy_jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

run() {
  local listener=$1 round=$2 port
  case "$listener" in master) port=$PROXY_PORT ;; read_only) port=$READ_ONLY_PORT ;; esac
  local to_standby0 to_master0 cpu0 cpu1 rc=0
  to_standby0=$(metric 'tendril_proxy_read_only_routed_total{cluster="local",to="standby"}')
  to_master0=$(metric 'tendril_proxy_read_only_routed_total{cluster="local",to="master"}')
  cpu0=$(busy_jiffies)
  "$PGBIN/pgbench" -S -c "$CLIENTS" -j 2 -T "$DURATION" -p "$port" >"$OUT/$listener-$round.out" 2>&1 || rc=$?
  cpu1=$(busy_jiffies)
  python3 - "$OUT" "$listener" "$round" "$rc" "$((cpu1 - cpu0))" "$(getconf CLK_TCK)" \
    "$(($(metric 'tendril_proxy_read_only_routed_total{cluster="local",to="standby"}') - to_standby0))" \
    "$(($(metric 'tendril_proxy_read_only_routed_total{cluster="local",to="master"}') - to_master0))" \
    <<'PY' >>"$OUT/runs.jsonl"
import json, re, sys
out, listener, rnd, rc, jiffies, hz, to_standby, to_master = sys.argv[1:9]
text = open(f"{out}/{listener}-{rnd}.out").read()
tps = re.search(r"tps = ([0-9.]+)", text)
done = re.search(r"number of transactions actually processed: (\d+)", text)
failed = re.search(r"number of failed transactions: (\d+)", text)
txns = int(done.group(1)) if done else 0
cpu_us = int(jiffies) * 1e6 / int(hz)
print(json.dumps({
    "listener": listener, "round": int(rnd), "pgbench_rc": int(rc),
    "tps": float(tps.group(1)) if tps else None, "transactions": txns,
    "failed": int(failed.group(1)) if failed else None,
    "machine_cpu_us_per_txn": round(cpu_us / txns, 1) if txns else None,
    "read_only_to_standby": int(to_standby), "read_only_to_master": int(to_master),
}))
PY
}

for round in $(seq "$ROUNDS"); do
  for listener in master read_only; do
    echo "== round $round: $listener listener (pgbench -S -c $CLIENTS -j 2 -T $DURATION)"
    run "$listener" "$round"
    tail -1 "$OUT/runs.jsonl"
  done
done

python3 - "$OUT" "$CLIENTS" "$DURATION" "$SCALE" <<'PY' >"$OUT/summary.md"
import json, statistics, subprocess, sys
out, clients, duration, scale = sys.argv[1:5]
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
load = open("/proc/loadavg").read().split()[0]
cpus = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
print(f"# Read benchmark\n\ncommit {commit}, {cpus} CPUs, PostgreSQL on this host (3 keepers, loopback), "
      f"pgbench -S -c {clients} -j 2 -T {duration} at scale {scale}, load average at the end {load}\n")
print("| round | listener | tps | machine CPU us/txn | failed | to standbys | to master |")
print("|---|---|---|---|---|---|---|")
for r in runs:
    print(f"| {r['round']} | {r['listener']} | {r['tps']:.0f} | {r['machine_cpu_us_per_txn']} | {r['failed']} | "
          f"{r['read_only_to_standby']} | {r['read_only_to_master']} |")
by = lambda l, k: [r[k] for r in runs if r["listener"] == l and r[k] is not None]
m, ro = statistics.median(by("master", "tps")), statistics.median(by("read_only", "tps"))
print(f"\nmedian tps: master listener {m:.0f}, read-only listener {ro:.0f} (ratio {ro / m:.3f}); "
      f"median machine CPU us/txn: {statistics.median(by('master', 'machine_cpu_us_per_txn'))} and "
      f"{statistics.median(by('read_only', 'machine_cpu_us_per_txn'))}")
PY
cat "$OUT/summary.md"
