#!/usr/bin/env bash
# A local Ray head on loopback, for `newsray submit` and `ray job submit`.
#   cluster/local.sh start    # head on 127.0.0.1; Jobs API/dashboard on http://127.0.0.1:8265
#   cluster/local.sh status
#   cluster/local.sh stop     # stops this head only (not other Ray instances on the machine)
#
# Auth is chosen explicitly: RAY_AUTH_MODE (default token, as newsray's in-process Ray). The
# token is ~/.ray/auth_token (created if missing); `ray job ...`, `serve ...` and
# `newsray submit` on this machine read it. Every port is set (env overrides below) so the head
# does not collide with an in-process Ray on the same machine. Ray still binds some ports on
# all interfaces (PLATFORM_NOTES): keep token auth on.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV_BIN="${VENV_BIN:-$ROOT/.venv/bin}"
export PATH="$VENV_BIN:$PATH"          # the job drivers' `python` is the project's
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
GCS_PORT="${NEWSRAY_GCS_PORT:-6379}"
DASHBOARD_PORT="${NEWSRAY_DASHBOARD_PORT:-8265}"
AGENT_PORT="${NEWSRAY_AGENT_PORT:-52465}"   # +1 grpc, +2 runtime-env agent, +3 metrics
NUM_CPUS="${NEWSRAY_NUM_CPUS:-$(nproc)}"
STATE_DIR="${NEWSRAY_CLUSTER_DIR:-$ROOT/runs/cluster}"
TEMP_DIR="${NEWSRAY_RAY_TEMP_DIR:-/tmp/ray-newsray}"
PIDFILE="$STATE_DIR/head.pid"
mkdir -p "$STATE_DIR"

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then echo "already running (pid $(cat "$PIDFILE"))"; exit 0; fi
    if [ "$RAY_AUTH_MODE" = token ]; then
      python -c "from newsray.raycluster import ensure_auth_token; ensure_auth_token()"
    fi
    nohup ray start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
      --dashboard-agent-listen-port="$AGENT_PORT" --dashboard-agent-grpc-port="$((AGENT_PORT + 1))" \
      --runtime-env-agent-port="$((AGENT_PORT + 2))" --metrics-export-port="$((AGENT_PORT + 3))" \
      --num-cpus="$NUM_CPUS" --temp-dir="$TEMP_DIR" --disable-usage-stats \
      > "$STATE_DIR/head.log" 2>&1 &
    echo $! > "$PIDFILE"
    # Ready when the Jobs API answers (401 = up, token required; 200 = up, auth disabled).
    for _ in $(seq 1 90); do
      code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$DASHBOARD_PORT/api/version" || true)
      if [ "$code" = 200 ] || [ "$code" = 401 ]; then
        echo "Ray head up (pid $(cat "$PIDFILE")): RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT, GCS 127.0.0.1:$GCS_PORT, auth $RAY_AUTH_MODE"
        exit 0
      fi
      if ! running; then echo "the Ray head exited; see $STATE_DIR/head.log" >&2; exit 1; fi
      sleep 2
    done
    echo "the Ray head did not come up in 180 s; see $STATE_DIR/head.log" >&2
    exit 1
    ;;
  stop)
    if ! running; then echo "not running"; rm -f "$PIDFILE"; exit 0; fi
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid"   # `ray start --block` takes its own processes down with it
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$PIDFILE"
    echo "stopped"
    ;;
  status)
    if running; then echo "running (pid $(cat "$PIDFILE")), http://127.0.0.1:$DASHBOARD_PORT"; ray status --address="127.0.0.1:$GCS_PORT"; else echo "not running"; exit 1; fi
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
