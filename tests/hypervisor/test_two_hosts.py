"""The two-host fixture itself (tests/hypervisor/two_hosts.py, and its leased hosts in
leased_hosts.py): two private libvirtd daemons beside the machine's own, and nothing left
on the machine afterwards, also when the test using them fails or its session died."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.conftest import unavailable
from tests.hypervisor.leased_hosts import LeasedHost
from tests.hypervisor.two_hosts import (
    PARENT,
    HostUnavailable,
    PrivateHost,
    alive,
    check_machine,
    holders,
    new_root,
    remove_abandoned,
    two_hosts,
)

pytestmark = [pytest.mark.hypervisor]

DEFAULT_URI = "qemu:///system"


@pytest.fixture(autouse=True)
def machine() -> None:
    try:
        check_machine()
    except HostUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture
def default_libvirtd():
    """The machine's own libvirtd (make test starts it): it must keep running."""
    try:
        conn = libvirt.open(DEFAULT_URI)
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd does not answer on {DEFAULT_URI}: {exc}")
    yield conn
    conn.close()


def tiny_domain(name: str) -> str:
    """A domain with no disk: SeaBIOS runs and finds nothing to boot, which is enough."""
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "32"
    ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
    ET.SubElement(ET.SubElement(domain, "devices"), "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


def host_uuid(conn: libvirt.virConnect) -> str | None:
    return ET.fromstring(conn.getCapabilities()).findtext("host/uuid")


def test_two_private_hosts_leave_nothing_behind_when_a_test_fails(default_libvirtd):
    name = f"vmapi-migtest-fixture-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match="the test failed"), two_hosts(warm=False) as pair:
        root = pair.root
        conn_a, conn_b = (libvirt.open(host.uri) for host in pair.hosts)
        # each its own host UUID (else: "Attempt to migrate guest to the same host")
        assert [host_uuid(conn_a), host_uuid(conn_b)] == [pair.a.host_uuid, pair.b.host_uuid]
        assert host_uuid(default_libvirtd) not in (pair.a.host_uuid, pair.b.host_uuid)
        conn_a.createXML(tiny_domain(name), 0)
        assert [d.name() for d in conn_a.listAllDomains()] == [name]
        assert name not in [d.name() for d in conn_b.listAllDomains()]
        assert name not in [d.name() for d in default_libvirtd.listAllDomains()]
        pids = [*pair.a.daemon_pids(), *pair.b.daemon_pids(), *pair.a.qemu_pids()]
        assert len(pids) == 5  # two libvirtd, two virtlogd, one QEMU
        # the binds are in the hosts' namespaces, not in the machine's
        libvirtd_a = pair.a.daemon_pids()[0]
        assert (
            f"{root.name}/a/run /run/libvirt " in Path(f"/proc/{libvirtd_a}/mountinfo").read_text()
        )
        assert root.name not in Path("/proc/self/mountinfo").read_text()
        assert libvirtd_a in holders(pair.a.folder)
        for conn in (conn_a, conn_b):
            conn.close()
        raise RuntimeError("the test failed")
    assert [pid for pid in pids if alive(pid)] == []
    assert holders(root) == []  # no process in any namespace has a mount of it
    assert processes_naming(str(root)) == []
    assert not root.exists()
    default_libvirtd.getInfo()  # the machine's own daemon answers as before


def test_the_hosts_of_a_dead_session_are_ended_by_the_next_one():
    # Not under PARENT's prefix: another session's clean-up must not see these.
    parent = Path(tempfile.mkdtemp(prefix="vmapi-abandontest-", dir=PARENT))
    dead_root, dead_lock = new_root(parent)
    live_root, live_lock = new_root(parent)
    host = PrivateHost(dead_root / "a", (49380, 49399))
    try:
        host.start()
        pids = host.daemon_pids()
        assert len(pids) == 2
        os.close(dead_lock)  # its session is gone; the live one still holds its lock
        dead_lock = None

        assert remove_abandoned(parent) == [dead_root]

        assert [pid for pid in pids if alive(pid)] == []
        assert holders(dead_root) == []
        assert not dead_root.exists()
        assert live_root.exists()
    finally:
        host.stop()
        for fd in (dead_lock, live_lock):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(parent, ignore_errors=True)


def test_a_leased_host_runs_virtlockd_beside_its_libvirtd_and_leaves_nothing():
    parent = Path(tempfile.mkdtemp(prefix="vmapi-abandontest-", dir=PARENT))
    root, lock = new_root(parent)
    host = LeasedHost(root / "a", (49380, 49399))
    try:
        host.start()
        daemons = {name: host.pid(name) for name in ("libvirtd", "virtlockd", "virtlogd")}
        # one mount namespace for the three (the lock plugin reaches virtlockd's socket
        # at /run/libvirt there), not the machine's
        namespaces = {os.readlink(f"/proc/{pid}/ns/mnt") for pid in daemons.values()}
        assert len(namespaces) == 1 and os.readlink("/proc/self/ns/mnt") not in namespaces
        assert (host.folder / "run" / "virtlockd-sock").is_socket()
        assert 'lock_manager = "lockd"' in (host.folder / "etc" / "qemu.conf").read_text()
        lockd = (host.folder / "etc" / "qemu-lockd.conf").read_text()
        assert f"file_lockspace_dir = {json.dumps(str(root / 'leases'))}" in lockd
        assert (root / "leases").is_dir()
        os.close(lock)  # its session dies: the next one ends virtlockd too
        lock = None

        assert remove_abandoned(parent) == [root]

        assert [pid for pid in daemons.values() if alive(pid)] == []
        assert holders(root) == [] and not root.exists()
    finally:
        host.stop()
        if lock is not None:
            os.close(lock)
        shutil.rmtree(parent, ignore_errors=True)
