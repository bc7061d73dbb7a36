#!/usr/bin/env bash
# Install everything the tests need, check lint, formatting and types, then
# run the tests. This is the README's test command and what CI runs (.ci/run):
# any check that fails stops it (set -e) before pytest. Safe to run again:
# installs are skipped when present.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers for the end-to-end tests, installed with apt-get only when missing:
# swaks (an SMTP client) and its TLS/AUTH modules; the clients legacy systems
# really use (tests/test_clients.py): curl, msmtp and mutt; Postfix (the MTA in
# front of mailbridge in tests/test_postfix.py), preseeded so that it installs
# non-interactively with no system configuration (the test runs its own).
missing=()
command -v swaks >/dev/null 2>&1 ||
  missing+=(swaks libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl)
# wrk loads the HTTP receiver in the callbacks benchmark's smoke run.
for tool in curl msmtp mutt wrk; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -x /usr/sbin/postfix ] || command -v postfix >/dev/null 2>&1 || missing+=(postfix)
# PostgreSQL: the tests start throwaway clusters of their own (tests/pg.py).
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
# promtool (Debian's prometheus package) checks docs/alerts.yml (tests/test_docs.py).
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# node and npm run the SMSC peer of the SMPP tests (tests/smsc, node-smpp).
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
# systemd-analyze (Debian's systemd package) verifies the units and scores their
# hardening (tests/test_systemd.py); the tests never start systemd itself.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# The SMSC peer's pinned packages (tests/smsc/package-lock.json), once.
[ -d tests/smsc/node_modules/smpp ] || (cd tests/smsc && npm ci --no-audit --no-fund --loglevel=error)

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

# Code health (issue 14): the same paths for all three; mypy's configuration
# (strict, module names, the few untyped libraries) is in pyproject.toml.
echo "== ruff check, ruff format --check, mypy --strict: mailbridge tests bench"
.venv/bin/ruff check mailbridge tests bench
.venv/bin/ruff format --check mailbridge tests bench
.venv/bin/mypy --strict mailbridge tests bench

exec .venv/bin/python -m pytest "$@"
