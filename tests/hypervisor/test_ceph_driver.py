"""Ceph RBD through vmapi's libvirt driver, on the real libvirtd and the session's one-node
cluster (``ceph``, tests/hypervisor/ceph_cluster.py; the facts: ../shared/recipes/ceph-rbd.md).

The cephx user's secret and the rbd pool are made once and never again; a pool whose
monitor does not answer fails within seconds and leaves nothing defined; raw volumes are
made, grown and deleted in the pool; a clone shares its parent (RBD layering, nothing
copied) and keeps it until the clone is gone; the test guest, written into an RBD image,
boots from a grown clone through a domain vmapi designed (a network disk), and a data
disk on RBD is attached to it and detached live. Everything named ``vmapi-cephtest-*`` on
the host is removed after the module, the images in the cluster with it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.conftest import GIB, MIB
from tests.guest import console
from tests.hypervisor.streamtest import POOL_ROOT, URI
from vmapi.hypervisor import (
    CephSource,
    DiskSpec,
    DomainSpec,
    HypervisorError,
    HypervisorUnavailable,
    NameTaken,
    NotSupported,
    VolumeHasClones,
    VolumeNotFound,
)
from vmapi.hypervisor.libvirt import LibvirtDriver
from vmapi.hypervisor.libvirt.ceph import pool_source, wanted_source

pytestmark = [pytest.mark.hypervisor]

PREFIX = "vmapi-cephtest-"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def rbd_host(ceph):
    """A connection to the real libvirtd, which must have its rbd storage backend; what
    a killed earlier run of this module left is removed first, and what this one made
    after it."""
    conn = libvirt.open(URI)
    caps = ET.fromstring(conn.getStoragePoolCapabilities(0))
    rbd = caps.find("pool[@type='rbd']")
    if rbd is None or rbd.get("supported") != "yes":
        conn.close()
        pytest.fail(f"libvirtd on {URI} has no rbd storage backend loaded (installed after it "
                    "started? scripts/ensure-libvirtd.sh restarts an idle one)")  # fmt: skip
    remove_ours(conn)
    yield conn
    remove_ours(conn)
    conn.close()


def remove_ours(conn: libvirt.virConnect) -> None:
    """This module's domains, pools and secrets (by the secret's usage: libvirt allows one
    secret per usage, and only these tests use client.libvirt here)."""
    for dom in conn.listAllDomains():
        if dom.name().startswith(PREFIX):
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    for pool in conn.listAllStoragePools():
        if pool.name().startswith(PREFIX):
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    for secret in conn.listAllSecrets():
        ceph = secret.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_CEPH
        if ceph and secret.usageID() == "client.libvirt":
            secret.undefine()


@pytest.fixture(scope="module")
def driver():
    found = LibvirtDriver(timeout=30.0)
    yield found
    found.connections.clear()


@pytest.fixture(scope="module")
def source(ceph) -> CephSource:
    return CephSource(monitors=ceph.monitors, pool=ceph.pool, user=ceph.user,
                      secret_uuid=str(uuid.uuid4()))  # fmt: skip


@pytest.fixture(scope="module")
def rbd_pool(rbd_host, driver, ceph, source):
    """The module's started rbd pool over the cluster's pool ``rbd`` (its name), and what
    the first calls answered (the secret, the pool: both made). Its images go with it.
    The one secret of the module: libvirt allows one per usage (client.libvirt)."""
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    made = (driver.ensure_ceph_secret(URI, source, ceph.key),
            driver.ensure_rbd_pool(URI, name, source))  # fmt: skip
    yield name, made
    purge(driver, ceph, name)


def purge(driver, ceph, pool):
    """Every image in the cluster's pool: clones first, then their parents."""
    images = ceph.rbd_images()
    clones = [i for i in images if "parent" in ceph.rbd_info(i)]
    for image in [*clones, *(i for i in images if i not in clones)]:
        driver.delete_volume(URI, pool, image)


@pytest.fixture
def dir_pool(rbd_host, driver):
    """A dir pool of the test's own (a console log, a file volume): its name."""
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    driver.ensure_pool(URI, name, str(POOL_ROOT / name))
    yield name
    pool = rbd_host.storagePoolLookupByName(name)
    pool.refresh(0)
    for vol in pool.listAllVolumes():
        vol.delete(0)
    pool.destroy()
    pool.delete(0)
    pool.undefine()


def test_secret_and_pool_are_made_once(rbd_host, driver, ceph, source, rbd_pool):
    name, made = rbd_pool
    assert made == (True, True)
    assert driver.ensure_ceph_secret(URI, source, ceph.key) is False
    assert driver.ensure_rbd_pool(URI, name, source) is False
    secret = rbd_host.secretLookupByUUIDString(source.secret_uuid)
    assert (secret.usageType(), secret.usageID()) == (libvirt.VIR_SECRET_USAGE_TYPE_CEPH,
                                                      "client.libvirt")  # fmt: skip
    assert ceph.key not in secret.XMLDesc(0)
    with pytest.raises(libvirt.libvirtError, match="private"):
        secret.value()
    pool = rbd_host.storagePoolLookupByName(name)
    assert pool.isActive() and pool.autostart()
    root = ET.fromstring(pool.XMLDesc(0))
    assert root.find("refresh/volume").get("allocation") == "default"
    assert int(root.findtext("capacity")) > 0  # the cluster's, as librados reports it
    # another key is set (and the right one again)
    other = "AQBDLxRpAAAAABAA5tE7d3Ez0l7u0m4tVwzX7w=="
    assert driver.ensure_ceph_secret(URI, source, other) is True
    assert driver.ensure_ceph_secret(URI, source, ceph.key) is True
    assert driver.ensure_ceph_secret(URI, source, ceph.key) is False
    # a second pool over the same source: made once
    second = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        assert driver.ensure_rbd_pool(URI, second, source) is True
        stopped = rbd_host.storagePoolLookupByName(second)
        stopped.destroy()  # stopped: started again, not made again
        assert driver.ensure_rbd_pool(URI, second, source) is False
        assert stopped.isActive()
        # the same name over another Ceph pool: refused, the pool left as it is
        with pytest.raises(NameTaken, match="another source"):
            driver.ensure_rbd_pool(URI, second, CephSource(ceph.monitors, "other", ceph.user,
                                                           source.secret_uuid))  # fmt: skip
        assert stopped.isActive()
        assert pool_source(stopped.XMLDesc(0)) == wanted_source(source)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            found = rbd_host.storagePoolLookupByName(second)
            found.destroy()
            found.undefine()


def test_a_pool_whose_monitor_does_not_answer_fails_and_is_not_left(
    rbd_host, driver, ceph, source, rbd_pool
):
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    unknown = CephSource(ceph.monitors, ceph.pool, ceph.user, str(uuid.uuid4()))
    with pytest.raises(HypervisorError, match="no secret"):  # the secret comes first
        driver.ensure_rbd_pool(URI, name, unknown)
    wrong = CephSource((("127.0.0.1", _free_port()),), ceph.pool, ceph.user, source.secret_uuid)
    started = time.monotonic()
    with pytest.raises(HypervisorError) as caught:
        driver.ensure_rbd_pool(URI, name, wrong)
    seconds = time.monotonic() - started
    # the cluster's fault, not the host's: the connection to libvirtd is kept
    assert not isinstance(caught.value, HypervisorUnavailable)
    assert f"cannot reach Ceph pool rbd at 127.0.0.1:{wrong.monitors[0][1]}" in str(caught.value)
    assert seconds < 15, seconds  # librados's mount timeout, bounded by the pool
    assert name not in [p.name() for p in rbd_host.listAllStoragePools()]
    assert ceph.key not in str(caught.value)


def test_raw_volumes_are_made_grown_and_deleted(rbd_host, driver, ceph, rbd_pool):
    rbd_pool, _ = rbd_pool
    path = driver.create_volume(URI, rbd_pool, "vol-a", 64 * MIB, "raw")
    assert path == f"{ceph.pool}/vol-a"
    assert driver.volume(URI, rbd_pool, "vol-a") == (path, 64 * MIB)
    assert ceph.rbd_info("vol-a")["size"] == 64 * MIB
    driver.resize_volume(URI, rbd_pool, "vol-a", 128 * MIB)
    assert driver.volume(URI, rbd_pool, "vol-a")[1] == 128 * MIB
    assert ceph.rbd_info("vol-a")["size"] == 128 * MIB
    assert "vol-a" in driver.volumes(URI, rbd_pool)
    driver.delete_volume(URI, rbd_pool, "vol-a")
    assert "vol-a" not in ceph.rbd_images()
    with pytest.raises(VolumeNotFound):
        driver.volume(URI, rbd_pool, "vol-a")


def test_a_clone_shares_its_parent_and_keeps_it(rbd_host, driver, ceph, rbd_pool, dir_pool):
    rbd_pool, _ = rbd_pool
    driver.create_volume(URI, rbd_pool, "parent", 64 * MIB, "raw")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M",
                    ceph.qemu_target("parent")], check=True, capture_output=True)  # fmt: skip
    started = time.monotonic()
    path = driver.clone_volume(URI, rbd_pool, "child", rbd_pool, "parent", timeout=60)
    seconds = time.monotonic() - started
    assert path == f"{ceph.pool}/child"
    info = ceph.rbd_info("child")
    assert info["parent"]["image"] == "parent" and info["parent"]["pool"] == ceph.pool
    assert info["size"] == 64 * MIB
    pool = rbd_host.storagePoolLookupByName(rbd_pool)
    pool.refresh(0)
    assert pool.storageVolLookupByName("child").info()[2] == 0  # nothing of its own yet
    assert pool.storageVolLookupByName("parent").info()[2] >= 4 * MIB
    print(f"clone: {seconds:.2f} s")
    # the parent stays while a clone needs it
    with pytest.raises(VolumeHasClones, match="has clones"):
        driver.delete_volume(URI, rbd_pool, "parent")
    assert "parent" in ceph.rbd_images()
    # an rbd pool clones only its own volumes
    driver.create_volume(URI, dir_pool, "local.raw", MIB, "raw")
    with pytest.raises(NotSupported, match="clones only its own"):
        driver.clone_volume(URI, rbd_pool, "from-dir", dir_pool, "local.raw", timeout=60)
    assert "from-dir" not in ceph.rbd_images()
    driver.delete_volume(URI, rbd_pool, "child")
    driver.delete_volume(URI, rbd_pool, "parent")  # its clone gone: it goes, snapshot and all
    assert {"parent", "child"}.isdisjoint(ceph.rbd_images())


def test_a_guest_boots_from_a_grown_clone_and_takes_a_disk_live(
    rbd_host, driver, ceph, source, rbd_pool, dir_pool, guest_image
):
    rbd_pool, _ = rbd_pool
    image = Path(guest_image.path)
    size = -(-image.stat().st_size // MIB) * MIB
    driver.create_volume(URI, rbd_pool, "guest", size, "raw")
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image),
                    ceph.qemu_target("guest")], check=True, capture_output=True)  # fmt: skip
    started = time.monotonic()
    driver.clone_volume(URI, rbd_pool, "root", rbd_pool, "guest", timeout=60)
    driver.resize_volume(URI, rbd_pool, "root", GIB)
    cloned = time.monotonic() - started
    name = f"{PREFIX}guest-{uuid.uuid4().hex[:6]}"
    log = str(POOL_ROOT / dir_pool / "console.log")
    spec = DomainSpec(name=name, uuid=str(uuid.uuid4()), domain_type="qemu", vcpus=1,
                      max_vcpus=1, memory=256 * MIB, max_memory=256 * MIB, vm_id=0,
                      installation="vmapi-cephtest", console_log=log,
                      disks=(DiskSpec(path="root", format="raw", target="vda",
                                      cache="writeback", rbd=source),))  # fmt: skip
    try:
        driver.define(URI, spec)
        started = time.monotonic()
        driver.start(URI, name)

        def read() -> str:
            with contextlib.suppress(VolumeNotFound):
                return driver.tail(URI, dir_pool, "console.log", 1 << 20).data.decode(
                    errors="replace")  # fmt: skip
            return ""

        console.wait_for(read, lambda t: bool(console.boots(t)), "the guest's VMAPI-GUEST line")
        booted = time.monotonic() - started
        [boot] = console.boots(read())
        assert (boot.root, boot.sectors) == ("vda", GIB // 512)  # the grown clone
        print(f"clone and grow: {cloned:.2f} s, boot to VMAPI-GUEST: {booted:.2f} s")
        disk = ET.fromstring(rbd_host.lookupByName(name).XMLDesc(0)).find("devices/disk")
        assert disk.get("type") == "network"
        assert disk.find("source").get("name") == f"{ceph.pool}/root"
        assert "parent" in ceph.rbd_info("root")  # the guest runs on the clone

        # a data disk on RBD, attached and detached while the guest runs
        driver.create_volume(URI, rbd_pool, "data", 32 * MIB, "raw")
        data = DiskSpec(path="data", format="raw", target="vdb", rbd=source,
                        iotune={"write_iops_sec": 100})  # fmt: skip
        driver.attach_disk_live(URI, name, data)
        live = ET.fromstring(rbd_host.lookupByName(name).XMLDesc(0))
        [vdb] = [d for d in live.iterfind("devices/disk") if d.find("target").get("dev") == "vdb"]
        assert vdb.get("type") == "network"
        assert vdb.find("source").get("name") == f"{ceph.pool}/data"
        assert vdb.find("iotune/write_iops_sec").text == "100"
        assert driver.detach_disk_live(URI, name, data, wait=30.0) is True
        live = ET.fromstring(rbd_host.lookupByName(name).XMLDesc(0))
        assert [t.get("dev") for t in live.iterfind("devices/disk/target")] == ["vda"]
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom = rbd_host.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
