#!/usr/bin/env bash
# The services the deployments run on, for a laptop or a CI box:
#
#   infra/stack.sh up        local S3 endpoint (moto_server), Prefect server (SQLite), the
#                            `process` work pool and a worker, all on 127.0.0.1
#   infra/stack.sh deploy    create/update the deployments of infra/prefect.yaml
#   infra/stack.sh status    what is running
#   infra/stack.sh down      stop everything `up` or `worker` started
#   infra/stack.sh worker    only the pool and a worker, for a remote Prefect server and
#                            real S3: uses PREFECT_API_URL and the AWS settings you exported
#
# State (PID files, logs, PREFECT_HOME, the env file) lives in $PNEUMO_STACK_DIR
# (default .stack/). `source .stack/env` points a shell at the local stack.
# Settings: PNEUMO_PREFECT_PORT (4200), PNEUMO_S3_PORT (9000), PNEUMO_BUCKET (pneumo),
# PNEUMO_POOL (pneumo). Postgres instead of SQLite: export Prefect's own
# PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:password@host:5432/prefect
# before `up`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$(mkdir -p "${PNEUMO_STACK_DIR:-$ROOT/.stack}" && cd "${PNEUMO_STACK_DIR:-$ROOT/.stack}" && pwd)"
BIN="${PNEUMO_BIN:-$ROOT/.venv/bin}"
PREFECT_PORT="${PNEUMO_PREFECT_PORT:-4200}"
S3_PORT="${PNEUMO_S3_PORT:-9000}"
BUCKET="${PNEUMO_BUCKET:-pneumo}"
POOL="${PNEUMO_POOL:-pneumo}"
COMPONENTS=(worker server s3)  # stopped in this order

log() { echo "stack: $*" >&2; }

running() {  # running NAME: its PID file names a live process
  local pid_file="$STATE/$1.pid"
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

start() {  # start NAME COMMAND...: in its own session (process group), logging to NAME.log
  local name="$1"; shift
  if running "$name"; then
    log "$name already running (pid $(cat "$STATE/$name.pid"))"
    return
  fi
  setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
  log "$name started (pid $!, log $STATE/$name.log)"
}

stop() {  # stop NAME: TERM its whole process group, TERM again after 5 s, KILL it after 20 s
  local name="$1" pid_file="$STATE/$1.pid" pid
  [[ -f "$pid_file" ]] || return 0
  pid="$(cat "$pid_file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local tenths=0
    while kill -0 "$pid" 2>/dev/null && ((tenths < 200)); do
      # A Prefect 3.9 worker waits for its idle channel after one signal; a second is its own
      # "stop now" (it kills itself). Without it, `down` waited 20 s for every worker.
      ((tenths == 50)) && { kill -TERM -- "-$pid" 2>/dev/null || true; }
      sleep 0.1
      tenths=$((tenths + 1))
    done
    if kill -KILL -- "-$pid" 2>/dev/null; then
      log "$name stopped (pid $pid; still running $((tenths / 10)) s after SIGTERM: killed)"
    else
      log "$name stopped (pid $pid, $((tenths / 10)) s after SIGTERM)"
    fi
  fi
  rm -f "$pid_file"
}

wait_for_url() {  # wait_for_url NAME URL SECONDS
  local name="$1" url="$2" seconds="$3"
  "$BIN/python" - "$url" "$seconds" <<'PY' || { log "$1 did not answer on $2; see $STATE/$1.log"; tail -20 "$STATE/$1.log" >&2; exit 1; }
import sys, time, urllib.request, urllib.error
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)  # it answers
    except OSError:
        time.sleep(0.5)
sys.exit(1)
PY
}

write_env() {
  # Dummy keys: moto accepts any. Real AWS runs use `worker` with your own settings instead.
  cat >"$STATE/env" <<EOF
export PREFECT_HOME="$STATE/prefect-home"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export AWS_ACCESS_KEY_ID=local-stack
export AWS_SECRET_ACCESS_KEY=local-stack
export AWS_DEFAULT_REGION=us-east-1
unset AWS_PROFILE AWS_SESSION_TOKEN
export PNEUMO_HOME="$ROOT"
export PATH="$BIN:\$PATH"
export PNEUMO_POOL="$POOL"
export PNEUMO_WORKDIR="\${PNEUMO_WORKDIR:-s3://$BUCKET/pneumo-data}"
EOF
}

start_worker() {  # the pool (created if missing, never overwritten) and one worker
  : "${PREFECT_API_URL:?set PREFECT_API_URL to your Prefect server, e.g. https://prefect.example.com/api}"
  export PNEUMO_HOME="${PNEUMO_HOME:-$ROOT}"
  if ! "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1; then
    # Prefect's own "To start a worker ... run: prefect worker start" hint is wrong here: the next line starts one.
    local out
    out=$("$BIN/prefect" work-pool create "$POOL" --type process 2>&1) || { echo "$out" >&2; exit 1; }
    log "created work pool $POOL (type process)"
  fi
  start worker "$BIN/prefect" worker start --pool "$POOL" --type process --name "pneumo-$(hostname)-$$"
}

case "${1:-}" in
  up)
    export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1  # no usage data from the server or the worker
    start s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    wait_for_url s3 "http://127.0.0.1:$S3_PORT/" 30
    # A fresh SQLite database takes ~10 s of migrations on a small machine: start from the empty one
    # pneumo migrated once for this Prefect version (cli/server.py), or let the server migrate its own.
    export PREFECT_HOME="$STATE/prefect-home"
    mkdir -p "$PREFECT_HOME"
    (cd "$ROOT" && "$BIN/python" -c "import sys, pathlib; from cli import server; server.seed_home(pathlib.Path(sys.argv[1]))" \
      "$PREFECT_HOME") || true
    start server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
    wait_for_url server "http://127.0.0.1:$PREFECT_PORT/api/health" 180
    write_env
    # shellcheck source=/dev/null
    source "$STATE/env"
    "$BIN/python" -c "
import boto3, botocore.exceptions as e
try:
    boto3.client('s3').create_bucket(Bucket='$BUCKET')
except e.ClientError as error:
    if error.response['Error']['Code'] not in ('BucketAlreadyOwnedByYou', 'BucketAlreadyExists'):
        raise"
    start_worker
    log "up: Prefect UI http://127.0.0.1:$PREFECT_PORT, S3 http://127.0.0.1:$S3_PORT (bucket $BUCKET), pool $POOL"
    log "next, as in the README: make deploy DEPLOY_SOURCE=/path/to/chest_xray; source $STATE/env;" \
      "prefect deployment run 'pneumo-full/on-demand' --watch; pneumo runs"
    ;;
  worker)
    start_worker
    ;;
  deploy)
    # shellcheck source=/dev/null
    [[ -f "$STATE/env" && -z "${PREFECT_API_URL:-}" ]] && source "$STATE/env"
    : "${PREFECT_API_URL:?set PREFECT_API_URL, or run 'infra/stack.sh up' first}"
    export PNEUMO_POOL="$POOL"
    # The pull step's directory: the checkout the worker runs the flow from.
    export PNEUMO_HOME="${PNEUMO_HOME:-$ROOT}"
    export PNEUMO_SOURCE="${PNEUMO_SOURCE:-kaggle:paultimothymooney/chest-xray-pneumonia}"
    export PNEUMO_WORKDIR="${PNEUMO_WORKDIR:-s3://$BUCKET/pneumo-data}"
    export PNEUMO_REGISTRY="${PNEUMO_REGISTRY:-}"
    cd "$ROOT"
    "$BIN/prefect" --no-prompt deploy --all --prefect-file infra/prefect.yaml
    ;;
  down)
    for name in "${COMPONENTS[@]}"; do stop "$name"; done
    ;;
  status)
    for name in "${COMPONENTS[@]}"; do
      if running "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"), log $STATE/$name.log)"
      else echo "$name: stopped"; fi
    done
    ;;
  *)
    sed -n '2,17p' "$0" >&2
    exit 2
    ;;
esac
