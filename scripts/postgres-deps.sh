#!/usr/bin/env bash
# Debian's PostgreSQL server binaries for the feature-database tests (tests/postgres.py starts a throwaway
# server from them on 127.0.0.1 for the test session: initdb + pg_ctl in a temporary folder, removed after),
# installed only when missing and only where this may run apt-get without asking: as root, or with
# password-less sudo (scripts/apt-deps.sh). Elsewhere it says how, and the PostgreSQL half of those tests
# skips with that reason (or set INTERPLAB_TEST_POSTGRES_URL to a server of your own). The package's own
# cluster is never started. Never fails the caller: scripts/test.sh runs it before the tests.
set -uo pipefail
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ -n "${INTERPLAB_TEST_POSTGRES_URL:-}" ]; then
  exit 0
fi
source "$(dirname "$0")/apt-deps.sh"
# the tests start their own cluster, on loopback
APT_DEPS_NO_SERVICES=1 apt_deps_install "PostgreSQL tests" "no initdb" \
  "install PostgreSQL's server, or set INTERPLAB_TEST_POSTGRES_URL" /tmp/interplab-apt-postgres.log postgresql
exit 0
