#!/usr/bin/env bash
# A local factory on one machine: Prefect server + UI, SeaweedFS S3 (bucket `factory`), the work pools of
# prefect.yaml with one process worker each and the `gpu` slots; --production adds PostgreSQL and Redis.
#
#   deploy/local-stack.sh up [--production]   start what is not running yet and wait until each service answers
#   deploy/local-stack.sh status              each service: running (pid, URL) or not; exit 0 all run, 3 not all
#   deploy/local-stack.sh down                stop everything the stack started and check that nothing is left
#   deploy/local-stack.sh env                 print the exports that point a shell at the stack
#
# This is the front door only: deploy/local_stack_helper.py (its doc lists the settings: STATE, the ports, the
# waits...) starts, checks and stops the services with the process manager in deploy/stack_processes.py, on the
# project's Python (BIN, default .venv/bin).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-.venv/bin}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
if [ ! -x "$BIN/python" ]; then
  printf 'local-stack: no Python at %s/python: make the venv (see the README) or set BIN\n' "$BIN" >&2
  exit 1
fi
cd "$ROOT"
exec "$BIN/python" -m deploy.local_stack_helper "$@"
