#!/usr/bin/env bash
# Start a throwaway MariaDB/MySQL server in a temporary directory, listening on 127.0.0.1 only.
#
#   scripts/throwaway-mariadb.sh start [PORT]   # prints KEY=VALUE lines: URL, DIR, PID
#   scripts/throwaway-mariadb.sh stop DIR        # stops it and removes DIR
#
# Used by `just run`, `just test` and `just bench`; never touches a system instance
# (--no-defaults comes first, its own datadir, socket and port).
set -euo pipefail

die() { echo "throwaway-mariadb: $*" >&2; exit 1; }

start() {
  local port=${1:-0}
  local server installer
  server=$(command -v mariadbd || command -v mysqld || true)
  if [ ! -x "${server:-}" ]; then
    for candidate in /usr/sbin/mariadbd /usr/sbin/mysqld; do
      if [ -x "$candidate" ]; then server=$candidate; break; fi
    done
  fi
  [ -n "$server" ] || die "no mariadbd or mysqld found: install a MariaDB server (apt-get install -y mariadb-server) or set TEST_DATABASE_URL"
  installer=$(command -v mariadb-install-db || command -v mysql_install_db || true)
  [ -n "$installer" ] || die "no mariadb-install-db found: install a MariaDB server (apt-get install -y mariadb-server)"
  if [ "$port" = 0 ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  fi
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/kvstore-mariadb.XXXXXX")
  local user_args=()
  [ "$(id -u)" = 0 ] && user_args=(--user=root)
  "$installer" --no-defaults --datadir="$dir/data" "${user_args[@]}" \
    --auth-root-authentication-method=normal --skip-test-db >"$dir/install.log" 2>&1 \
    || { cat "$dir/install.log" >&2; die "mariadb-install-db failed"; }
  "$server" --no-defaults --datadir="$dir/data" --socket="$dir/sock" --port="$port" \
    --bind-address=127.0.0.1 "${user_args[@]}" --pid-file="$dir/pid" --log-error="$dir/error.log" \
    --skip-name-resolve --innodb-flush-log-at-trx-commit=1 --sync-binlog=0 >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do
    if mariadb-admin --no-defaults --socket="$dir/sock" -uroot ping >/dev/null 2>&1; then
      echo "URL=mysql://root@127.0.0.1:$port/kvstore"
      echo "DIR=$dir"
      echo "PID=$pid"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$dir/error.log" >&2; die "server exited during start-up"; }
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  die "server did not answer within 10 s (see $dir/error.log)"
}

stop() {
  local dir=${1:?usage: stop DIR}
  if [ -f "$dir/pid" ]; then
    local pid; pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  case "$dir" in */kvstore-mariadb.*) rm -rf "$dir" ;; *) die "refusing to remove $dir" ;; esac
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) die "usage: $0 start [PORT] | stop DIR" ;;
esac
