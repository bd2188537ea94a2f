"""Migration through the driver between two real libvirtd hosts (tests/hypervisor/two_hosts.py).

The test guest (tests/guest/) runs as a ``type='qemu'`` domain named ``vmapi-migtest-*``
on a qcow2 overlay in a host's pool; its serial console goes to a file both hosts reach
(opened for appending, so each host's virtlogd adds to it), where the tick counter
shows whether the guest ever restarted. libvirt on each host says where the domain is.
Hosts ``a`` and ``b`` are one machine, so a pool folder is shared storage unless a disk
is copied into the other host's pool; libvirt cannot tell that a local folder is shared,
hence ``unchecked_storage`` for the moves that leave the disks where they are.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import GIB, MIB
from tests.guest import console
from tests.guest.disks import make_overlay, read_sector, sha256
from tests.hypervisor.two_hosts import PrivateHost, TwoHosts
from vmapi.hypervisor import (
    PAUSED,
    RUNNING,
    SHUTOFF,
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    NotSupported,
    OperationInvalid,
)
from vmapi.hypervisor.libvirt.config import Metadata
from vmapi.hypervisor.libvirt.driver import LibvirtDriver
from vmapi.hypervisor.observed import Action, ObservedDriver

pytestmark = [pytest.mark.hypervisor]

PREFIX = "vmapi-migtest-"
POOL = "migtest"
INSTALLATION = "vmapi-migtest"
ADDRESS = "127.0.0.1"  # where the target's QEMU listens for the stream
TIMEOUT = 120.0  # a bound for a hung migration, far above the ~2 s one takes


@pytest.fixture(scope="module")
def actions() -> list[Action]:
    return []


@pytest.fixture(scope="module")
def hv(actions: list[Action]) -> Iterator[ObservedDriver]:
    """The real libvirt driver, timed the way the app times it."""
    inner = LibvirtDriver(timeout=30.0)
    yield ObservedDriver(inner, actions.append)
    inner.connections.clear()


@pytest.fixture(scope="module")
def base_image(host_pair: TwoHosts, guest_image) -> Path:
    """The guest image, copied where both hosts see it (libvirt labels what it backs)."""
    path = host_pair.shared / "guest.img"
    if not path.exists():
        shutil.copy(guest_image.path, path)
        path.chmod(0o644)
    return path


@pytest.fixture
def hosts(host_pair: TwoHosts, hv: ObservedDriver) -> Iterator[TwoHosts]:
    """The pair with a ``migtest`` pool on each host; the test's domains and volumes
    are removed afterwards, also when it fails."""
    for host in host_pair.hosts:
        hv.ensure_pool(host.uri, POOL, str(host.pool))
    yield host_pair
    for host in host_pair.hosts:
        remove_test_objects(host)
    for log in host_pair.shared.glob(f"{PREFIX}*"):
        log.unlink()


def remove_test_objects(host: PrivateHost) -> None:
    conn = libvirt.open(host.uri)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(PREFIX):
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
        for path in host.pool.glob(f"{PREFIX}*"):
            path.unlink()
        conn.storagePoolLookupByName(POOL).refresh(0)
    finally:
        conn.close()


class Guest:
    """A domain of the test guest and its console log."""

    def __init__(self, shared: Path) -> None:
        self.name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        self.log = shared / f"{self.name}.log"

    def read(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_ticks(self, count: int) -> list[int]:
        """Wait until the guest has printed ``count`` more ticks than now; all ticks."""
        seen = self.ticks()
        text = console.wait_for(self.read, lambda t: len(_ticks(t)) >= len(seen) + count,
                                f"{count} more ticks of {self.name}")  # fmt: skip
        return _ticks(text)

    def ticks(self) -> list[int]:
        return _ticks(self.read())


def _ticks(text: str) -> list[int]:
    return [tick for boot in console.boots(text) for tick in boot.ticks]


def disk(path: str | Path, fmt: str, target: str) -> ET.Element:
    element = ET.Element("disk", type="file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type=fmt)
    ET.SubElement(element, "source", file=str(path))
    ET.SubElement(element, "target", dev=target, bus="virtio")
    return element


def guest_xml(guest: Guest, disks: list[ET.Element]) -> str:
    """256 MiB, 1 vCPU, TCG, vmapi's metadata; the serial console appends to the log."""
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = guest.name
    ET.SubElement(domain, "memory", unit="MiB").text = "256"
    ET.SubElement(domain, "vcpu").text = "1"
    domain.append(Metadata(7, INSTALLATION).element())
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_element, "boot", dev="hd")
    devices = ET.SubElement(domain, "devices")
    devices.extend(disks)
    serial = ET.SubElement(devices, "serial", type="file")
    # append: the target's virtlogd opens the same file; without it the move truncates it
    ET.SubElement(serial, "source", path=str(guest.log), append="on")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def root_overlay(host: PrivateHost, guest: Guest, base_image: Path) -> Path:
    overlay = make_overlay(base_image, host.pool / f"{guest.name}-root.qcow2", "1G")
    with_conn(host, lambda conn: conn.storagePoolLookupByName(POOL).refresh(0))
    return overlay


def with_conn(host: PrivateHost, fn):
    conn = libvirt.open(host.uri)
    try:
        return fn(conn)
    finally:
        conn.close()


def define(host: PrivateHost, guest: Guest, disks: list[ET.Element], start: bool) -> None:
    """A persistent domain (what vmapi makes), started or not."""

    def make(conn: libvirt.virConnect) -> None:
        dom = conn.defineXML(guest_xml(guest, disks))
        if start:
            dom.create()

    with_conn(host, make)


def boot(host: PrivateHost, guest: Guest, base_image: Path, *more: ET.Element) -> Path:
    """Start the guest on ``host`` from an overlay in its pool; wait for two ticks."""
    overlay = root_overlay(host, guest, base_image)
    define(host, guest, [disk(overlay, "qcow2", "vda"), *more], start=True)
    guest.wait_for_ticks(2)
    return overlay


def only_on(hv, here: PrivateHost, not_there: PrivateHost, name: str, state: str) -> None:
    """libvirt on ``here`` has the domain, defined, in ``state``, with vmapi's metadata;
    ``not_there`` has no trace of it (neither running nor defined)."""
    info = hv.domain(here.uri, name)
    assert (info.state, info.vm_id, info.installation) == (state, 7, INSTALLATION)
    assert with_conn(here, lambda conn: conn.lookupByName(name).isPersistent())
    assert name not in [d.name for d in hv.domains(not_there.uri)]


def disk_files(host: PrivateHost, name: str, flags: int = 0) -> list[str]:
    xml = with_conn(host, lambda conn: conn.lookupByName(name).XMLDesc(flags))
    return [s.get("file") for s in ET.fromstring(xml).iterfind("devices/disk/source")]


def assert_never_restarted(guest: Guest) -> None:
    boots = console.boots(guest.read())
    assert len(boots) == 1, f"the guest booted {len(boots)} times"
    ticks = boots[0].ticks
    assert ticks == list(range(1, len(ticks) + 1)), ticks  # no tick lost, none repeated


def test_live_migration_there_and_back_keeps_the_guest_running(hosts, hv, base_image, actions):
    a, b = hosts.a, hosts.b
    guest = Guest(hosts.shared)
    boot(a, guest, base_image)
    hops = []
    for source, target in ((a, b), (b, a)):
        started = time.monotonic()
        hv.migrate(source.uri, guest.name, target.uri, timeout=TIMEOUT,
                   migration_address=ADDRESS, unchecked_storage=True)  # fmt: skip
        seconds = time.monotonic() - started
        only_on(hv, target, source, guest.name, RUNNING)
        stats = hv.last_migration(target.uri, guest.name)
        assert stats is not None and stats.incoming
        assert stats.downtime is not None and stats.memory_bytes > 0
        guest.wait_for_ticks(2)  # counting on, on the target
        hops.append((seconds, stats))
    # a paused guest moves live and stays paused
    hv.suspend(a.uri, guest.name)
    hv.migrate(a.uri, guest.name, b.uri, timeout=TIMEOUT, migration_address=ADDRESS,
               unchecked_storage=True)  # fmt: skip
    only_on(hv, b, a, guest.name, PAUSED)
    hv.resume(b.uri, guest.name)
    guest.wait_for_ticks(2)
    assert_never_restarted(guest)
    moves = [x for x in actions if x.action == "migrate" and x.domain == guest.name]
    assert [x.error for x in moves] == [None, None, None]
    for seconds, stats in hops:
        print(f"\nlive migration: {seconds:.2f} s from the client, job {stats.seconds:.2f} s, "
              f"downtime {stats.downtime * 1000:.0f} ms, {stats.memory_bytes / MIB:.0f} MiB "
              f"in {stats.memory_iterations} passes")  # fmt: skip


def test_live_migration_with_copied_disks_keeps_their_content(hosts, hv, base_image):
    a, b = hosts.a, hosts.b
    guest = Guest(hosts.shared)
    data = hv.create_volume(a.uri, POOL, f"{guest.name}-data.raw", 64 * MIB, "raw")
    with open(data, "r+b") as f:
        f.write(os.urandom(64 * MIB))
    checksum = sha256(Path(data))
    root = boot(a, guest, base_image, disk(data, "raw", "vdb"))
    # the target's volumes, made beforehand in its own pool: same names, sizes, formats
    b_root = hv.create_volume(b.uri, POOL, root.name, GIB, "qcow2")
    b_data = hv.create_volume(b.uri, POOL, Path(data).name, 64 * MIB, "raw")
    assert Path(b_root).parent == b.pool != a.pool

    hv.migrate(a.uri, guest.name, b.uri, timeout=TIMEOUT, migration_address=ADDRESS,
               copy_storage=True, disk_paths={str(root): b_root, data: b_data})  # fmt: skip

    only_on(hv, b, a, guest.name, RUNNING)
    assert disk_files(b, guest.name) == [b_root, b_data]
    assert disk_files(b, guest.name, libvirt.VIR_DOMAIN_XML_INACTIVE) == [b_root, b_data]
    guest.wait_for_ticks(2)
    assert_never_restarted(guest)
    marker = console.boots(guest.read())[0]
    hv.destroy(b.uri, guest.name)  # the files at rest, to read them
    assert sha256(Path(b_data)) == checksum
    # what the guest wrote into its overlay on a came along (the base image below it too)
    assert read_sector(Path(b_root), marker.marker_sector).startswith(marker.marker.encode())


def test_cold_migration_moves_a_shut_off_definition(hosts, hv, base_image):
    a, b = hosts.a, hosts.b
    guest = Guest(hosts.shared)
    root = root_overlay(a, guest, base_image)
    define(a, guest, [disk(root, "qcow2", "vda")], start=True)
    # a running domain is not moved cold, nor a cold one with its disks
    with pytest.raises(OperationInvalid):
        hv.migrate(a.uri, guest.name, b.uri, timeout=TIMEOUT, live=False)
    only_on(hv, a, b, guest.name, RUNNING)
    hv.destroy(a.uri, guest.name)
    with pytest.raises(NotSupported):
        hv.migrate(a.uri, guest.name, b.uri, timeout=TIMEOUT, live=False, copy_storage=True)
    only_on(hv, a, b, guest.name, SHUTOFF)

    # the disk is copied to b's pool beforehand (there, the storage streams' job)
    b_root = b.pool / root.name
    shutil.copy(root, b_root)
    hv.migrate(a.uri, guest.name, b.uri, timeout=TIMEOUT, live=False,
               disk_paths={str(root): str(b_root)})  # fmt: skip

    only_on(hv, b, a, guest.name, SHUTOFF)
    assert disk_files(b, guest.name) == [str(b_root)]
    assert hv.last_migration(b.uri, guest.name) is None  # nothing moved but the definition
    hv.start(b.uri, guest.name)  # b's definition is whole: QEMU starts on b's file
    assert hv.domain(b.uri, guest.name).state == RUNNING


def test_a_migration_past_its_timeout_is_aborted_and_the_guest_stays(
    hosts, hv, base_image, actions
):
    a, b = hosts.a, hosts.b
    guest = Guest(hosts.shared)
    boot(a, guest, base_image)
    # 1 MiB/s cannot move the guest's tens of MiB in a second
    with pytest.raises(HypervisorTimeout):
        hv.migrate(a.uri, guest.name, b.uri, timeout=1.0, migration_address=ADDRESS,
                   bandwidth=1, unchecked_storage=True)  # fmt: skip
    only_on(hv, a, b, guest.name, RUNNING)
    assert [d.name for d in hv.domains(b.uri)] == []
    guest.wait_for_ticks(2)
    assert_never_restarted(guest)
    [move] = [x for x in actions if x.action == "migrate" and x.domain == guest.name]
    assert move.error == "HypervisorTimeout"
    # the aborted job left nothing in the way of the next one
    hv.migrate(a.uri, guest.name, b.uri, timeout=TIMEOUT, migration_address=ADDRESS,
               unchecked_storage=True)  # fmt: skip
    only_on(hv, b, a, guest.name, RUNNING)


def test_a_refused_migration_leaves_the_domain_where_it_was(hosts, hv, base_image):
    a, b = hosts.a, hosts.b
    guest = Guest(hosts.shared)
    root = root_overlay(a, guest, base_image)
    define(a, guest, [disk(root, "qcow2", "vda")], start=True)
    # b already has a domain of that name (another UUID): it refuses the incoming one
    squatter = ET.fromstring(guest_xml(guest, []))
    with_conn(b, lambda conn: conn.defineXML(ET.tostring(squatter, encoding="unicode")))
    squatter_uuid = with_conn(b, lambda conn: conn.lookupByName(guest.name).UUIDString())
    with pytest.raises(HypervisorError) as refused:
        hv.migrate(a.uri, guest.name, b.uri, timeout=TIMEOUT, migration_address=ADDRESS,
                   unchecked_storage=True)  # fmt: skip
    assert not isinstance(refused.value, HypervisorTimeout | HypervisorUnavailable)
    assert hv.domain(a.uri, guest.name).state == RUNNING
    assert hv.domain(b.uri, guest.name).uuid == squatter_uuid
    assert hv.domain(b.uri, guest.name).state == SHUTOFF

    # a target nobody answers at: the error names the target, the source is unchanged
    nowhere = f"qemu+unix:///system?socket={hosts.root}/nowhere/libvirt-sock"
    with pytest.raises(HypervisorUnavailable) as unreachable:
        hv.migrate(a.uri, guest.name, nowhere, timeout=TIMEOUT, migration_address=ADDRESS,
                   unchecked_storage=True)  # fmt: skip
    assert unreachable.value.uri == nowhere
    assert hv.domain(a.uri, guest.name).state == RUNNING

    with pytest.raises(DomainNotFound):
        hv.migrate(a.uri, f"{PREFIX}missing", b.uri, timeout=TIMEOUT)
