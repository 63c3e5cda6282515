#!/usr/bin/env bash
# A local factory on one machine: Prefect server + UI, SeaweedFS S3, the work pool and a process worker.
#   deploy/local-stack.sh up      start everything (state under .stack/), print the URLs and the env to use
#   deploy/local-stack.sh down    stop it
# Everything binds to 127.0.0.1. Credentials here are local test keys for the local SeaweedFS only.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
STATE=.stack
PREFECT_PORT=${PREFECT_PORT:-4200}
S3_PORT=${S3_PORT:-8333}
POOL=${POOL:-pathgen-local}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT}/api"
export PREFECT_HOME="$PWD/$STATE/prefect"  # the stack's own database, apart from the user's default one

up() {
  mkdir -p "$STATE/s3"
  cat > "$STATE/s3.json" <<JSON
{"identities":[{"name":"local","credentials":[{"accessKey":"local-key","secretKey":"local-secret"}],
 "actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
  setsid nohup "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" > "$STATE/prefect.log" 2>&1 &
  echo $! > "$STATE/prefect.pid"
  setsid nohup "$BIN/weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$STATE/s3" -s3 -s3.port="$S3_PORT" \
    -s3.config="$STATE/s3.json" -master.volumeSizeLimitMB=1024 > "$STATE/weed.log" 2>&1 &
  echo $! > "$STATE/weed.pid"
  for _ in $(seq 1 120); do
    curl -sf "$PREFECT_API_URL/health" > /dev/null && break
    sleep 1
  done
  curl -sf "$PREFECT_API_URL/health" > /dev/null || { echo "Prefect server did not start; see $STATE/prefect.log"; exit 1; }
  "$BIN/prefect" work-pool create "$POOL" --type process \
    --base-job-template deploy/pools/cpu-process.json --overwrite > /dev/null
  setsid nohup "$BIN/prefect" worker start --pool "$POOL" > "$STATE/worker.log" 2>&1 &
  echo $! > "$STATE/worker.pid"
  cat <<MSG
Prefect UI:   http://127.0.0.1:${PREFECT_PORT}
S3 endpoint:  http://127.0.0.1:${S3_PORT}  (local keys)
Work pool:    ${POOL} (one process worker running)
Use it from this shell:
  export PREFECT_API_URL=${PREFECT_API_URL}
  export PATHGEN_S3_ENDPOINT_URL=http://127.0.0.1:${S3_PORT} AWS_ACCESS_KEY_ID=local-key AWS_SECRET_ACCESS_KEY=local-secret
  pathgen extract ../shared/data/slides --store s3://factory/demo     # runs are listed in the UI
Stop it with: deploy/local-stack.sh down
MSG
}

down() {
  for name in worker weed prefect; do
    [ -f "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    # Each was started in its own session: stop the whole group (the server's children too), then make sure.
    kill -TERM -- "-$pid" 2> /dev/null || kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2> /dev/null || true
    rm -f "$STATE/$name.pid"
  done
  echo "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down"; exit 2 ;;
esac
