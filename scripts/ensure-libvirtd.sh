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

if command -v virsh >/dev/null && [ -x /usr/sbin/ebtables ] && answers && { [ ! -c /dev/kvm ] || [ "$(stat -c %G /dev/kvm)" = kvm ]; }; then
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
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 30); do answers && break; sleep 1; done
answers || { echo "libvirtd does not answer on $uri" >&2; exit 1; }
# The first domain definition makes libvirtd probe QEMU (about a minute on a new
# machine); do it here, once, rather than inside a test's libvirt timeout.
timeout 300 virsh -c "$uri" domcapabilities --virttype qemu >/dev/null 2>&1 || true
if [ -c /dev/kvm ]; then
  timeout 300 virsh -c "$uri" domcapabilities --virttype kvm >/dev/null 2>&1 || true
fi
