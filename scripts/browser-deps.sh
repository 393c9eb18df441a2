#!/usr/bin/env bash
# Debian's chromium (and a font) for the browser tests, installed only when missing and only where this may
# run apt-get without asking: as root, or with password-less sudo (scripts/apt-deps.sh). Elsewhere it says
# how, and the browser tests skip with that reason. Never fails the caller: scripts/test.sh runs it before the tests.
# Playwright's Python package comes with the test extras; `playwright install` is never run (no browser download).
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
source "$(dirname "$0")/apt-deps.sh"
apt_deps_install "browser tests" "no chromium" "install Chromium, e.g. 'chromium' from your package manager" \
  /tmp/interplab-apt.log chromium fonts-dejavu-core
exit 0
