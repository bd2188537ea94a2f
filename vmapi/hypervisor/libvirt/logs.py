"""Log files in a storage pool, read and removed through libvirt (the serial console log).

virtlogd writes a domain's ``<log file>`` and rotates it by size: ``name`` is the newest,
then ``name.0``, ``name.1``, ... up to its ``max_backups`` (defaults: 2 MiB, 3 backups,
so at most 8 MiB per domain). Because the file lives in a pool's directory, any libvirt
connection can read it as a volume. A pool learns about new files only when refreshed,
so a lookup that misses refreshes the pool once per call; a refresh refused while
another volume of the pool is being built is skipped (the answer is then what the pool
already knew). Volumes are named by path, so a rotation never makes a known one stale;
a rotation in the middle of one answer can make that answer miss or repeat a piece.
"""

from __future__ import annotations

import logging

import libvirt

from vmapi.hypervisor.errors import VolumeNotFound
from vmapi.hypervisor.libvirt.streams import abort_quietly, delete_volume
from vmapi.hypervisor.specs import CHUNK_SIZE, LogTail

log = logging.getLogger(__name__)

#: Rotated files looked at, at most (virtlogd's max_backups is 3 unless configured).
MAX_ROTATED = 32


class _Pool:
    """A pool, refreshed at most once, the first time a lookup misses."""

    def __init__(self, pool: libvirt.virStoragePool) -> None:
        self.pool = pool
        self.refreshed = False

    def lookup(self, name: str) -> libvirt.virStorageVol | None:
        for _attempt in range(2):
            try:
                return self.pool.storageVolLookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise
            if self.refreshed:
                return None
            self.refreshed = True
            try:
                self.pool.refresh(0)
            except libvirt.libvirtError:
                log.debug("refreshing pool %s failed", self.pool.name(), exc_info=True)
        return None


def read_range(conn: libvirt.virConnect, vol: libvirt.virStorageVol, offset: int,
               length: int) -> bytes:  # fmt: skip
    """``length`` bytes of ``vol`` from ``offset`` (fewer when the file is shorter)."""
    if length <= 0:  # libvirt reads 0 as "to the end"
        return b""
    stream = conn.newStream(0)
    vol.download(stream, offset, length, 0)
    parts = []
    try:
        while data := stream.recv(CHUNK_SIZE):
            parts.append(data)
        stream.finish()
    except BaseException:
        abort_quietly(stream)
        raise
    return b"".join(parts)


def _size(vol: libvirt.virStorageVol) -> int:
    # The file's own length: capacity is what a format header claims, and the guest writes
    # this file's header (a log can start with bytes that look like a qcow2).
    return vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2]  # in place of allocation


def tail(conn: libvirt.virConnect, uri: str, pool_name: str, volume: str, n: int) -> LogTail:
    """The last ``n`` bytes of log ``volume`` and of its rotated files, oldest first."""
    pool = _Pool(conn.storagePoolLookupByName(pool_name))
    vol = pool.lookup(volume)
    if vol is None:
        raise VolumeNotFound(uri, f"no log {volume} in pool {pool_name}")
    pieces: list[bytes] = []
    wanted = n
    for index in range(MAX_ROTATED + 1):
        size = _size(vol)
        take = min(wanted, size)
        piece = read_range(conn, vol, size - take, take)
        pieces.append(piece)
        wanted -= len(piece)
        if size > take:
            return LogTail(b"".join(reversed(pieces)), truncated=True)
        older = pool.lookup(f"{volume}.{index}")
        if older is None:
            break
        if wanted <= 0:
            return LogTail(b"".join(reversed(pieces)), truncated=_size(older) > 0)
        vol = older
    return LogTail(b"".join(reversed(pieces)), truncated=False)


def delete_log(conn: libvirt.virConnect, pool_name: str, volume: str) -> None:
    """Delete log ``volume`` and its rotated files; what does not exist is skipped."""
    pool = _Pool(conn.storagePoolLookupByName(pool_name))
    names = [volume, *(f"{volume}.{index}" for index in range(MAX_ROTATED))]
    for name in names:
        if pool.lookup(name) is None:
            if name != volume:
                return  # rotation numbers files without gaps
            continue
        delete_volume(pool.pool, name)
