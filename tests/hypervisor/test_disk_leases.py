"""Disks two hosts can never open at once: libvirt's lock manager (lockd, virtlockd) on
the private hosts of ``leased_pair`` (tests/hypervisor/leased_hosts.py), configured as
deploy/libvirt/ configures a node (README, "Disk leases (virtlockd)").

Each test makes one raw disk in the pair's shared folder (one path for both hosts, as a
pool on NFS is) and a domain of that disk alone (``type='qemu'``, SeaBIOS finds nothing to
boot: the lease is about the disk being open, not about a guest running in it), defined
on both hosts with one name and UUID, as a VM made anew elsewhere would be. Both hosts
run QEMU through ``qemu-unlocked``, whose own image locks are off: what refuses the
second host is the lease alone. A test that kills or freezes a host's processes gets
the host back thawed or restarted (``hosts``), whatever it asserted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from tests.hypervisor.leased_hosts import EMULATOR, LeasedHost, lease_holder, lease_name, lease_of
from tests.hypervisor.two_hosts import TwoHosts, alive

pytestmark = [pytest.mark.hypervisor]

PREFIX = "vmapi-leasetest-"
ADDRESS = "tcp://127.0.0.1"  # the target's QEMU listens there (a port of its range)
GONE_WAIT = 30.0  # seconds killed processes get to be gone (a bound, not a measure)


@dataclass
class Guest:
    """The disk and the domain of one test."""

    disk: Path
    name: str = field(default_factory=lambda: f"{PREFIX}{uuid.uuid4().hex[:8]}")
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def xml(self) -> str:
        domain = ET.Element("domain", type="qemu")
        ET.SubElement(domain, "name").text = self.name
        ET.SubElement(domain, "uuid").text = self.uuid
        ET.SubElement(domain, "memory", unit="MiB").text = "64"
        ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
        devices = ET.SubElement(domain, "devices")
        ET.SubElement(devices, "emulator").text = str(EMULATOR)
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=str(self.disk))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        ET.SubElement(devices, "memballoon", model="none")
        return ET.tostring(domain, encoding="unicode")

    def define(self, host: LeasedHost) -> libvirt.virDomain:
        conn = libvirt.open(host.uri)
        try:
            return conn.defineXML(self.xml())
        finally:
            conn.close()

    def on(self, host: LeasedHost) -> libvirt.virDomain:
        conn = libvirt.open(host.uri)
        try:
            return conn.lookupByName(self.name)
        finally:
            conn.close()


@pytest.fixture
def hosts(leased_pair: TwoHosts) -> Iterator[TwoHosts]:
    """The pair; afterwards every process of it runs again (thawed, or the host restarted
    when a daemon is gone) and the test's domains and disks are removed."""
    yield leased_pair
    for host in leased_pair.hosts:
        assert isinstance(host, LeasedHost)
        for pid in (*host.daemon_pids(), *host.qemu_pids()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if len(host.daemon_pids()) < len(host.pid_files):
            host.restart()
        remove_test_domains(host)
    for path in leased_pair.shared.glob(f"{PREFIX}*"):
        path.unlink()


def remove_test_domains(host: LeasedHost) -> None:
    conn = libvirt.open(host.uri)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(PREFIX):
                try:
                    dom.destroy()
                except libvirt.libvirtError:
                    if dom.isActive():  # (not running: off already, or went off meanwhile)
                        raise
                dom.undefine()
    finally:
        conn.close()


@pytest.fixture
def guest(hosts: TwoHosts) -> Guest:
    """A 1 MiB raw disk in the shared folder, its domain defined on both hosts and
    running on ``a``, holding the disk's lease."""
    made = Guest(hosts.shared / f"{PREFIX}{uuid.uuid4().hex[:8]}.raw")
    with open(made.disk, "wb") as disk:
        disk.truncate(1024 * 1024)
    made.define(hosts.a).create()
    made.define(hosts.b)
    return made


def holder(hosts: TwoHosts, guest: Guest) -> int | None:
    return lease_holder(hosts.a.leases, guest.disk)


def refused(dom: libvirt.virDomain, guest: Guest) -> None:
    """Starting ``dom`` fails on the disk's lease, and leaves no QEMU behind (libvirt
    starts QEMU paused and takes the lease before the CPUs run: no guest code ran)."""
    with pytest.raises(libvirt.libvirtError) as refusal:
        dom.create()
    assert refusal.value.get_error_code() == libvirt.VIR_ERR_RESOURCE_BUSY, refusal.value
    assert f"'{lease_name(guest.disk)}' is locked" in str(refusal.value)
    assert not dom.isActive()


def kill(pids: list[int], sig: signal.Signals = signal.SIGKILL) -> None:
    """Send ``sig`` to every pid; for SIGKILL, wait until all of them are gone."""
    for pid in pids:
        os.kill(pid, sig)
    deadline = time.monotonic() + GONE_WAIT
    while sig == signal.SIGKILL and any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still there: {[p for p in pids if alive(p)]}"
        time.sleep(0.01)


def test_a_second_host_is_refused_the_disk_while_the_first_runs_it(hosts, guest):
    """Also after the first host's libvirtd restarted, and through another domain."""
    a, b = hosts.a, hosts.b
    assert isinstance(a, LeasedHost) and isinstance(b, LeasedHost)
    # the lease: a file named by the SHA-256 of the disk's path, held by a's virtlockd
    assert lease_of(a.leases, guest.disk).exists()
    assert holder(hosts, guest) == a.pid("virtlockd")
    [qemu] = a.qemu_pids()

    refused(guest.on(b), guest)
    assert b.qemu_pids() == []

    # a's libvirtd restarted: the lease is virtlockd's, and stays
    a.restart_libvirtd()
    assert guest.on(a).isActive() and holder(hosts, guest) == a.pid("virtlockd")
    # another domain of the same disk: the lease is the disk's, not the domain's
    other = Guest(guest.disk)
    refused(other.define(b), other)
    assert a.qemu_pids() == [qemu] and guest.on(a).isActive()
    assert holder(hosts, guest) == a.pid("virtlockd")


def test_a_hung_host_keeps_the_lease_until_its_processes_are_killed(hosts, guest):
    a, b = hosts.a, hosts.b
    # a hung host: its libvirtd, its virtlockd and the guest's QEMU stopped where they are
    frozen = [a.pid("libvirtd"), a.pid("virtlockd"), *a.qemu_pids()]
    kill(frozen, signal.SIGSTOP)
    refused(guest.on(b), guest)
    assert holder(hosts, guest) == a.pid("virtlockd")

    # fenced: its QEMU and daemons killed at once (virtlogd is left: it holds no lease)
    kill(frozen)
    assert holder(hosts, guest) is None  # the kernel dropped the lock with its holder
    guest.on(b).create()  # at the first try: nothing to wait for
    assert holder(hosts, guest) == b.pid("virtlockd")


def test_a_live_migration_carries_the_lease(hosts, guest):
    a, b = hosts.a, hosts.b
    # (the shared folder is a local one, which libvirt cannot tell from a host's own disk:
    # UNSAFE, as vmapi's unchecked_storage does for a pool declared shared)
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
             | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNSAFE)  # fmt: skip
    guest.on(a).migrateToURI3(b.uri, {libvirt.VIR_MIGRATE_PARAM_URI: ADDRESS}, flags)

    assert guest.on(b).isActive() and not guest.on(a).isActive()
    assert holder(hosts, guest) == b.pid("virtlockd")
    refused(guest.on(a), guest)  # the source may not start it again
    assert guest.on(b).isActive()


def test_a_killed_virtlockd_drops_the_lease_of_a_running_guest(hosts, guest):
    """Why a node whose virtlockd died must be fenced (README): its guest runs on, and
    nothing stops a second host from opening the disk too."""
    a, b = hosts.a, hosts.b
    [qemu] = a.qemu_pids()
    kill([a.pid("virtlockd")])
    assert holder(hosts, guest) is None

    guest.on(b).create()
    assert alive(qemu) and a.qemu_pids() == [qemu]  # two QEMUs with the disk open
    assert holder(hosts, guest) == b.pid("virtlockd")
