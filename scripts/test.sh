#!/usr/bin/env bash
# The test command: set up (idempotent), make sure the services and the browser the tests use exist, run pytest.
#   bash scripts/test.sh            # everything CI runs, incl. the real offline model (a few minutes)
#   bash scripts/test.sh -m "not slow"   # extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# PostgreSQL for the multi-worker study tests (started if this machine has it but it is down).
if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 20); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
fi
# Headless Chromium for the report tests (Debian package), installed when missing and possible.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: chromium not installed; browser tests will be skipped" >&2
fi
mkdir -p test-artifacts
exec python -m pytest -q "$@"
