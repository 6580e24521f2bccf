#!/usr/bin/env bash
# A local multi-node Ray cluster on loopback, with the services a cluster needs.
#   cluster/local.sh start [--workers N] [--no-services]
#       a Ray head (0 CPUs for work when N > 0) and N worker nodes, each a real `ray start`
#       process on 127.0.0.1 with its own --num-cpus and a resource naming it
#       (newsray_head, newsray_worker_1 ... newsray_worker_N); beside them a real `mlflow server`
#       (SQLite on the head, --serve-artifacts) and an S3-compatible server (moto_server) with a
#       bucket. Components already running are left alone; a missing one (a killed node) is
#       started again, so `start` also replaces a dead worker node.
#   cluster/local.sh status   # every component, then `ray status`
#   cluster/local.sh env      # the exports a client needs (also written to $STATE_DIR/env.sh)
#   cluster/local.sh stop     # ends only the processes this script started (by pid / their process group)
#
# Auth is chosen explicitly: RAY_AUTH_MODE (default token, as newsray's in-process Ray). The
# token is ~/.ray/auth_token (created if missing); `ray job ...`, `serve ...` and
# `newsray submit` on this machine read it. Every port is set (env overrides below) so nothing
# collides with another Ray, MLflow or S3 server on the machine. Ray still binds some ports on
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
WORKER_PORT_BASE="${NEWSRAY_WORKER_PORT_BASE:-52500}"  # worker K: base+10K .. base+10K+5
WORKER_CPUS="${NEWSRAY_WORKER_CPUS:-1}"
OBJECT_STORE_MB="${NEWSRAY_OBJECT_STORE_MB:-512}"   # per node (Ray's default is 30% of RAM each)
MLFLOW_PORT="${NEWSRAY_MLFLOW_PORT:-5055}"
S3_PORT="${NEWSRAY_S3_PORT:-5056}"
S3_BUCKET="${NEWSRAY_S3_BUCKET:-newsray}"
STATE_DIR="${NEWSRAY_CLUSTER_DIR:-$ROOT/runs/cluster}"
TEMP_DIR="${NEWSRAY_RAY_TEMP_DIR:-/tmp/ray-newsray}"
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"

# moto's fixed credentials: they only name the local server's account, they are not secrets.
S3_ENV=(AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
        AWS_DEFAULT_REGION=us-east-1)

pidfile() { echo "$STATE_DIR/$1.pid"; }
running() { local f; f=$(pidfile "$1"); [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }
components() {  # every component this state dir has a pid file for, head last
  local f
  for f in "$STATE_DIR"/worker-*.pid "$STATE_DIR"/mlflow.pid "$STATE_DIR"/s3.pid "$STATE_DIR"/head.pid; do
    [ -f "$f" ] && basename "$f" .pid
  done
  return 0
}

# Start a command in its own session (its pid = its process group), logging to STATE_DIR/NAME.log.
launch() {
  local name=$1; shift
  setsid nohup "$@" > "$STATE_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$(pidfile "$name")"
}

wait_http() {  # name url codes... : wait until the URL answers one of the codes
  local name=$1 url=$2; shift 2
  for _ in $(seq 1 120); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)
    for ok in "$@"; do [ "$code" = "$ok" ] && return 0; done
    if ! running "$name"; then echo "$name exited; see $STATE_DIR/$name.log" >&2; tail -20 "$STATE_DIR/$name.log" >&2; return 1; fi
    sleep 1
  done
  echo "$name did not answer $url in 120 s; see $STATE_DIR/$name.log" >&2
  return 1
}

nodes_alive() {  # number of alive Ray nodes (the state API over HTTP: no driver joins the cluster)
  python - "$DASHBOARD_PORT" <<'EOF' 2>/dev/null | sed -n 's/^NODES //p' || true
import sys
from ray.util.state import list_nodes
print("NODES", len(list_nodes(address=f"http://127.0.0.1:{sys.argv[1]}", filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)))
EOF
}

start_head() {
  local cpus=$1
  running head && return 0
  launch head ray start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
    --dashboard-agent-listen-port="$AGENT_PORT" --dashboard-agent-grpc-port="$((AGENT_PORT + 1))" \
    --runtime-env-agent-port="$((AGENT_PORT + 2))" --metrics-export-port="$((AGENT_PORT + 3))" \
    --num-cpus="$cpus" --resources='{"newsray_head": 1}' --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) \
    --temp-dir="$TEMP_DIR" --disable-usage-stats
  # Ready when the Jobs API answers (401 = up, token required; 200 = up, auth disabled).
  wait_http head "http://127.0.0.1:$DASHBOARD_PORT/api/version" 200 401
  echo "Ray head up (pid $(cat "$(pidfile head)")): GCS 127.0.0.1:$GCS_PORT, $cpus CPUs, auth $RAY_AUTH_MODE"
}

start_worker() {
  local k=$1 p=$((WORKER_PORT_BASE + 10 * $1)) ports
  running "worker-$k" && return 0
  if [ -f "$(pidfile "worker-$k")" ]; then
    # A replacement for a node that died: its gRPC servers on ports Ray picks (free ones), not the
    # dead node's. The GCS still holds a channel to the dead raylet's address, in reconnect backoff;
    # a new raylet on the same address was refused ("Connection refused") while the GCS placed a
    # placement group on it, and the GCS's view of its CPU never recovered: Ray Train waited forever.
    ports=(--dashboard-agent-listen-port="$((p + 2))")
  else
    ports=(--node-manager-port="$p" --object-manager-port="$((p + 1))"
           --dashboard-agent-listen-port="$((p + 2))" --dashboard-agent-grpc-port="$((p + 3))"
           --runtime-env-agent-port="$((p + 4))" --metrics-export-port="$((p + 5))")
  fi
  # Its own temp dir, as on a machine of its own: a node's runtime-env agent unpacks a job's
  # working_dir with overwrite (Ray's working_dir plugin), so nodes sharing one runtime_resources/
  # deleted the directory that processes on the other nodes ran in (FileNotFoundError from getcwd).
  launch "worker-$k" ray start --block --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
    --num-cpus="$WORKER_CPUS" --resources="{\"newsray_worker_$k\": 1}" --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) \
    "${ports[@]}" --temp-dir="$TEMP_DIR/worker-$k" --disable-usage-stats
  echo "Ray worker node $k starting (pid $(cat "$(pidfile "worker-$k")")): $WORKER_CPUS CPU, resource newsray_worker_$k"
}

start_mlflow() {
  running mlflow && return 0
  mkdir -p "$STATE_DIR/mlartifacts"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true launch mlflow mlflow server \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
    --serve-artifacts --artifacts-destination "$STATE_DIR/mlartifacts"
  wait_http mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 200
  echo "MLflow server up (pid $(cat "$(pidfile mlflow)")): http://127.0.0.1:$MLFLOW_PORT (store $STATE_DIR/mlflow.db)"
}

start_s3() {
  if ! running s3; then
    # the project's moto (constraints/cpu.txt): an older one found further down PATH (5.2.1 was)
    # fails every multipart upload from pyarrow 25, Ray Train's storage marker included
    if [[ ! -x "$VENV_BIN/moto_server" ]]; then
      echo "error: $VENV_BIN/moto_server is missing: install the dev extras (make setup, or pip install -c constraints/cpu.txt 'moto[server]')." >&2
      exit 1
    fi
    launch s3 "$VENV_BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    wait_http s3 "http://127.0.0.1:$S3_PORT/" 200
  fi
  # the bucket (idempotent: moto keeps it in memory, a restarted server has none)
  env "${S3_ENV[@]}" python -c "
import pyarrow.fs as fs
s3 = fs.S3FileSystem(endpoint_override='127.0.0.1:$S3_PORT', scheme='http', allow_bucket_creation=True)
if s3.get_file_info('$S3_BUCKET').type == fs.FileType.NotFound:
    s3.create_dir('$S3_BUCKET')
with s3.open_output_stream('$S3_BUCKET/.newsray-probe') as f:  # a multipart upload, as Ray Train's writes are
    f.write(b'ok')
s3.delete_file('$S3_BUCKET/.newsray-probe')"
  echo "S3 server up (pid $(cat "$(pidfile s3)")): http://127.0.0.1:$S3_PORT, bucket s3://$S3_BUCKET (in memory: gone when it stops)"
}

write_env() {
  {
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT   # newsray submit / ray job submit"
    echo "# newsray train/eval/... run directly as a driver on the cluster: RAY_ADDRESS=127.0.0.1:$GCS_PORT"
    if running mlflow; then echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"; fi
    if running s3; then
      for kv in "${S3_ENV[@]}"; do echo "export $kv"; done
      echo "# then: train.storage_path=s3://$S3_BUCKET/ray"
    fi
  } > "$STATE_DIR/env.sh"
}

case "${1:-}" in
  start)
    shift
    workers=0 services=1
    while [ $# -gt 0 ]; do
      case "$1" in
        --workers) workers="$2"; shift 2 ;;
        --workers=*) workers="${1#*=}"; shift ;;
        --no-services) services=0; shift ;;
        *) echo "unknown option $1 (use --workers N, --no-services)" >&2; exit 2 ;;
      esac
    done
    if [ "$RAY_AUTH_MODE" = token ]; then
      python -c "from newsray.raycluster import ensure_auth_token; ensure_auth_token()"
    fi
    if [ "$workers" -gt 0 ]; then head_cpus="${NEWSRAY_NUM_CPUS:-0}"; else head_cpus="${NEWSRAY_NUM_CPUS:-$(nproc)}"; fi
    if [ "$services" = 1 ]; then start_s3; start_mlflow; fi
    start_head "$head_cpus"
    for k in $(seq 1 "$workers"); do start_worker "$k"; done
    if [ "$workers" -gt 0 ]; then  # ready when every worker node has joined
      declare -A tries=()
      n=0
      for _ in $(seq 1 90); do
        n=$(nodes_alive); n=${n:-0}
        [ "$n" -ge $((workers + 1)) ] && break
        for k in $(seq 1 "$workers"); do
          if ! running "worker-$k"; then  # a start can time out on a loaded machine (Ray waits 30 s for its raylet): try again, 4 times
            tries[$k]=$(( ${tries[$k]:-0} + 1 ))
            if [ "${tries[$k]}" -gt 4 ]; then echo "worker node $k exited 5 times; see $STATE_DIR/worker-$k.log" >&2; exit 1; fi
            echo "worker node $k exited (see $STATE_DIR/worker-$k.log); starting it again" >&2
            start_worker "$k"
          fi
        done
        sleep 2
      done
      [ "$n" -ge $((workers + 1)) ] || { echo "only $n of $((workers + 1)) Ray nodes joined in 180 s" >&2; exit 1; }
      echo "$n Ray nodes alive"
    fi
    write_env
    echo "export these (or: source $STATE_DIR/env.sh):"
    cat "$STATE_DIR/env.sh"
    ;;
  stop)
    # Every component at once (TERM), then up to NEWSRAY_STOP_GRACE_S (10 s) for all of them together,
    # then KILL what is left. MLflow and the S3 server exit in 2 s; a `ray start --block` node took 30-34 s
    # after TERM, so one after the other with 30 s each a head, two workers and the services took ~40 s.
    stopping=""
    for c in $(components); do
      f=$(pidfile "$c"); pid=$(cat "$f")
      if kill -0 "$pid" 2>/dev/null; then
        # Its own session (setsid): the group holds the process and what it started, nothing else.
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        stopping="$stopping $c:$pid"
      fi
    done
    for _ in $(seq 1 "${NEWSRAY_STOP_GRACE_S:-10}"); do
      alive=0
      for cp in $stopping; do kill -0 "${cp#*:}" 2>/dev/null && alive=1; done
      [ "$alive" = 1 ] || break
      sleep 1
    done
    for cp in $stopping; do
      kill -KILL -- "-${cp#*:}" 2>/dev/null || true
      echo "stopped ${cp%%:*} (pid ${cp#*:})"
    done
    for c in $(components); do rm -f "$(pidfile "$c")"; done
    [ -n "$stopping" ] || echo "not running"
    ;;
  status)
    any=0
    for c in $(components); do
      if running "$c"; then echo "$c: running (pid $(cat "$(pidfile "$c")"))"; any=1; else echo "$c: not running"; fi
    done
    [ "$any" = 1 ] || { echo "not running"; exit 1; }
    if running mlflow; then echo "mlflow: http://127.0.0.1:$MLFLOW_PORT"; fi
    if running s3; then echo "s3: http://127.0.0.1:$S3_PORT bucket s3://$S3_BUCKET"; fi
    if running head; then echo "ray: http://127.0.0.1:$DASHBOARD_PORT"; ray status --address="127.0.0.1:$GCS_PORT"; fi
    ;;
  env)
    write_env
    cat "$STATE_DIR/env.sh"
    ;;
  *)
    echo "usage: $0 start [--workers N] [--no-services] | stop | status | env" >&2
    exit 2
    ;;
esac
