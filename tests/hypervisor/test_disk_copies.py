"""Standalone copies of disks on a real libvirtd (issue 24): a volume cloned with its chain
flattened, a running domain's disk copied live (a block copy ended without a pivot), and
what a failure leaves: nothing (fixtures: tests/hypervisor/conftest.py).

The disk is a qcow2 overlay on a raw base, with known bytes in both layers, written with
qemu-io. The domains have no OS (SeaBIOS finds nothing to boot), so their disks are not
written unless a test writes them through QEMU's monitor.
"""

import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.conftest import MIB
from tests.hypervisor.streamtest import POOL_ROOT, URI, pool_volumes, remove_pool
from vmapi.hypervisor import (
    DiskSpec,
    DomainSpec,
    HypervisorError,
    HypervisorTimeout,
    NoGuestAgent,
    OperationInvalid,
    VolumeExists,
)
from vmapi.hypervisor.libvirt import LibvirtDriver
from vmapi.hypervisor.libvirt.copies import chain
from vmapi.hypervisor.libvirt.designer import design

pytestmark = [pytest.mark.hypervisor]

#: the overlay's virtual size (larger than its base: the copy must keep it)
SIZE = 64 * MIB
#: what the layers hold: (pattern, offset, length); the overlay's bytes win where both are
BASE_DATA = [(0x11, 0, MIB)]
TOP_DATA = [(0x22, 512 * 1024, MIB), (0x33, 40 * MIB, MIB)]
COPY_FLAGS = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB


def run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def write(path, fmt, data):
    for pattern, offset, length in data:
        run("qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} {offset} {length}", path)


def holds(path, fmt, pattern, offset, length):
    """Whether the image reads ``pattern`` there (shared: a running QEMU may hold it)."""
    found = subprocess.run(["qemu-io", "-r", "-U", "-f", fmt, "-c",
                            f"read -P {pattern:#x} {offset} {length}", path],
                           capture_output=True, text=True)  # fmt: skip
    return found.returncode == 0 and "Pattern verification failed" not in found.stdout


def info(path, shared=True):
    return json.loads(run("qemu-img", "info", *(["-U"] if shared else []), "--output=json", path))


def identical(a, b):
    """``qemu-img compare``: the same guest-visible content (formats and chains aside)."""
    found = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    return found.returncode == 0


def make_chain(libvirtd, pool, top="top.qcow2", backing=None):
    """A raw base with BASE_DATA, a qcow2 overlay of SIZE on it with TOP_DATA; the
    overlay's path. ``backing``: the overlay's backing file instead (no base made)."""
    folder = POOL_ROOT / pool
    if backing is None:
        backing = str(folder / "base.raw")
        run("qemu-img", "create", "-f", "raw", backing, str(32 * MIB))
        write(backing, "raw", BASE_DATA)
    path = str(folder / top)
    local = backing.startswith("/")
    # (-u: the export may not answer; nothing is read from it here)
    run("qemu-img", "create", "-f", "qcow2", *([] if local else ["-u"]), "-F", "raw",
        "-b", backing, path, str(SIZE))  # fmt: skip
    if local:
        write(path, "qcow2", TOP_DATA)
    libvirtd.storagePoolLookupByName(pool).refresh(0)
    return path


def domain(libvirtd, hv, domains, pool, path, name="vm", agent_port=True):
    """A persistent ``type='qemu'`` domain with ``path`` as its vda, defined (as vmapi
    writes it: with the guest agent's port unless told otherwise) and started."""
    name = f"{pool}-{name}"
    domains.append(name)
    spec = DomainSpec(name=name, uuid=str(uuid.uuid4()), domain_type="qemu", vcpus=1,
                      max_vcpus=1, memory=64 * MIB, max_memory=64 * MIB, vm_id=0,
                      installation="vmapi-streamtest",
                      disks=(DiskSpec(path=path, format="qcow2", target="vda"),))  # fmt: skip
    if agent_port:
        hv.define(URI, spec)
    else:
        root = design(spec).element()
        devices = root.find("devices")
        devices.remove(devices.find("channel"))
        libvirtd.defineXML(ET.tostring(root, encoding="unicode"))
    hv.start(URI, name)
    return name


def disk_chain(libvirtd, name, flags=0):
    root = ET.fromstring(libvirtd.lookupByName(name).XMLDesc(flags))
    return chain(root.find("devices/disk"))


def no_job(libvirtd, name):
    return libvirtd.lookupByName(name).blockJobInfo("vda", 0) == {}


def has_chain_content(path):
    """The copy reads what the whole chain did."""
    return (
        holds(path, "qcow2", 0x11, 0, 512 * 1024)
        and holds(path, "qcow2", 0x22, 512 * 1024, MIB)
        and holds(path, "qcow2", 0x33, 40 * MIB, MIB)
    )


def standalone(path):
    found = info(path, shared=False)  # nobody holds it any more
    assert found["format"] == "qcow2"
    assert "backing-filename" not in found and "full-backing-filename" not in found
    assert found["virtual-size"] == SIZE
    assert found["format-specific"]["data"]["compat"] == "1.1"
    return True


# ---------------------------------------------------------------------- clone


def test_clone_of_an_overlay_stands_alone(libvirtd, hv, pool):
    top = make_chain(libvirtd, pool)
    path = hv.clone_volume(URI, pool, "clone", pool, "top.qcow2", timeout=60)
    assert path == str(POOL_ROOT / pool / "clone")
    assert standalone(path)
    assert identical(top, path) and has_chain_content(path)
    assert hv.volume(URI, pool, "clone") == (path, SIZE)
    assert info(top)["backing-filename"].endswith("base.raw")  # the source as it was


def test_clone_into_another_pool(libvirtd, hv, pool):
    top = make_chain(libvirtd, pool)
    other = f"{pool}-b"
    hv.ensure_pool(URI, other, str(POOL_ROOT / other))
    try:
        path = hv.clone_volume(URI, other, "clone", pool, "top.qcow2", timeout=60)
        assert path == str(POOL_ROOT / other / "clone")
        assert standalone(path) and identical(top, path)
    finally:
        remove_pool(libvirtd.storagePoolLookupByName(other))


def test_libvirt_clones_at_the_source_size_whatever_capacity_is_asked(libvirtd, pool):
    """Why clone_volume has no capacity: libvirt's qemu-img convert keeps the source's
    virtual size, larger or smaller asked (a larger volume is a resize afterwards)."""
    make_chain(libvirtd, pool)
    found = libvirtd.storagePoolLookupByName(pool)
    source = found.storageVolLookupByName("top.qcow2")
    for name, asked in (("larger", 2 * SIZE), ("smaller", SIZE // 4)):
        xml = (f"<volume><name>{name}</name><capacity unit='bytes'>{asked}</capacity>"
               "<target><format type='qcow2'/></target></volume>")  # fmt: skip
        made = found.createXMLFrom(xml, source, 0)
        assert made.info()[1] == SIZE and info(made.path())["virtual-size"] == SIZE


def test_clone_onto_a_taken_name_leaves_that_volume_alone(libvirtd, hv, pool):
    make_chain(libvirtd, pool)
    hv.upload_volume(URI, pool, "clone", 4, [b"mine"], timeout=60)
    with pytest.raises(VolumeExists):
        hv.clone_volume(URI, pool, "clone", pool, "top.qcow2", timeout=60)
    assert b"".join(hv.download_volume(URI, pool, "clone", 60)) == b"mine"


def test_a_clone_that_fails_leaves_nothing(libvirtd, hv, pool, tmp_path):
    # the overlay's backing file is an NBD export nobody serves: the conversion fails
    make_chain(libvirtd, pool, backing=f"nbd+unix:///?socket={tmp_path}/nobody.sock")
    with pytest.raises(HypervisorError) as failed:
        hv.clone_volume(URI, pool, "clone", pool, "top.qcow2", timeout=60)
    assert not isinstance(failed.value, HypervisorTimeout)
    assert pool_volumes(libvirtd, pool) == ["top.qcow2"]


def test_a_clone_past_its_timeout_is_deleted_once_libvirt_has_made_it(libvirtd, pool, tmp_path):
    # The backing file is an NBD export whose server is stopped: libvirt's conversion
    # waits for it, past the clone's timeout, and libvirt cannot stop it.
    socket = tmp_path / "nbd.sock"
    served = tmp_path / "served.raw"
    run("qemu-img", "create", "-f", "raw", str(served), str(32 * MIB))
    write(str(served), "raw", BASE_DATA)
    server = subprocess.Popen(["qemu-nbd", "-k", str(socket), "-f", "raw", "-t", str(served)])
    try:
        deadline = time.monotonic() + 30
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        make_chain(libvirtd, pool, backing=f"nbd+unix:///?socket={socket}")
        os.kill(server.pid, signal.SIGSTOP)
        driver = LibvirtDriver(timeout=1.0)  # also how long it waits for the clean-up
        try:
            started = time.monotonic()
            with pytest.raises(HypervisorTimeout):
                driver.clone_volume(URI, pool, "clone", pool, "top.qcow2", timeout=1.0)
            assert time.monotonic() - started < 10
            # the clone's call waits on in libvirt; the driver's other calls still answer
            assert driver.volume(URI, pool, "top.qcow2")[1] == SIZE
            # still being made by libvirt (the pool cannot be refreshed meanwhile)
            found = libvirtd.storagePoolLookupByName(pool)
            assert "clone" in found.listVolumes()
            os.kill(server.pid, signal.SIGCONT)
            deadline = time.monotonic() + 60
            while "clone" in found.listVolumes() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            os.kill(server.pid, signal.SIGCONT)
            driver.connections.clear()
        assert pool_volumes(libvirtd, pool) == ["top.qcow2"]
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        server.wait(30)


# ---------------------------------------------------------------------- live copy


@pytest.mark.parametrize("paused", [False, True])
def test_live_copy_is_the_chain_at_that_moment_and_the_domain_keeps_its_own(
    libvirtd, hv, pool, domains, caplog, paused
):
    top = make_chain(libvirtd, pool)
    name = domain(libvirtd, hv, domains, pool, top)
    if paused:
        hv.suspend(URI, name)
    before = disk_chain(libvirtd, name)
    persistent = disk_chain(libvirtd, name, libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert [fmt for _path, fmt in before] == ["qcow2", "raw"]
    caplog.set_level(logging.INFO, logger="vmapi.hypervisor.libvirt.copies")

    path = hv.copy_disk_live(URI, name, "vda", pool, "copy", timeout=120)

    assert path == str(POOL_ROOT / pool / "copy")
    assert standalone(path)
    assert identical(top, path) and has_chain_content(path)
    # the domain as it was: its chain, live and persistent, its state, no job left
    assert disk_chain(libvirtd, name) == before
    assert disk_chain(libvirtd, name, libvirt.VIR_DOMAIN_XML_INACTIVE) == persistent
    assert hv.domain(URI, name).state == ("paused" if paused else "running")
    assert no_job(libvirtd, name)
    (record,) = [r for r in caplog.records if hasattr(r, "abort_seconds")]
    print(f"\nblockJobAbort (the copy's end, the guest's only possible pause) took "
          f"{record.abort_seconds * 1000:.1f} ms ({'paused' if paused else 'running'})")  # fmt: skip

    # point in time: what the guest writes now reaches its disk, not the copy
    device = "/machine/peripheral/virtio-disk0/virtio-backend"
    for command in ("write -P 0x44 0 65536", "flush"):  # (a guest not started: write-back)
        said = run("virsh", "-c", URI, "qemu-monitor-command", name, "--hmp",
                   f'qemu-io -d {device} "{command}"')  # fmt: skip
        assert said.strip() == ""
    assert holds(top, "qcow2", 0x44, 0, 65536)
    assert holds(path, "qcow2", 0x11, 0, 65536) and not holds(path, "qcow2", 0x44, 0, 65536)


def test_a_shut_off_domain_is_not_copied_live(libvirtd, hv, pool, domains):
    name = domain(libvirtd, hv, domains, pool, make_chain(libvirtd, pool))
    hv.destroy(URI, name)
    with pytest.raises(OperationInvalid):
        hv.copy_disk_live(URI, name, "vda", pool, "copy", timeout=60)
    assert pool_volumes(libvirtd, pool) == ["base.raw", "top.qcow2"]


@pytest.mark.parametrize("agent_port", [True, False], ids=["agent-silent", "no-agent-port"])
def test_quiesce_without_an_agent_makes_nothing(libvirtd, hv, pool, domains, agent_port):
    top = make_chain(libvirtd, pool)
    name = domain(libvirtd, hv, domains, pool, top, agent_port=agent_port)
    before = disk_chain(libvirtd, name)
    started = time.monotonic()
    with pytest.raises(NoGuestAgent):
        hv.copy_disk_live(URI, name, "vda", pool, "copy", timeout=60, quiesce=True)
    assert time.monotonic() - started < 15
    assert pool_volumes(libvirtd, pool) == ["base.raw", "top.qcow2"]
    assert no_job(libvirtd, name) and disk_chain(libvirtd, name) == before
    assert hv.domain(URI, name).state == "running"


def test_the_agent_is_asked_before_anything_is_made(libvirtd, hv, pool, domains):
    # the name is taken: a copy that made its volume first would answer VolumeExists
    name = domain(libvirtd, hv, domains, pool, make_chain(libvirtd, pool))
    hv.upload_volume(URI, pool, "copy", 4, [b"mine"], timeout=60)
    with pytest.raises(NoGuestAgent):
        hv.copy_disk_live(URI, name, "vda", pool, "copy", timeout=60, quiesce=True)
    assert b"".join(hv.download_volume(URI, pool, "copy", 60)) == b"mine"


def test_a_domain_gone_mid_copy_leaves_no_volume(libvirtd, hv, pool, domains):
    top = make_chain(libvirtd, pool)
    write(top, "qcow2", [(0x55, 4 * MIB, 32 * MIB)])
    name = domain(libvirtd, hv, domains, pool, top)
    hv.disk_copy_bandwidth = MIB
    killer = threading.Timer(1.0, lambda: libvirtd.lookupByName(name).destroy())
    killer.start()
    try:
        with pytest.raises(HypervisorError) as failed:
            hv.copy_disk_live(URI, name, "vda", pool, "copy", timeout=60)
    finally:
        killer.join()
    assert not isinstance(failed.value, HypervisorTimeout)
    assert pool_volumes(libvirtd, pool) == ["base.raw", "top.qcow2"]


def test_a_copy_past_its_timeout_leaves_no_volume_and_no_job(libvirtd, hv, pool, domains):
    top = make_chain(libvirtd, pool)
    write(top, "qcow2", [(0x55, 4 * MIB, 32 * MIB)])  # at 1 MiB/s: not in sync for long
    name = domain(libvirtd, hv, domains, pool, top)
    before = disk_chain(libvirtd, name)
    hv.disk_copy_bandwidth = MIB
    with pytest.raises(HypervisorTimeout):
        hv.copy_disk_live(URI, name, "vda", pool, "copy", timeout=2.0)
    assert pool_volumes(libvirtd, pool) == ["base.raw", "top.qcow2"]
    assert no_job(libvirtd, name) and disk_chain(libvirtd, name) == before
    assert hv.domain(URI, name).state == "running"


def test_a_copy_onto_a_taken_name_leaves_that_volume_alone(libvirtd, hv, pool, domains):
    name = domain(libvirtd, hv, domains, pool, make_chain(libvirtd, pool))
    hv.upload_volume(URI, pool, "copy", 4, [b"mine"], timeout=60)
    with pytest.raises(VolumeExists):
        hv.copy_disk_live(URI, name, "vda", pool, "copy", timeout=60)
    assert b"".join(hv.download_volume(URI, pool, "copy", 60)) == b"mine"
    assert no_job(libvirtd, name)


@pytest.mark.parametrize("ready", [True, False], ids=["in-sync", "still-copying"])
def test_abort_disk_copy_ends_a_copy_left_behind(libvirtd, hv, pool, domains, ready):
    top = make_chain(libvirtd, pool)
    if not ready:
        write(top, "qcow2", [(0x55, 4 * MIB, 32 * MIB)])
    name = domain(libvirtd, hv, domains, pool, top)
    before = disk_chain(libvirtd, name)
    # a copy started as a process that died mid-way would have left it
    target = hv.create_volume(URI, pool, "left", SIZE, "qcow2")
    dest = ET.Element("disk", type="file")
    ET.SubElement(dest, "source", file=target)
    ET.SubElement(dest, "driver", type="qcow2")
    dom = libvirtd.lookupByName(name)
    dom.blockCopy("vda", ET.tostring(dest, encoding="unicode"),
                  {} if ready else {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: MIB},
                  COPY_FLAGS)  # fmt: skip
    if ready:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            mirror = ET.fromstring(dom.XMLDesc(0)).find("devices/disk/mirror")
            if mirror is not None and mirror.get("ready") == "yes":
                break
            time.sleep(0.1)
        else:
            pytest.fail("the copy started by hand was never in sync")
    assert dom.blockJobInfo("vda", 0)["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY

    assert hv.abort_disk_copy(URI, name, "vda") is True
    assert no_job(libvirtd, name) and disk_chain(libvirtd, name) == before
    assert hv.domain(URI, name).state == "running"
    assert hv.abort_disk_copy(URI, name, "vda") is False  # nothing left to end
    hv.destroy(URI, name)
    assert hv.abort_disk_copy(URI, name, "vda") is False  # not running
