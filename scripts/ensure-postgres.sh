#!/usr/bin/env bash
# Make sure a PostgreSQL server answers and print a superuser URL for the test suite.
# Installs Debian's server if none is there, starts the cluster when it is down, and
# falls back to the Unix socket as a root role when TCP trust authentication is absent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
url=${VMAPI_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}

can_connect() { psql "$1" -Atqc 'select 1' >/dev/null 2>&1; }

if command -v psql >/dev/null && can_connect "$url"; then echo "$url"; exit 0; fi
"$here/ensure-packages.sh" postgresql postgresql-client >&2
if ! pg_lsclusters -h 2>/dev/null | grep -q online; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  for _ in $(seq 1 30); do pg_isready -q && break; sleep 1; done
fi
if can_connect "$url"; then echo "$url"; exit 0; fi
# A fresh Debian install: peer authentication on the socket. Give root its own superuser role.
if [ "$(id -u)" -eq 0 ]; then
  runuser -u postgres -- psql -qc "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='root') THEN CREATE ROLE root SUPERUSER LOGIN; END IF; END\$\$" >&2
  socket_url="postgresql:///postgres?host=/var/run/postgresql"
  if can_connect "$socket_url"; then echo "$socket_url"; exit 0; fi
fi
echo "PostgreSQL does not answer at $url" >&2
exit 1
