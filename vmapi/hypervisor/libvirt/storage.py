"""Storage pools and their volumes: made, looked up, resized, deleted, streamed, and the
log files in them (the transfers are in :mod:`.streams`, the logs in :mod:`.logs`)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator

import libvirt

from vmapi.hypervisor.errors import NotSupported, VolumeHasClones, VolumeNotFound
from vmapi.hypervisor.libvirt import logs, streams
from vmapi.hypervisor.libvirt.calls import LibvirtCalls
from vmapi.hypervisor.libvirt.channel import Channel
from vmapi.hypervisor.libvirt.config import BackingStore, StoragePool, Volume
from vmapi.hypervisor.specs import LogTail

log = logging.getLogger(__name__)

#: What libvirt answers when a pool of that name (or on that path) is already defined.
_POOL_EXISTS = {libvirt.VIR_ERR_STORAGE_POOL_BUILT, libvirt.VIR_ERR_OPERATION_FAILED}


def _ensure_pool(
    conn: libvirt.virConnect, pool: str, path: str
) -> tuple[libvirt.virStoragePool, bool]:
    """The started pool ``pool``, defined as a dir pool at ``path`` if missing; whether it
    was created. Safe when concurrent requests (other workers, other API hosts) do the
    same: whoever loses the race to define or start it uses the one that won."""
    created = False
    try:
        found = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        try:
            found = conn.storagePoolDefineXML(StoragePool(pool, path).to_xml(), 0)
        except libvirt.libvirtError as define_error:
            if define_error.get_error_code() not in _POOL_EXISTS:
                raise
            found = conn.storagePoolLookupByName(pool)  # defined meanwhile by another
        else:
            # Drivers that let a racing request define the same pool again (the test
            # driver) may have it built and started by the other one meanwhile: building
            # an active pool is refused, and then there is nothing left to do.
            try:
                found.build(0)
            except libvirt.libvirtError:
                if not found.isActive():
                    raise
            found.setAutostart(1)
            created = True
    if not found.isActive():
        try:
            found.create(0)
        except libvirt.libvirtError:
            if not found.isActive():  # not merely started meanwhile by another
                raise
    return found, created


def pool_type(pool: libvirt.virStoragePool) -> str | None:
    return ET.fromstring(pool.XMLDesc(0)).get("type")  # noqa: S314 - from libvirt


def _delete(uri: str, pool: libvirt.virStoragePool, name: str) -> None:
    """Delete a volume. In an rbd pool with the snapshots libvirt made to clone it (an
    image without them is deleted the same way); while clones of it exist, librbd cannot
    unprotect those and libvirt says "No such file or directory": VolumeHasClones."""
    vol = pool.storageVolLookupByName(name)
    if pool_type(pool) != "rbd":
        vol.delete(0)
        return
    try:
        vol.delete(libvirt.VIR_STORAGE_VOL_DELETE_WITH_SNAPSHOTS)
    except libvirt.libvirtError as exc:
        if "failed to unprotect snapshot" not in (exc.get_error_message() or ""):
            raise
        raise VolumeHasClones(uri, f"{pool.name()}/{name} has clones: delete them first") from exc


#: How long a pool's directory is kept (LibvirtDriver.pool_dir): a bound on how long a
#: pool moved behind vmapi's back goes unnoticed by calls that do not fail.
POOL_DIR_SECONDS = 60.0
_POOL_DIR = "pool_dir"


def _forget_pool(channel: Channel, pool: str) -> None:
    for key in [k for k in list(channel.memo) if k[:2] == (_POOL_DIR, pool)]:
        channel.memo.pop(key, None)


class StorageCalls(LibvirtCalls):
    """Pools, volumes (their streams too) and log volumes."""

    #: how long :meth:`pool_dir` keeps an answer (a test may set it per driver)
    pool_dir_seconds: float = POOL_DIR_SECONDS

    # ------------------------------------------------------------------ pools
    def ensure_pool(self, uri: str, pool: str, path: str) -> bool:
        channel = self.connections.channel(uri, self.timeout)
        created = self._on_channel(channel, time.monotonic(),
                                   lambda conn: _ensure_pool(conn, pool, path)[1])  # fmt: skip
        if created:
            log.info("defined and started dir storage pool %s at %s on %s", pool, path, uri)
            _forget_pool(channel, pool)  # made anew: where it is is asked again
        return created

    def pool_dir(self, uri: str, pool: str, path: str) -> str:
        # Asked for every new VM (its console log's pool): the answer is kept with the
        # connection for POOL_DIR_SECONDS, and forgotten sooner when a call on the
        # connection fails, when the pool is made anew here, or when the connection goes.
        started = time.monotonic()
        channel = self.connections.channel(uri, self.timeout)
        key = (_POOL_DIR, pool, path)
        kept = channel.memo.get(key)
        if kept is not None and started - kept[1] < self.pool_dir_seconds:
            return kept[0]

        def directory(conn: libvirt.virConnect) -> str:
            found, created = _ensure_pool(conn, pool, path)
            if created:
                log.info("defined and started dir storage pool %s at %s on %s", pool, path, uri)
            target = ET.fromstring(found.XMLDesc(0)).findtext("target/path")  # noqa: S314
            if not target:
                raise NotSupported(uri, f"storage pool {pool} has no directory")
            return target

        target = self._on_channel(channel, started, directory)
        channel.memo[key] = (target, started)
        return target

    # ------------------------------------------------------------------ volumes
    def create_volume(self, uri: str, pool: str, name: str, size: int, fmt: str) -> str:
        xml = Volume(name, size, fmt).to_xml()
        return self._call(
            uri, lambda conn: conn.storagePoolLookupByName(pool).createXML(xml, 0).path()
        )

    def volume(self, uri: str, pool: str, name: str) -> tuple[str, int]:
        def look(conn: libvirt.virConnect) -> tuple[str, int]:
            vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
            return vol.path(), vol.info()[1]

        return self._call(uri, look)

    def volume_length(self, uri: str, pool: str, name: str) -> int:
        def look(conn: libvirt.virConnect) -> int:
            vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
            # the file's own length (a qcow2's is not its capacity)
            return vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2]

        return self._call(uri, look)

    def volumes(self, uri: str, pool: str) -> list[str]:
        def listing(conn: libvirt.virConnect) -> list[str]:
            found = conn.storagePoolLookupByName(pool)
            if not found.isActive():
                return []
            try:
                found.refresh(0)  # a dir pool learns of files made outside libvirt
            except libvirt.libvirtError as exc:
                # busy (a volume being made or wiped): list what the pool knows
                log.info("could not refresh pool %s on %s: %s", pool, uri, exc)
            return sorted(vol.name() for vol in found.listAllVolumes(0))

        return self._call(uri, listing)

    def resize_volume(self, uri: str, pool: str, name: str, size: int) -> None:
        self._call(
            uri,
            lambda conn: (
                conn.storagePoolLookupByName(pool).storageVolLookupByName(name).resize(size, 0)
            ),
        )

    def delete_volume(self, uri: str, pool: str, name: str) -> None:
        self._call(uri, lambda conn: _delete(uri, conn.storagePoolLookupByName(pool), name))

    def create_overlay(
        self, uri: str, pool: str, name: str, capacity: int, base: str, base_format: str
    ) -> str:
        def create(conn: libvirt.virConnect) -> str:
            found = conn.storagePoolLookupByName(pool)
            backing = BackingStore(found.storageVolLookupByName(base).path(), base_format)
            xml = Volume(name, capacity, "qcow2", backing=backing, compat="1.1").to_xml()
            return found.createXML(xml, 0).path()

        return self._call(uri, create)

    # ------------------------------------------------------------------ volume streams
    def upload_volume(
        self, uri: str, pool: str, name: str, size: int, chunks: Iterable[bytes], timeout: float
    ) -> str:
        def delete() -> None:
            with contextlib.suppress(VolumeNotFound):
                self._call(uri, lambda conn: streams.delete_volume(
                    conn.storagePoolLookupByName(pool), name))  # fmt: skip

        return streams.upload(uri, pool, name, size, chunks, timeout,
                              opener=self._open_private(uri), cleanup_wait=self.timeout,
                              delete=delete)  # fmt: skip

    def download_volume(
        self, uri: str, pool: str, name: str, timeout: float, offset: int = 0, length: int = 0
    ) -> Iterator[bytes]:
        return streams.VolumeReader(uri, pool, name, offset, length, timeout,
                                    self._open_private(uri))  # fmt: skip

    def volume_sha256(self, uri: str, pool: str, name: str, timeout: float) -> str:
        digest = hashlib.sha256()
        for chunk in self.download_volume(uri, pool, name, timeout):
            digest.update(chunk)
        return digest.hexdigest()

    # ------------------------------------------------------------------ logs
    def tail(self, uri: str, pool: str, volume: str, n: int) -> LogTail:
        # A few hundred KiB at most: an ordinary, bounded call on the shared connection.
        return self._call(uri, lambda conn: logs.tail(conn, uri, pool, volume, n))

    def delete_log(self, uri: str, pool: str, volume: str) -> None:
        self._call(uri, lambda conn: logs.delete_log(conn, pool, volume))
