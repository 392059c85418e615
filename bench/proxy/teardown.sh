#!/usr/bin/env bash
# Stop everything setup.sh started, by the pids it recorded (never by name), and in the
# remote topology delete the network namespace it made (which removes the veth pair).
# KEEP_DATA=1 keeps $ANCHOR_DIR; otherwise it is removed.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/env.sh"

stop_pid() {  # name pidfile
  local name=$1 f=$2 pid
  [ -f "$f" ] || return 0
  pid=$(head -1 "$f" | tr -dc 0-9)
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

stop_pid tendril-default "$RUN_DIR/tendril-default.pid"
stop_pid tendril-uring "$RUN_DIR/tendril-uring.pid"
stop_pid tendril-epoll "$RUN_DIR/tendril-epoll.pid"
stop_pid tendril-kernel "$RUN_DIR/tendril-kernel.pid"
stop_pid tendril-kernel-pair "$RUN_DIR/tendril-kernel-pair.pid"
stop_pid tendril-uring-w1 "$RUN_DIR/tendril-uring-w1.pid"
stop_pid replica "$RUN_DIR/replica.pid"
stop_pid tendril-etcd "$RUN_DIR/tendril-etcd.pid"
stop_pid pgb-session "$RUN_DIR/pgb-session.pid"
stop_pid pgb-txn "$RUN_DIR/pgb-txn.pid"
stop_pid haproxy "$RUN_DIR/haproxy.pid"
stop_pid haproxy-rollout "$RUN_DIR/haproxy-rollout.pid"
# Also in the remote topology: pg_ctl stop signals the pid in postmaster.pid and waits for
# the file to go, and the namespace shares this PID namespace and file system.
if [ -f "$PG_DATA/postmaster.pid" ]; then
  "${AS_USER[@]}" "$PGBIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null && echo "stopped postgres"
fi
rm -f "$RUN_DIR/postgres.pid"
# The namespace setup.sh made and recorded (whatever TOPOLOGY says now). Only the harness
# starts processes in it, so whatever still runs there (PostgreSQL that did not stop) is ours.
ns=""
if [ -f "$RUN_DIR/netns" ]; then ns=$(cat "$RUN_DIR/netns"); fi
if [ -n "$ns" ] && ip netns list | awk '{print $1}' | grep -qxF "$ns"; then
  left=$(ip netns pids "$ns" | tr '\n' ' ')
  if [ -n "$left" ]; then
    echo "still running in namespace $ns: $left; stopping them" >&2
    kill -TERM $left 2>/dev/null
    for _ in $(seq 50); do [ -z "$(ip netns pids "$ns")" ] && break; sleep 0.1; done
    left=$(ip netns pids "$ns" | tr '\n' ' ')
    if [ -n "$left" ]; then kill -KILL $left 2>/dev/null; sleep 0.2; fi
  fi
  ip netns delete "$ns" && echo "deleted network namespace $ns"
elif [ -z "$ns" ] && [ "$TOPOLOGY" = remote ] && ip netns list | awk '{print $1}' | grep -qxF "$NETNS"; then
  echo "network namespace $NETNS exists but $RUN_DIR did not record it: left alone" \
    "(ip netns delete $NETNS if it is a leftover)" >&2
fi
rm -f "$RUN_DIR/netns" "$RUN_DIR/topology"
if [ "${KEEP_DATA:-0}" != 1 ]; then rm -rf "$ANCHOR_DIR"; fi
