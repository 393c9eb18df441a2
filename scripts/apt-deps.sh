# Sourced by scripts/browser-deps.sh and scripts/postgres-deps.sh (not run on its own): installs Debian
# packages that a group of tests needs, only where this may run apt-get without asking: as root, or with
# password-less sudo. Elsewhere it says how, and those tests skip with that reason. Never fails the caller.
#
#   apt_deps_install WHO MISSING HINT LOG PACKAGE...
#     WHO      the tests that need the packages ("browser tests"), MISSING what is not here ("no chromium"),
#     HINT     how to get it where there is no apt-get, LOG where apt-get's output goes
#   APT_DEPS_NO_SERVICES=1: the packages' own services are not started (policy-rc.d answers 101 meanwhile)
apt_deps_install() {
  local who=$1 missing=$2 hint=$3 log=$4
  shift 4
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$who will skip: $missing and no apt-get here ($hint)"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      echo "$who will skip: $missing (install it with: sudo apt-get install $*)"
      return 0
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  echo "installing Debian's $1 for the $who (apt-get) ..."
  local start=$SECONDS
  if [ "${APT_DEPS_NO_SERVICES:-}" = 1 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null && $sudo chmod +x /usr/sbin/policy-rc.d
    # shellcheck disable=SC2064  # $sudo is expanded now, while it is set
    trap "$sudo rm -f /usr/sbin/policy-rc.d" EXIT
  fi
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "$@"; } >"$log" 2>&1; then
    echo "$who will skip: apt-get could not install $1 (see $log)"
    return 0
  fi
  echo "$1 installed in $((SECONDS - start)) s"
}
