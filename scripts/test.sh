#!/usr/bin/env bash
# Install everything the tests need, then run them. This is the README's test
# command and what CI runs (.ci/run). Safe to run again: installs are skipped
# when present.
set -euo pipefail
cd "$(dirname "$0")/.."

# swaks (a real SMTP client used by end-to-end tests) and its TLS/AUTH modules.
if ! command -v swaks >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    swaks libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl >/dev/null
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
