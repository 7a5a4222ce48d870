#!/usr/bin/env bash
# cargo deny: licenses, bans and sources from deny.toml, offline; advisories from the
# RustSec snapshot in ../shared/advisory-db (or KV_ADVISORY_DB) when there is one (our
# development machines have no network for it), else from the live database, fetched (a
# clone of this repository anywhere else, GitHub Actions). cargo-deny wants the snapshot as
# a git repository, so a throwaway copy is made one.
set -euo pipefail
cd "$(dirname "$0")/.."
src="${KV_ADVISORY_DB:-../shared/advisory-db}"
cargo fetch --quiet  # cargo metadata needs every platform's crates present
cargo deny --offline --log-level error check licenses bans sources
if [ ! -d "$src" ]; then
  # No snapshot: the live database. Without network this fails, and so does the check:
  # advisories are never skipped silently.
  if ! cargo deny --log-level error check advisories; then
    echo "deny: advisories not checked: no snapshot at $src and the live RustSec database failed (network?); set KV_ADVISORY_DB to an advisory-db checkout" >&2
    exit 1
  fi
  exit 0
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
