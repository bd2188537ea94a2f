#!/usr/bin/env bash
# Install the Debian packages vmapi needs that are missing. Idempotent; quiet when all are there.
# Usage: scripts/ensure-packages.sh PACKAGE...
#
# No service starts on install: several packages' postinst scripts run `invoke-rc.d NAME
# start` (etcd-server would start a system etcd on localhost:2379, patroni one on
# /etc/patroni, nginx one on port 80). The tests and benchmarks start their own, in folders
# of their own, and scripts/ensure-postgres.sh and ensure-libvirtd.sh start what they
# need. invoke-rc.d asks /usr/sbin/policy-rc.d (101: denied): one that denies is put there
# for the install when there is none (removed after), and one that allows is set aside
# for it (put back after).
set -euo pipefail
policy=${VMAPI_POLICY_RC_D:-/usr/sbin/policy-rc.d}
missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
  exit 1
fi
echo "installing: ${missing[*]}" >&2
saved=""
made=""
restore() {
  if [ -n "$made" ]; then rm -f "$policy"; fi
  if [ -n "$saved" ]; then mv -f "$saved" "$policy"; fi
}
trap restore EXIT
denies() { [ -x "$policy" ] && { "$policy" vmapi-probe start >/dev/null 2>&1; [ $? -eq 101 ]; }; }
if [ -e "$policy" ] && ! denies; then
  saved="$policy.vmapi-saved"
  mv "$policy" "$saved"
fi
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# made by vmapi scripts/ensure-packages.sh for one install\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  made=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
