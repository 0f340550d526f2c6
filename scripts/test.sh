#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (README's test command; CI runs this too).
# Creates .venv, installs covidct with its test extras, and, as root or in CI, the system
# programs the integration tests use (DCMTK, dicom3tools, Redis, Chromium) and starts Redis and
# PostgreSQL when they are not listening.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"

need_apt=()
command -v storescu >/dev/null || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v Orthanc >/dev/null || need_apt+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v java >/dev/null || need_apt+=(default-jre-headless)
[ -f /usr/share/java/pixelmed.jar ] || need_apt+=(libpixelmed-java)  # PixelMed's SR validator
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need_apt[*]} with apt-get"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null
  else
    echo "missing ${need_apt[*]}: tests that need them skip (they fail under CI=true)" >&2
  fi
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! port_open 6379 && command -v redis-server >/dev/null; then
  echo "starting redis-server on 127.0.0.1:6379"
  mkdir -p /tmp/covidct-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/covidct-redis --logfile /tmp/covidct-redis/redis.log
fi
if ! port_open 5432 && command -v pg_ctlcluster >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit $rc
