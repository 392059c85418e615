#!/usr/bin/env bash
# Stop everything setup.sh started, by the pids it recorded (never by name).
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
if [ -f "$PG_DATA/postmaster.pid" ]; then
  "${AS_USER[@]}" "$PGBIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null && echo "stopped postgres"
fi
rm -f "$RUN_DIR/postgres.pid"
if [ "${KEEP_DATA:-0}" != 1 ]; then rm -rf "$ANCHOR_DIR"; fi
