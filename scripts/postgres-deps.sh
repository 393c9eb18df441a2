#!/usr/bin/env bash
# Debian's PostgreSQL server binaries for the feature-database tests (tests/postgres.py starts a throwaway
# server from them on 127.0.0.1 for the test session: initdb + pg_ctl in a temporary folder, removed after),
# installed only when missing and only where this may run apt-get without asking: as root, or with
# password-less sudo. Elsewhere it says how, and the PostgreSQL half of those tests skips with that reason
# (or set INTERPLAB_TEST_POSTGRES_URL to a server of your own). The package's own cluster is never started.
# Never fails the caller: scripts/test.sh runs it before the tests.
set -uo pipefail
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ -n "${INTERPLAB_TEST_POSTGRES_URL:-}" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL tests will skip: no initdb and no apt-get here (install PostgreSQL's server, or set INTERPLAB_TEST_POSTGRES_URL)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "PostgreSQL tests will skip: no initdb (install it with: sudo apt-get install postgresql)"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing Debian's postgresql for the feature-database tests (apt-get) ..."
start=$SECONDS
# policy-rc.d 101: the package's own cluster is not started (the tests start their own, on loopback)
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null && $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends postgresql; } >/tmp/interplab-apt-postgres.log 2>&1; then
  echo "PostgreSQL tests will skip: apt-get could not install postgresql (see /tmp/interplab-apt-postgres.log)"
  exit 0
fi
echo "postgresql installed in $((SECONDS - start)) s"
exit 0
