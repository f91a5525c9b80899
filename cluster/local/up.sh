#!/usr/bin/env bash
# A Ray cluster of several nodes on this machine, for development: a head and
# COMOD_LOCAL_WORKERS worker nodes, all on 127.0.0.1, under one private temp
# dir, with the dashboard (and so the Jobs API) on 127.0.0.1. Stop it with
# cluster/local/down.sh and the same COMOD_LOCAL_TEMP_DIR.
#
# Settings (environment variables, defaults in brackets):
#   COMOD_LOCAL_TEMP_DIR        Ray's temp dir, keep it short [/tmp/comod-ray]
#   COMOD_LOCAL_WORKERS         worker nodes [2]
#   COMOD_LOCAL_WORKER_CPUS     logical CPUs per worker node [1]
#   COMOD_LOCAL_WORKER_GPUS     logical GPUs per worker node [0]; a search's
#                               `resources: {gpu: ...}` is scheduled on them
#                               (CUDA itself is only there if the machine has it)
#   COMOD_LOCAL_HEAD_CPUS       logical CPUs of the head [0: trials run on workers]
#   COMOD_LOCAL_PORT            the head's GCS port [6379]
#   COMOD_LOCAL_DASHBOARD       start the dashboard, which serves the Jobs API
#                               that `comod search submit` uses; needs
#                               ray[default] [true]; false: no dashboard, for
#                               `comod search run --address` only
#   COMOD_LOCAL_DASHBOARD_PORT  dashboard and Jobs API [8265]
#   COMOD_LOCAL_CLIENT_PORT     Ray client server, where ray[client] is installed [10001]
#   COMOD_LOCAL_AGENT_PORT      dashboard agent of the head; node i uses +i [52365]
#   COMOD_LOCAL_OBJECT_STORE_MB object store per node, in MiB [512]
#   RAY_AUTH_MODE               Ray's token authentication for every node
#                               [disabled]; token: nodes and clients use the
#                               token in ~/.ray/auth_token (make one with
#                               `ray get-auth-token --generate`), and clients
#                               need RAY_AUTH_MODE=token too
#   RAY                         the ray command [ray on PATH, else .venv/bin/ray]
set -euo pipefail

TEMP_DIR=${COMOD_LOCAL_TEMP_DIR:-/tmp/comod-ray}
WORKERS=${COMOD_LOCAL_WORKERS:-2}
WORKER_CPUS=${COMOD_LOCAL_WORKER_CPUS:-1}
WORKER_GPUS=${COMOD_LOCAL_WORKER_GPUS:-0}
HEAD_CPUS=${COMOD_LOCAL_HEAD_CPUS:-0}
DASHBOARD=${COMOD_LOCAL_DASHBOARD:-true}
PORT=${COMOD_LOCAL_PORT:-6379}
DASHBOARD_PORT=${COMOD_LOCAL_DASHBOARD_PORT:-8265}
CLIENT_PORT=${COMOD_LOCAL_CLIENT_PORT:-10001}
AGENT_PORT=${COMOD_LOCAL_AGENT_PORT:-52365}
OBJECT_STORE_MB=${COMOD_LOCAL_OBJECT_STORE_MB:-512}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RAY=${RAY:-$(command -v ray || echo "$ROOT/.venv/bin/ray")}
HOST=127.0.0.1   # Ray records this machine's own address as each node's IP; nothing leaves the machine
# One setting for every node: left unset, a head would turn token authentication on
# by itself wherever ~/.ray/auth_token exists, and the workers would not.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
LOG=$TEMP_DIR/comod-local.log

die() { echo "up.sh: $*" >&2; exit 1; }

[ -x "$RAY" ] || die "no ray command (looked on PATH and at $RAY); activate the project's .venv or set RAY"
case $TEMP_DIR in /*) ;; *) die "COMOD_LOCAL_TEMP_DIR must be an absolute path, got $TEMP_DIR" ;; esac
# Ray puts unix sockets under TEMP_DIR/session_<date>_<id>/sockets/, and socket paths are limited to 107 bytes.
[ ${#TEMP_DIR} -le 40 ] || die "COMOD_LOCAL_TEMP_DIR is ${#TEMP_DIR} characters; keep it under 40 (e.g. /tmp/comod-ray)"
PY=$(dirname "$RAY")/python   # the Python that runs this ray
[ -x "$PY" ] || PY=python3
case $DASHBOARD in
  true)
    "$PY" -c 'import ray.dashboard.optional_deps' 2>/dev/null || die "the dashboard (the Jobs API that \`comod search submit\` uses) needs ray[default]: pip install 'ray[default]==$("$PY" -c 'import ray; print(ray.__version__)' 2>/dev/null)'; or set COMOD_LOCAL_DASHBOARD=false for \`comod search run --address\` alone" ;;
  false) ;;
  *) die "COMOD_LOCAL_DASHBOARD must be true or false, got $DASHBOARD" ;;
esac
[ -e "$TEMP_DIR/comod-local.env" ] && die "a local cluster already uses $TEMP_DIR; stop it first: COMOD_LOCAL_TEMP_DIR=$TEMP_DIR $ROOT/cluster/local/down.sh"
mkdir -p "$TEMP_DIR"
: >"$LOG"

object_store=$((OBJECT_STORE_MB * 1024 * 1024))
common=(--node-ip-address "$HOST" --temp-dir "$TEMP_DIR" --object-store-memory "$object_store"
        --min-worker-port 0 --max-worker-port 0 --disable-usage-stats)

start() {  # start NAME ARGS...: one `ray start`, its output in the log
  local name=$1; shift
  echo "== $name: $RAY start $*" >>"$LOG"
  if ! "$RAY" start "$@" >>"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    "$ROOT/cluster/local/down.sh" >/dev/null 2>&1 || true
    die "$name did not start (log: $LOG)"
  fi
}

# Written first, so that down.sh can stop a half-started cluster.
cat >"$TEMP_DIR/comod-local.env" <<ENV
COMOD_LOCAL_GCS_ADDRESS=$HOST:$PORT
COMOD_LOCAL_DASHBOARD=http://$HOST:$DASHBOARD_PORT
COMOD_LOCAL_WORKERS=$WORKERS
ENV
export COMOD_LOCAL_TEMP_DIR=$TEMP_DIR

head=(--head --port "$PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 --include-dashboard "$DASHBOARD"
      --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT")
# Ray starts its client server (port 10001 unless told) only where ray[client] is installed.
if "$PY" -c 'import sys; from ray._private.utils import get_ray_client_dependency_error as e; sys.exit(e() is not None)' 2>/dev/null; then
  head+=(--ray-client-server-port "$CLIENT_PORT")
fi
start head "${head[@]}" "${common[@]}"
for i in $(seq 1 "$WORKERS"); do
  start "worker $i" --address "$HOST:$PORT" --num-cpus "$WORKER_CPUS" --num-gpus "$WORKER_GPUS" \
    --dashboard-agent-listen-port $((AGENT_PORT + i)) "${common[@]}"
done

say_up() {
  echo "Local Ray cluster up: a head and $WORKERS worker node(s) ($WORKER_CPUS CPU, $WORKER_GPUS GPU each) on $HOST, temp dir $TEMP_DIR."
  echo "  run a search on it:  comod search run SEARCH --address $HOST:$PORT"
  if [ "$DASHBOARD" = true ]; then
    echo "  submit it as a job:  comod search submit SEARCH --address http://$HOST:$DASHBOARD_PORT --name NAME --storage SHARED_DIR_OR_S3"
    echo "  dashboard, Jobs API: http://$HOST:$DASHBOARD_PORT"
  fi
  echo "  stop it:             COMOD_LOCAL_TEMP_DIR=$TEMP_DIR $ROOT/cluster/local/down.sh"
}

[ "$DASHBOARD" = true ] || { say_up; exit 0; }
# The Jobs API answers once the dashboard is up.
for _ in $(seq 1 120); do
  if "$PY" - "$HOST" "$DASHBOARD_PORT" >/dev/null 2>&1 <<'PY'
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/api/jobs/", timeout=2)
PY
  then
    say_up
    exit 0
  fi
  sleep 1
done
tail -n 30 "$LOG" >&2
die "the dashboard on http://$HOST:$DASHBOARD_PORT did not answer within 120 s (log: $LOG; stop it with COMOD_LOCAL_TEMP_DIR=$TEMP_DIR $ROOT/cluster/local/down.sh)"
