#!/usr/bin/env bash
# Starts what the tendril targets need beside the harness's setup (setup.sh): an etcd,
# cluster data whose proxy section routes to the benchmark PostgreSQL, and six tendril
# proxies: the defaults (TENDRIL_DEFAULT_PORT: no forwarding flag, what a user gets),
# userspace forwarding on io_uring (TENDRIL_URING_PORT) and on epoll
# (TENDRIL_EPOLL_PORT), kernel forwarding (TENDRIL_KERNEL_PORT:
# --forwarding kernel --kernel-client-socket on, so local non-blocking clients like pgbench here go on their own
# socket, with direct replies from this host's PostgreSQL) and with --kernel-client-socket
# off (TENDRIL_KERNEL_PAIR_PORT: the pair path on the proxy's two sockets, which remote
# clients take with --forwarding kernel), userspace on io_uring with a single worker
# (TENDRIL_URING_W1_PORT: every connection on one ring); with REPLICA_DIR, also the probe's
# minimal sockmap proxy (REPLICA_PORT; local topology only). Which path each flag gives:
# README.md. The proxies listen on 127.0.0.1 and route to PostgreSQL at $PG_HOST:$PG_PORT
# (in the remote topology, another "host": no direct replies there). Pids go to $RUN_DIR,
# stopped by teardown.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/env.sh"
: "${TENDRIL_BIN:?set TENDRIL_BIN to the directory of the release binaries}"
: "${TENDRIL_DEFAULT_PORT:=25507}"
: "${TENDRIL_URING_PORT:=25500}"
: "${TENDRIL_EPOLL_PORT:=25501}"
: "${TENDRIL_KERNEL_PORT:=25502}"
: "${TENDRIL_KERNEL_PAIR_PORT:=25505}"
: "${TENDRIL_URING_W1_PORT:=25506}"
: "${ETCD_CLIENT_PORT:=25579}"
: "${ETCD_PEER_PORT:=25580}"
mkdir -p "$RUN_DIR/etcd"
etcd --name bench --data-dir "$RUN_DIR/etcd/data" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER_PORT" >"$RUN_DIR/etcd/etcd.log" 2>&1 &
echo $! >"$RUN_DIR/tendril-etcd.pid"
export TENDRIL_CLUSTER_NAME=bench TENDRIL_STORE_ENDPOINTS="http://127.0.0.1:$ETCD_CLIENT_PORT"
for _ in $(seq 100); do "$TENDRIL_BIN/tendrilctl" spec --defaults >/dev/null && curl -sf "http://127.0.0.1:$ETCD_CLIENT_PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
"$TENDRIL_BIN/tendrilctl" init --force >/dev/null
"$TENDRIL_BIN/tendrilctl" clusterdata read | python3 -c "
import json, sys
cd = json.load(sys.stdin)
cd['proxy']['generation'] += 1
cd['proxy']['master'] = {'db_uid': 'bench', 'address': '$PG_HOST', 'port': int('$PG_PORT')}
print(json.dumps(cd))" | "$TENDRIL_BIN/tendrilctl" clusterdata write --yes >/dev/null
for variant in default:$TENDRIL_DEFAULT_PORT:auto:auto:on:2 uring:$TENDRIL_URING_PORT:auto:userspace:on:2 epoll:$TENDRIL_EPOLL_PORT:epoll:userspace:on:2 \
  kernel:$TENDRIL_KERNEL_PORT:auto:kernel:on:2 kernel-pair:$TENDRIL_KERNEL_PAIR_PORT:auto:kernel:off:2 \
  uring-w1:$TENDRIL_URING_W1_PORT:auto:userspace:on:1; do
  IFS=: read -r name port driver forwarding client_socket workers <<<"$variant"
  TENDRIL_LOG=warn "$TENDRIL_BIN/tendril-proxy" --listen-address "127.0.0.1:$port" --workers "$workers" \
    --io-driver "$driver" --forwarding "$forwarding" --kernel-client-socket "$client_socket" \
    --uid "bench-$name" >"$RUN_DIR/tendril-$name.log" 2>&1 &
  echo $! >"$RUN_DIR/tendril-$name.pid"
done
# The feasibility probe's minimal sockmap proxy (replica/), when built: the reference the
# kernel path is compared with in the same rounds.
: "${REPLICA_PORT:=25503}"
ports=("$TENDRIL_DEFAULT_PORT" "$TENDRIL_URING_PORT" "$TENDRIL_EPOLL_PORT" "$TENDRIL_KERNEL_PORT" "$TENDRIL_KERNEL_PAIR_PORT" "$TENDRIL_URING_W1_PORT")
if [ -n "${REPLICA_DIR:-}" ] && [ "$TOPOLOGY" = remote ]; then
  # replica.c connects to 127.0.0.1:PG_PORT, where nothing listens in this topology.
  echo "note: TOPOLOGY=remote: the sockmap replica is not started (it assumes PostgreSQL on 127.0.0.1)"
elif [ -n "${REPLICA_DIR:-}" ] && [ -x "$REPLICA_DIR/replica" ]; then
  "$REPLICA_DIR/replica" "$REPLICA_PORT" "$PG_PORT" "$REPLICA_DIR/replica.bpf.o" >"$RUN_DIR/replica.log" 2>&1 &
  echo $! >"$RUN_DIR/replica.pid"
  ports+=("$REPLICA_PORT")
fi
for port in "${ports[@]}"; do
  for _ in $(seq 100); do
    "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U "$PG_USER" -d "$PG_DB" -Atc 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U "$PG_USER" -d "$PG_DB" -Atc 'select 1' >/dev/null
done
echo "proxies up on ${ports[*]} (tendril default, io_uring, epoll, kernel, kernel-pair, io_uring with one worker; then the sockmap replica if built)"
