#!/usr/bin/env bash
# The rollout benchmark (`cargo xtask bench rollout`): pgbench with a new connection per
# transaction (-C, the "connect" load) and with persistent connections (a pool's, the
# "persistent" load) through tendril's default proxy and through HAProxy, each measured once
# undisturbed (the baseline) and once while it is replaced ROLLOUTS times:
#   - tendril: a new tendril-proxy with the same flags plus --takeover (what
#     `systemctl reload` does with deploy/systemd/tendril-proxy.service);
#   - HAProxy 2.6: its seamless reload, the new process taking the listeners from the old
#     one's stats socket (-x, `expose-fd listeners`) and the old one finishing (-sf).
# Reported per run: transactions, failed clients (pgbench aborts a client whose connect or
# transaction fails), per-transaction latency (connect included under -C) p50, p99 and max
# from pgbench's log, how long each replacement took to serve, and how long each replaced
# process lived on after it (serving the connections it kept; "-" when it was still running
# when pgbench ended).
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

# Records in FILE how long after now the process PID exits (ms), or "-" once STOP exists.
watch_exit() {
  local pid=$1 file=$2 stop=$3 start
  start=$(date +%s%N)
  while kill -0 "$pid" 2>/dev/null; do
    [ -e "$stop" ] && { echo - >"$file"; return; }
    sleep 0.02
  done
  echo $((($(date +%s%N) - start) / 1000000)) >"$file"
}

# One replacement of TARGET; prints how long it took to be serving (ms), and watches the
# replaced process's exit (into $prefix-old-N).
replace() {
  local target=$1 n=$2 prefix=$3 start end old
  case "$target" in
    tendril) old=$(cat "$RUN_DIR/tendril-default.pid") ;;
    haproxy) old=$(cat "$RUN_DIR/haproxy-rollout.pid") ;;
  esac
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
  watch_exit "$old" "$prefix-old-$n" "$prefix.done" &
  echo $(((end - start) / 1000000))
}

run() {
  local target=$1 mode=$2 load=$3 port connect=()
  case "$target" in tendril) port=$TENDRIL_DEFAULT_PORT ;; haproxy) port=$HAPROXY_ROLLOUT_PORT ;; esac
  [ "$load" = connect ] && connect=(-C)
  local name="$target-$load-$mode"
  local prefix="$OUT/$name"
  (cd "$OUT" && exec "$PGBIN/pgbench" "${connect[@]}" -S -c "$CLIENTS" -j 2 -T "$DURATION" --log \
    --log-prefix="pgbench-logs/$name" -h 127.0.0.1 -p "$port" -U "$PG_USER" "$PG_DB") \
    >"$prefix.out" 2>&1 &
  local bench=$! times=()
  if [ "$mode" = rollout ]; then
    local step
    step=$(python3 -c "print($DURATION / ($ROLLOUTS + 1))")
    for n in $(seq "$ROLLOUTS"); do
      sleep "$step"
      times+=("$(replace "$target" "$n" "$prefix")")
    done
  fi
  local rc=0
  wait "$bench" || rc=$?
  touch "$prefix.done"
  sleep 0.1
  python3 - "$OUT" "$target" "$mode" "$rc" "${times[*]:-}" "$load" <<'PY' >>"$OUT/runs.jsonl"
import glob, json, re, sys
out, target, mode, rc, times, load = sys.argv[1:7]
name = f"{target}-{load}-{mode}"
text = open(f"{out}/{name}.out").read()
olds = []
for n in range(1, len(times.split()) + 1):
    try:
        olds.append(open(f"{out}/{name}-old-{n}").read().strip())
    except OSError:
        olds.append("?")
lat = []
for path in glob.glob(f"{out}/pgbench-logs/{name}.*"):
    for line in open(path):
        f = line.split()
        if len(f) >= 3 and f[2].isdigit():
            lat.append(int(f[2]))
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000 if lat else None
tps = re.search(r"tps = ([0-9.]+)", text)
print(json.dumps({
    "target": target, "load": load, "mode": mode, "pgbench_rc": int(rc),
    "transactions": len(lat),
    "failed_clients": len(re.findall(r"client \d+ aborted", text)),
    "errors": [l for l in text.splitlines() if "error" in l.lower() or "abort" in l.lower()][:5],
    "tps": float(tps.group(1)) if tps else None,
    "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lat[-1] / 1000 if lat else None,
    "replace_ms": [int(t) for t in times.split()],
    "old_lived_ms": olds,
}))
PY
  rm -f "$prefix.done"
}

for load in connect persistent; do
  for target in tendril haproxy; do
    for mode in baseline rollout; do
      echo "== $target $load $mode (pgbench -S -c $CLIENTS -T $DURATION)"
      run "$target" "$mode" "$load"
      tail -1 "$OUT/runs.jsonl"
    done
  done
done

python3 - "$OUT" "$ROLLOUTS" "$DURATION" "$CLIENTS" "$TOPOLOGY" <<'PY' >"$OUT/summary.md"
import json, subprocess, sys
out, rollouts, duration, clients, topology = sys.argv[1:6]
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
load = open("/proc/loadavg").read().split()[0]
print(f"# Rollout benchmark\n\ncommit {commit}, topology {topology}, pgbench -S -c {clients} -j 2 -T {duration} "
      f"(connect: with -C; persistent: without), "
      f"{rollouts} replacements in the rollout runs, load average at the end {load}\n")
print("| load | target | run | transactions | failed clients | p50 ms | p99 ms | max ms | replacement ms | replaced process lived on, ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in runs:
    print(f"| {r['load']} | {r['target']} | {r['mode']} | {r['transactions']} | {r['failed_clients']} | "
          f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {' '.join(map(str, r['replace_ms'])) or '-'} | "
          f"{' '.join(r['old_lived_ms']) or '-'} |")
PY
cat "$OUT/summary.md"
