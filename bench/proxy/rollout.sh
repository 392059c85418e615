#!/usr/bin/env bash
# The rollout benchmark (`cargo xtask bench rollout`): pgbench with a new connection per
# transaction (-C) through tendril's default proxy and through HAProxy, each measured once
# undisturbed (the baseline) and once while it is replaced ROLLOUTS times:
#   - tendril: a new tendril-proxy with the same flags plus --takeover (what
#     `systemctl reload` does with deploy/systemd/tendril-proxy.service);
#   - HAProxy 2.6: its seamless reload, the new process taking the listeners from the old
#     one's stats socket (-x, `expose-fd listeners`) and the old one finishing (-sf).
# Reported per run: transactions, failed connects (pgbench aborts a -C client whose connect
# fails), and per-transaction latency (connect included) p50, p99 and max from pgbench's log.
# Expects setup.sh and tendril-up.sh to have run (teardown.sh stops everything, the
# processes started here included). Results: results/<UTC timestamp>-rollout/.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/env.sh"
: "${TENDRIL_BIN:?set TENDRIL_BIN to the directory of the release binaries}"
: "${TENDRIL_DEFAULT_PORT:=25507}"
: "${HAPROXY_ROLLOUT_PORT:=25436}"
: "${ROLLOUTS:=3}"
: "${DURATION:=20}"
: "${CLIENTS:=8}"
: "${ETCD_CLIENT_PORT:=25579}"
export TENDRIL_CLUSTER_NAME=bench TENDRIL_STORE_ENDPOINTS="http://127.0.0.1:$ETCD_CLIENT_PORT"

OUT="$HERE/results/$(date -u +%Y%m%dT%H%M%SZ)-rollout"
mkdir -p "$OUT/pgbench-logs"   # per-transaction logs: large, not committed

# HAProxy as setup.sh configured it, on its own port, with a stats socket that hands its
# listeners over.
sed -e "s/bind 127.0.0.1:$HAPROXY_PORT\$/bind 127.0.0.1:$HAPROXY_ROLLOUT_PORT/" \
  -e "/^global/a\\    stats socket $RUN_DIR/haproxy-rollout.sock mode 600 level admin expose-fd listeners" \
  "$RUN_DIR/haproxy.cfg" >"$RUN_DIR/haproxy-rollout.cfg"
grep -q "bind 127.0.0.1:$HAPROXY_ROLLOUT_PORT" "$RUN_DIR/haproxy-rollout.cfg"
haproxy -c -q -f "$RUN_DIR/haproxy-rollout.cfg"
"${AS_USER[@]}" haproxy -D -f "$RUN_DIR/haproxy-rollout.cfg" -p "$RUN_DIR/haproxy-rollout.pid"

# The flags tendril-up.sh gave its default proxy.
TENDRIL_FLAGS=(--listen-address "127.0.0.1:$TENDRIL_DEFAULT_PORT" --workers 2 --io-driver auto
  --forwarding auto --kernel-client-socket on --uid bench-default)

# One replacement of TARGET; prints how long it took to be serving (ms).
replace() {
  local target=$1 n=$2 start end
  start=$(date +%s%N)
  case "$target" in
    tendril)
      local log="$OUT/tendril-takeover-$n.log"
      TENDRIL_LOG=info "$TENDRIL_BIN/tendril-proxy" "${TENDRIL_FLAGS[@]}" --takeover >"$log" 2>&1 &
      echo $! >"$RUN_DIR/tendril-default.pid"   # teardown.sh stops the current one
      for _ in $(seq 1000); do grep -q "took over" "$log" && break; sleep 0.01; done
      grep -q "took over" "$log" || { echo "takeover $n did not complete:" >&2; cat "$log" >&2; exit 1; }
      ;;
    haproxy)
      "${AS_USER[@]}" haproxy -D -f "$RUN_DIR/haproxy-rollout.cfg" -p "$RUN_DIR/haproxy-rollout.pid" \
        -x "$RUN_DIR/haproxy-rollout.sock" -sf "$(cat "$RUN_DIR/haproxy-rollout.pid")"
      ;;
  esac
  end=$(date +%s%N)
  echo $(((end - start) / 1000000))
}

run() {
  local target=$1 mode=$2 port
  case "$target" in tendril) port=$TENDRIL_DEFAULT_PORT ;; haproxy) port=$HAPROXY_ROLLOUT_PORT ;; esac
  local prefix="$OUT/$target-$mode"
  (cd "$OUT" && exec "$PGBIN/pgbench" -C -S -c "$CLIENTS" -j 2 -T "$DURATION" --log \
    --log-prefix="pgbench-logs/$target-$mode" -h 127.0.0.1 -p "$port" -U "$PG_USER" "$PG_DB") \
    >"$prefix.out" 2>&1 &
  local bench=$! times=()
  if [ "$mode" = rollout ]; then
    local step
    step=$(python3 -c "print($DURATION / ($ROLLOUTS + 1))")
    for n in $(seq "$ROLLOUTS"); do
      sleep "$step"
      times+=("$(replace "$target" "$n")")
    done
  fi
  local rc=0
  wait "$bench" || rc=$?
  python3 - "$OUT" "$target" "$mode" "$rc" "${times[*]:-}" <<'PY' >>"$OUT/runs.jsonl"
import glob, json, re, sys
out, target, mode, rc, times = sys.argv[1:6]
text = open(f"{out}/{target}-{mode}.out").read()
lat = []
for path in glob.glob(f"{out}/pgbench-logs/{target}-{mode}.*"):
    for line in open(path):
        f = line.split()
        if len(f) >= 3 and f[2].isdigit():
            lat.append(int(f[2]))
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000 if lat else None
tps = re.search(r"tps = ([0-9.]+)", text)
print(json.dumps({
    "target": target, "mode": mode, "pgbench_rc": int(rc),
    "transactions": len(lat),
    "failed_connects": len(re.findall(r"client \d+ aborted", text)),
    "errors": [l for l in text.splitlines() if "error" in l.lower() or "abort" in l.lower()][:5],
    "tps": float(tps.group(1)) if tps else None,
    "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lat[-1] / 1000 if lat else None,
    "replace_ms": [int(t) for t in times.split()],
}))
PY
}

for target in tendril haproxy; do
  for mode in baseline rollout; do
    echo "== $target $mode (pgbench -C -S -c $CLIENTS -T $DURATION)"
    run "$target" "$mode"
    tail -1 "$OUT/runs.jsonl"
  done
done

python3 - "$OUT" "$ROLLOUTS" "$DURATION" "$CLIENTS" "$TOPOLOGY" <<'PY' >"$OUT/summary.md"
import json, subprocess, sys
out, rollouts, duration, clients, topology = sys.argv[1:6]
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
load = open("/proc/loadavg").read().split()[0]
print(f"# Rollout benchmark\n\ncommit {commit}, topology {topology}, pgbench -C -S -c {clients} -j 2 -T {duration}, "
      f"{rollouts} replacements in the rollout runs, load average at the end {load}\n")
print("| target | run | transactions | failed connects | p50 ms | p99 ms | max ms | replacement ms |")
print("|---|---|---|---|---|---|---|---|")
for r in runs:
    print(f"| {r['target']} | {r['mode']} | {r['transactions']} | {r['failed_connects']} | "
          f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {' '.join(map(str, r['replace_ms'])) or '-'} |")
PY
cat "$OUT/summary.md"
