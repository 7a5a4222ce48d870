#!/usr/bin/env bash
# `just run`: the service on localhost:8080 (metrics on :9090) against a throwaway MariaDB
# that lives as long as this script. KV_DATABASE_URL set in the environment is used instead.
# Ctrl-C stops the service (gracefully) and removes the database.
set -euo pipefail
cd "$(dirname "$0")/.."

export KVSTORE_REVISION="${KVSTORE_REVISION:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
cargo build --release --quiet

if [ -z "${KV_DATABASE_URL:-}" ]; then
  out=$(scripts/throwaway-mariadb.sh start)
  eval "$out" # URL=, DIR=, PID=
  trap 'scripts/throwaway-mariadb.sh stop "$DIR"' EXIT
  # The throwaway server has an empty root password and no kvstore database yet.
  mariadb --no-defaults --socket="$DIR/sock" -uroot -e 'CREATE DATABASE IF NOT EXISTS kvstore'
  export KV_DATABASE_URL="$URL"
  echo "run-local: throwaway MariaDB at $URL (data in $DIR, removed on exit)" >&2
fi
export KV_SHUTDOWN_DELAY="${KV_SHUTDOWN_DELAY:-0s}"
echo "run-local: try  curl localhost:8080/v1/keys/Homer" >&2
# In the foreground, so Ctrl-C reaches the service itself (graceful shutdown); the script
# waits for it, then the EXIT trap removes the throwaway database.
trap 'interrupted=1' INT TERM
set +e
target/release/kvstore "$@"
rc=$?
set -e
if [ -n "${interrupted:-}" ]; then rc=0; fi
exit "$rc"
