#!/usr/bin/env bash
# The whole test suite, as `just test` (README "Testing") and .ci/run run it:
# lints, Rust unit + integration tests, benchmark code compiled, the ops suite (manifests,
# observability, CI/CD), and the dependency audit.
#
# Database: TEST_DATABASE_URL if set (e.g. mysql://root:pw@127.0.0.1:3306/), else one
# throwaway MariaDB for the run (scripts/throwaway-mariadb.sh), removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

section() { printf '\n==== %s\n' "$*"; }

if [ -z "${TEST_DATABASE_URL:-}" ]; then
  section "starting a throwaway MariaDB"
  out=$(scripts/throwaway-mariadb.sh start)
  eval "$out" # URL=, DIR=, PID=
  trap 'scripts/throwaway-mariadb.sh stop "$DIR"' EXIT
  export TEST_DATABASE_URL="${URL%/kvstore}/"
  echo "TEST_DATABASE_URL=$TEST_DATABASE_URL"
fi

section "cargo fmt --check"
cargo fmt --check

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

section "cargo test"
cargo test

section "benchmark code compiles (cargo bench --no-run)"
cargo bench --no-run --quiet

section "ops tests (manifests, observability, CI/CD)"
python3 -m pytest tests/ops -q -p no:cacheprovider

section "cargo deny (licenses, bans, sources, advisories from ../shared/advisory-db, offline)"
scripts/deny.sh
