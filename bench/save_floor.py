"""The floor of ``make bench BENCH=save`` (bench/save.py): saving a running domain's disk
with the libvirt calls one would make by hand, and what vmapi's image store does on top
of them, measured apart.

By hand (as ``virsh vol-create``, ``virsh blockcopy --reuse-external --transient-job``,
``virsh blockjob --abort``, ``virsh vol-download`` and ``virsh vol-delete`` would): a
qcow2 v3 volume of the disk's capacity in the pool, ``virDomainBlockCopy`` of the whole
chain into it, polled every 10 ms until it is in sync, ``virDomainBlockJobAbort``
without a pivot (the copy keeps that moment, the domain its own chain), the volume read
through a libvirt stream on a connection of its own into a file (no hash, no sync), the
volume deleted.

The store's work: what vmapi does with the bytes besides receiving them (sha256,
fdatasync, ``qemu-img info``), done on the floor's file once it is whole, after the
floor's time was taken.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bench.common import INSTALLATION, MIB

TARGET = "vda"
FLOOR_VOLUME = f"{INSTALLATION}-floor-save"
READY_POLL = 0.01
CHUNK = 256 * 1024  # as vmapi's streams read


def volume_xml(name: str, capacity: int) -> str:
    """A qcow2 v3 volume, as vmapi makes its copy."""
    el = ET.Element("volume")
    ET.SubElement(el, "name").text = name
    ET.SubElement(el, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(el, "target")
    ET.SubElement(target, "format", type="qcow2")
    ET.SubElement(target, "compat").text = "1.1"
    return ET.tostring(el, encoding="unicode")


def mirror_ready(dom: Any, path: str) -> bool:
    """The block copy into ``path`` is in sync (as ``virsh blockjob --info`` and the live
    XML's ``<mirror ready='yes'>`` tell)."""
    info = dom.blockJobInfo(TARGET, 0)
    if not info:
        raise RuntimeError("the block copy ended before it was in sync")
    if info["cur"] != info["end"]:
        return False
    for disk in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk"):
        target, mirror = disk.find("target"), disk.find("mirror")
        if target is not None and target.get("dev") == TARGET and mirror is not None:
            return mirror.get("file") == path and mirror.get("ready") == "yes"
    return False


def floor_save(uri: str, conn: Any, dom: Any, pool_name: str, dest: Path) -> dict[str, float]:
    """The floor's calls; seconds of each step."""
    import libvirt

    flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    began = time.monotonic()
    pool = conn.storagePoolLookupByName(pool_name)
    vol = pool.createXML(volume_xml(FLOOR_VOLUME, dom.blockInfo(TARGET, 0)[0]), 0)
    try:
        disk = ET.Element("disk", type="file")
        ET.SubElement(disk, "source", file=vol.path())
        ET.SubElement(disk, "driver", type="qcow2")
        dom.blockCopy(TARGET, ET.tostring(disk, encoding="unicode"), {}, flags)
        while not mirror_ready(dom, vol.path()):
            time.sleep(READY_POLL)
        ready = time.monotonic()
        dom.blockJobAbort(TARGET, 0)
        aborted = time.monotonic()
        download(uri, pool_name, FLOOR_VOLUME, dest)
        downloaded = time.monotonic()
    except BaseException:
        if dom.blockJobInfo(TARGET, 0):
            dom.blockJobAbort(TARGET, 0)
        vol.delete(0)
        raise
    vol.delete(0)
    return {"copy": ready - began, "abort": aborted - ready, "download": downloaded - aborted,
            "delete": time.monotonic() - downloaded}  # fmt: skip


def download(uri: str, pool: str, name: str, dest: Path) -> None:
    """``virsh vol-download``: a connection of its own, a stream, the bytes into a file."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
        stream = conn.newStream(0)
        vol.download(stream, 0, 0, 0)
        with dest.open("wb") as out:
            while data := stream.recv(CHUNK):
                out.write(data)
        stream.finish()
    finally:
        conn.close()


def store_work(path: Path) -> dict[str, float]:
    """Seconds of the image store's own work on a whole file: its sha256 (read from the
    page cache), its fdatasync, ``qemu-img info``."""
    began = time.monotonic()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MIB):
            digest.update(chunk)
    hashed = time.monotonic()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    synced = time.monotonic()
    subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return {"sha256": hashed - began, "fdatasync": synced - hashed,
            "qemu_img": time.monotonic() - synced}  # fmt: skip
