#!/usr/bin/env bash
# Debian's chromium (and a font) for the browser tests, installed only when missing and only where this may
# run apt-get without asking: as root, or with password-less sudo. Elsewhere it says how, and the browser
# tests skip with that reason. Never fails the caller: scripts/test.sh runs it before the tests.
# Playwright's Python package comes with the test extras; `playwright install` is never run (no browser download).
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "browser tests will skip: no chromium and no apt-get here (install Chromium, e.g. 'chromium' from your package manager)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "browser tests will skip: no chromium (install it with: sudo apt-get install chromium fonts-dejavu-core)"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing Debian's chromium for the browser tests (apt-get) ..."
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; } >/tmp/interplab-apt.log 2>&1; then
  echo "browser tests will skip: apt-get could not install chromium (see /tmp/interplab-apt.log)"
fi
exit 0
