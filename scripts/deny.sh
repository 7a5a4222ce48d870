#!/usr/bin/env bash
# cargo deny, offline: licenses, bans and sources from deny.toml; advisories from the
# RustSec snapshot in ../shared/advisory-db (or KV_ADVISORY_DB; on GitHub Actions without
# one, the live database). cargo-deny wants the
# database as a git repository, so a throwaway copy is made one.
set -euo pipefail
cd "$(dirname "$0")/.."
src="${KV_ADVISORY_DB:-../shared/advisory-db}"
cargo fetch --quiet  # cargo metadata needs every platform's crates present
cargo deny --offline --log-level error check licenses bans sources
if [ ! -d "$src" ]; then
  if [ "${GITHUB_ACTIONS:-}" = "true" ]; then
    # GitHub's runners reach the RustSec database: check against the live one.
    cargo deny --log-level error check advisories
    exit 0
  fi
  echo "deny: no advisory database at $src (set KV_ADVISORY_DB to a RustSec advisory-db checkout): advisories NOT checked" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# cargo-deny looks for <db-path>/<repo name>-<hash of its URL>.
dbdir="$tmp/db/advisory-db-3157b0e258782691"
mkdir -p "$tmp/db"
cp -r "$src" "$dbdir"
(cd "$dbdir" && git init -q && git add -A && git -c user.email=ci@kvstore -c user.name=ci commit -qm snapshot)
cat > "$tmp/deny-advisories.toml" <<TOML
[advisories]
db-path = "$tmp/db"
db-urls = ["https://github.com/rustsec/advisory-db"]
TOML
cargo deny --offline --log-level error --config "$tmp/deny-advisories.toml" check advisories
