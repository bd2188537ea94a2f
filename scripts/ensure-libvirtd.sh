#!/usr/bin/env bash
# Make sure a real libvirtd with the QEMU driver answers on qemu:///system (the
# hypervisor test tier). Installs Debian's packages, the users, groups and folders the
# daemons expect, and starts virtlogd and libvirtd when they are not running.
# iptables: libvirt's network filters (vmapi guards every NIC with them) run
# /usr/sbin/ebtables, iptables and ip6tables (the nf_tables variants, Debian's default).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
uri=qemu:///system

answers() { timeout 20 virsh -c "$uri" version >/dev/null 2>&1; }

# libvirt's rbd storage backend (libvirt-daemon-driver-storage-rbd, a test package: the
# Ceph tests) is loaded only by a libvirtd started after it was installed; its pool
# capabilities then list rbd as supported.
rbd_installed() { compgen -G '/usr/lib/*/libvirt/storage-backend/libvirt_storage_backend_rbd.so' >/dev/null; }
rbd_loaded() { timeout 20 virsh -c "$uri" pool-capabilities 2>/dev/null | grep -q "<pool type='rbd' supported='yes'>"; }
pidfile=/run/libvirtd.pid

# A daemon started here keeps none of the caller's open files: run under
# `flock /work/notes/heavy.lock`, libvirtd would otherwise hold the lock as long as it runs.
detached() {
  (
    for fd in /proc/self/fd/*; do
      n=${fd##*/}
      if [ "$n" -gt 2 ]; then eval "exec $n>&-" 2>/dev/null || true; fi
    done
    exec "$@"
  )
}

# Restart the system libvirtd (its pid file's, never a test's private daemon) so that it
# loads the rbd backend, unless a domain runs: that one is left alone, and the tests that
# need rbd fail saying the backend is missing.
restart_for_rbd() {
  local running pid
  running=$(timeout 20 virsh -c "$uri" list --name 2>/dev/null | grep -v '^$' || true)
  if [ -n "$running" ]; then
    echo "libvirtd on $uri has not loaded its rbd storage backend and is not restarted:" \
      "domains run ($(echo $running | tr '\n' ' '))" >&2
    return 0
  fi
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -z "$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != libvirtd ]; then
    echo "libvirtd on $uri has not loaded its rbd storage backend; no pid in $pidfile" >&2
    return 0
  fi
  echo "restarting libvirtd (pid $pid) to load its rbd storage backend" >&2
  kill "$pid"
  for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  detached libvirtd -d
  for _ in $(seq 1 30); do answers && break; sleep 1; done
  rbd_loaded || echo "libvirtd on $uri still has no rbd storage backend" >&2
}

if command -v virsh >/dev/null && [ -x /usr/sbin/ebtables ] && answers && { [ ! -c /dev/kvm ] || [ "$(stat -c %G /dev/kvm)" = kvm ]; }; then
  if rbd_installed && ! rbd_loaded; then restart_for_rbd; fi
  exit 0
fi
"$here/ensure-packages.sh" libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
  qemu-system-x86 qemu-utils iptables >&2
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd --system --no-create-home -g libvirt-qemu \
  -G kvm -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/images
# Without udev (containers, minimal VMs) /dev/kvm stays root-only; QEMU runs as libvirt-qemu.
if [ -c /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi
pgrep -x virtlogd >/dev/null || detached virtlogd -d
pgrep -x libvirtd >/dev/null || detached libvirtd -d
for _ in $(seq 1 30); do answers && break; sleep 1; done
answers || { echo "libvirtd does not answer on $uri" >&2; exit 1; }
# The first domain definition makes libvirtd probe QEMU (about a minute on a new
# machine); do it here, once, rather than inside a test's libvirt timeout.
timeout 300 virsh -c "$uri" domcapabilities --virttype qemu >/dev/null 2>&1 || true
if [ -c /dev/kvm ]; then
  timeout 300 virsh -c "$uri" domcapabilities --virttype kvm >/dev/null 2>&1 || true
fi
