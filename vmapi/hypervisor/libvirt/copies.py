"""Standalone copies of disks, made on the node: a volume cloned whole (its backing chain
flattened into one qcow2 file), and a running domain's disk copied live.

Why a live copy is a block copy ended without a pivot (as Nova's ``_live_snapshot``
does), not an external snapshot and a block commit:
- The domain's disk chain never changes. The mirror only reads the chain and writes the
  new volume; aborting it without a pivot leaves the guest on the files it had. A
  snapshot would put the guest on a new overlay, to be committed back and pivoted away
  from: steps that each can fail and leave the domain on a chain vmapi did not make.
- There is nothing to commit back, so a failure at any step (the copy, the freeze, the
  abort) leaves the domain exactly as it was: abort the job if there is one, delete the
  new volume.
- The copy is the disk at the moment of the abort (QEMU ends a mirror that is in sync
  with a last pass, and the target then holds that point in time): the guest does not
  pause, its writes to that disk wait only while the job ends (the abort's duration,
  logged: milliseconds on an idle disk); with ``quiesce`` its file systems are frozen
  only around that abort.
- The cost: the copy is written twice on the node's disks (the new volume here, then
  the image store's file when the caller downloads it), and a disk the guest writes
  hard is read more than once while the mirror catches up.

In an rbd pool a clone is RBD's own: libvirt snapshots and protects the source (or
reuses its snapshot if the source has not changed since) and makes a copy-on-write clone
of it, raw, in a fraction of a second: it shares its parent's data instead of copying it.

A clone is one long libvirt call (``virStorageVolCreateXMLFrom``: ``qemu-img convert``
inside libvirtd), so it runs on a connection and thread of its own (a channel opened for
it, closed when libvirt answers), like a stream or a migration: on the cached connection
libvirt's client was seen to hold another thread's short call back until the long one
returned. libvirt cannot stop a conversion it began: a clone past its timeout is deleted
by that thread when libvirt has finished making it. (On the test driver a file URI is a
new host to every connection: it clones nothing there.)
A live copy is a few short calls and a poll, each on the cached connection and bounded by
the driver's timeout, the whole bounded by the copy's own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import xml.etree.ElementTree as ET

import libvirt

from vmapi.hypervisor.errors import (
    HypervisorError,
    HypervisorTimeout,
    NoGuestAgent,
    NotSupported,
    OperationInvalid,
    VolumeExists,
    VolumeNotFound,
)
from vmapi.hypervisor.libvirt import streams
from vmapi.hypervisor.libvirt.calls import LibvirtCalls
from vmapi.hypervisor.libvirt.channel import Channel
from vmapi.hypervisor.libvirt.config import Volume
from vmapi.hypervisor.libvirt.connection import translate
from vmapi.hypervisor.libvirt.storage import pool_type

log = logging.getLogger(__name__)

#: The new volume of a copy: qcow2 v3 (libvirt's ``qemu-img`` would write 0.10 unless told).
COMPAT = "1.1"
#: A copy of a persistent domain's disk: into the volume made for it, its whole chain.
COPY_FLAGS = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
#: What libvirt answers when no guest agent can do what was asked: none answers (not
#: connected, not in sync), none configured, or it cannot freeze.
_NO_AGENT = {
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    libvirt.VIR_ERR_AGENT_UNSYNCED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
}


class _Expired(Exception):
    """The clone's helper learnt that the caller gave up."""


def _agent_error(uri: str, exc: libvirt.libvirtError) -> HypervisorError:
    code, message = exc.get_error_code(), exc.get_error_message() or str(exc)
    # An agent that answers but fails the command is an internal error that names it.
    if code in _NO_AGENT or (code == libvirt.VIR_ERR_INTERNAL_ERROR and "agent" in message):
        return NoGuestAgent(uri, message)
    return translate(uri, exc)


def _guest_agent(uri: str, dom: libvirt.virDomain) -> None:
    """Ask the guest agent something harmless (no freeze): ``NoGuestAgent`` unless it answers."""
    try:
        dom.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME, 0)
    except libvirt.libvirtError as exc:
        raise _agent_error(uri, exc) from exc


def _disk(uri: str, dom: libvirt.virDomain, target: str) -> ET.Element:
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - from libvirt, not from a guest
    for disk in root.iterfind("devices/disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            return disk
    raise NotSupported(uri, f"the running domain has no disk {target}")


def chain(disk: ET.Element) -> tuple[tuple[str | None, str | None], ...]:
    """A live disk's files, top first, with their formats (the source, then each
    ``<backingStore>``), as libvirt reports them."""
    found = []
    node: ET.Element | None = disk
    while node is not None:
        source = node.find("source")
        if source is None:
            break
        fmt = node.find("format")
        driver = node.find("driver")
        kind = fmt.get("type") if fmt is not None else None
        if kind is None and driver is not None:
            kind = driver.get("type")
        found.append((source.get("file") or source.get("dev") or source.get("name"), kind))
        node = node.find("backingStore")
    return tuple(found)


def _before_copy(uri: str, dom: libvirt.virDomain, target: str) -> tuple[tuple, int]:
    """The disk's chain and capacity; refuses a domain that is not running and a disk
    that has a block job already."""
    if not dom.isActive():
        raise OperationInvalid(uri, f"{dom.name()} is not running")
    disk = _disk(uri, dom, target)
    if dom.blockJobInfo(target, 0):
        raise OperationInvalid(uri, f"{dom.name()} has a block job on {target} already")
    return chain(disk), dom.blockInfo(target, 0)[0]


def _mirror(uri: str, dom: libvirt.virDomain, target: str, path: str) -> str | None:
    """Where the copy into ``path`` is: ``ready`` (in sync, as libvirt says once QEMU
    reported it), ``copying``, or None when there is no such job."""
    info = dom.blockJobInfo(target, 0)
    if not info or info.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
        return None
    mirror = _disk(uri, dom, target).find("mirror")
    if mirror is None or mirror.get("file") != path:
        return None
    if info["cur"] == info["end"] and mirror.get("ready") == "yes":
        return "ready"
    return "copying"


class _Clone:
    """One clone, called on the thread of a channel of its own, which it closes when
    libvirt is done; the volume is deleted then if the caller has given up."""

    def __init__(self, channel: Channel, pool: str, name: str, source_pool: str,
                 source: str) -> None:  # fmt: skip
        self.channel, self.uri, self.pool, self.name = channel, channel.uri, pool, name
        self.source_pool, self.source = source_pool, source
        self.lock = threading.Lock()
        self.cancelled = False
        self.path: str | None = None
        self.finished = threading.Event()

    def __call__(self, conn: libvirt.virConnect) -> str:
        try:
            return self._clone(conn)
        finally:
            self.finished.set()
            self.channel.close(wait=False)

    def _clone(self, conn: libvirt.virConnect) -> str:
        pool = conn.storagePoolLookupByName(self.pool)
        origin = conn.storagePoolLookupByName(self.source_pool).storageVolLookupByName(self.source)
        try:
            pool.storageVolLookupByName(self.name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise
        else:
            raise VolumeExists(self.uri, f"{self.pool} has a volume {self.name} already")
        # The source's capacity: a larger one would be ignored (qemu-img convert keeps the
        # source's virtual size; an RBD clone is its parent's size), a smaller one is
        # raised to it.
        if pool_type(pool) == "rbd":
            # libvirt clones inside an rbd pool only (from another pool it looks for the
            # source's name in the Ceph pool), and makes a copy-on-write RBD clone: raw
            if self.source_pool != self.pool:
                raise NotSupported(
                    self.uri,
                    f"an rbd pool ({self.pool}) clones only its own "
                    f"volumes, not {self.source_pool}/{self.source}",
                )
            xml = Volume(self.name, origin.info()[1], "raw").to_xml()
        else:
            xml = Volume(self.name, origin.info()[1], "qcow2", compat=COMPAT).to_xml()
        with self.lock:
            if self.cancelled:
                raise _Expired
        try:
            made = pool.createXMLFrom(xml, origin, 0)  # (a failed one deletes what it made)
        except libvirt.libvirtError as exc:
            # made meanwhile by another: libvirt answers an internal error for it
            if "already in use" in (exc.get_error_message() or ""):
                raise VolumeExists(self.uri, exc.get_error_message()) from exc
            raise
        path = made.path()
        with self.lock:
            if self.cancelled:
                log.info("deleting %s/%s, cloned after its timeout", self.pool, self.name)
                streams.delete_volume(pool, self.name)
                raise _Expired
            self.path = path
        return path


class CopyCalls(LibvirtCalls):
    """Clone a volume, copy a running domain's disk, end a copy left behind."""

    #: bytes per second a live copy may read and write (0: as fast as the node can); a
    #: test may set it per driver
    disk_copy_bandwidth: int = 0
    #: seconds between two looks at a live copy's job
    disk_copy_poll: float = 0.02

    def clone_volume(
        self, uri: str, pool: str, name: str, source_pool: str, source: str, timeout: float
    ) -> str:
        started = time.monotonic()
        # A connection of its own: a long call on the cached one can hold up the others'
        # (libvirt's client was seen to leave a call unsent until the long one returned).
        private = Channel.open(uri, self.connections.opener(uri), self.timeout)
        clone = _Clone(private, pool, name, source_pool, source)
        try:
            return private.call(max(timeout - (time.monotonic() - started), 0.1), clone)
        except HypervisorTimeout:
            with clone.lock:  # done in time, or never: decided once, with the call
                if clone.path is not None:
                    return clone.path
                clone.cancelled = True
            if not clone.finished.wait(self.timeout):
                log.warning("clone %s/%s on %s goes on past its timeout; it is deleted when "
                            "libvirt has made it", pool, name, uri)  # fmt: skip
            raise HypervisorTimeout(uri, timeout) from None
        except libvirt.libvirtError as exc:
            error = translate(uri, exc)
            raise (HypervisorTimeout(uri, timeout) if isinstance(error, HypervisorTimeout)
                   else error) from exc  # fmt: skip
        except BaseException:  # the caller is going away: the clone must not stay
            with clone.lock:
                clone.cancelled = True
            raise

    def copy_disk_live(
        self,
        uri: str,
        name: str,
        target: str,
        pool: str,
        volume: str,
        timeout: float,
        quiesce: bool = False,
    ) -> str:
        started = time.monotonic()
        deadline = started + timeout
        before, capacity = self._on_domain(uri, name, lambda dom: _before_copy(uri, dom, target))
        if quiesce:
            try:
                self._on_domain(uri, name, lambda dom: _guest_agent(uri, dom))
            except HypervisorTimeout as exc:
                raise NoGuestAgent(uri, f"the guest agent did not answer: {exc}") from exc
        xml = Volume(volume, capacity, "qcow2", compat=COMPAT).to_xml()
        path = self._call(uri, lambda conn: conn.storagePoolLookupByName(pool).createXML(
            xml, 0).path())  # fmt: skip
        copying = False
        try:
            dest = ET.Element("disk", type="file")
            ET.SubElement(dest, "source", file=path)
            ET.SubElement(dest, "driver", type="qcow2")
            dest_xml = ET.tostring(dest, encoding="unicode")
            params = {}
            if self.disk_copy_bandwidth:
                params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = self.disk_copy_bandwidth
            copying = True  # (from here on a job may exist, whatever the call answers)
            self._on_domain(uri, name, lambda dom: dom.blockCopy(target, dest_xml, params,
                                                                 COPY_FLAGS))  # fmt: skip
            self._wait_ready(uri, name, target, path, deadline, timeout)
            frozen = aborted = None
            if quiesce:
                self._on_domain(uri, name, lambda dom: _freeze(uri, dom))
                frozen = time.monotonic()
            try:
                # No pivot: QEMU ends the mirror with a last pass, the volume keeps this
                # moment, and the domain stays on its own chain.
                aborting = time.monotonic()
                self._on_domain(uri, name, lambda dom: dom.blockJobAbort(target, 0))
                aborted = time.monotonic()
            finally:
                if frozen is not None:
                    self._thaw(uri, name)
            after = self._on_domain(uri, name, lambda dom: (
                chain(_disk(uri, dom, target)), dom.blockJobInfo(target, 0)))  # fmt: skip
            if after != (before, {}):
                raise HypervisorError(uri, f"the disk {target} of {name} is not as it was "
                                           f"after its copy: {after} (was {before})")  # fmt: skip
        except BaseException:
            self._undo_copy(uri, name, target, pool, volume, path, copying)
            raise
        thawed = time.monotonic()
        log.info(
            "copied %s of %s on %s into %s/%s in %.1f s; the copy ended in %.3f s%s",
            target, name, uri, pool, volume, thawed - started, aborted - aborting,
            "" if frozen is None else f", file systems frozen {thawed - frozen:.3f} s",
            extra={"abort_seconds": aborted - aborting,
                   "frozen_seconds": None if frozen is None else thawed - frozen},
        )  # fmt: skip
        return path

    def freeze_filesystems(self, uri: str, name: str) -> None:
        try:
            self._on_domain(uri, name, lambda dom: _guest_agent(uri, dom))
        except HypervisorTimeout as exc:
            raise NoGuestAgent(uri, f"the guest agent did not answer: {exc}") from exc
        self._on_domain(uri, name, lambda dom: _freeze(uri, dom))

    def thaw_filesystems(self, uri: str, name: str) -> None:
        self._thaw(uri, name)

    def abort_disk_copy(self, uri: str, name: str, target: str) -> bool:
        def abort(dom: libvirt.virDomain) -> bool:
            if not dom.isActive():
                return False
            info = dom.blockJobInfo(target, 0)
            if not info or info.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
                return False
            dom.blockJobAbort(target, 0)  # never a pivot: the domain keeps its chain
            return True

        return self._on_domain(uri, name, abort)

    # ------------------------------------------------------------------ helpers
    def _wait_ready(self, uri: str, name: str, target: str, path: str, deadline: float,
                    timeout: float) -> None:  # fmt: skip
        while True:
            state = self._on_domain(uri, name, lambda dom: _mirror(uri, dom, target, path))
            if state == "ready":
                return
            if state is None:
                raise HypervisorError(uri, f"the copy of {target} of {name} ended before "
                                           "it was in sync")  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HypervisorTimeout(uri, timeout)
            time.sleep(min(self.disk_copy_poll, remaining))

    def _thaw(self, uri: str, name: str) -> None:
        """Thaw the guest's file systems, trying once more if the first call failed (a
        guest left frozen is stuck until someone thaws it)."""
        for attempt in range(2):
            try:
                self._on_domain(uri, name, lambda dom: dom.fsThaw())
                return
            except HypervisorError:
                log.error("could not thaw the file systems of %s on %s", name, uri,
                          exc_info=True)  # fmt: skip
                if attempt:
                    raise

    def _undo_copy(self, uri: str, name: str, target: str, pool: str, volume: str, path: str,
                   copying: bool) -> None:  # fmt: skip
        """After a failed copy: its job aborted (if it is still ours), the volume deleted
        (unless, against every flag, the domain uses it now). What cannot be done is
        logged: the copy's own error is the answer."""
        if copying:
            try:
                self._on_domain(uri, name, lambda dom: _abort_own(uri, dom, target, path))
            except HypervisorError:
                log.warning("could not abort the copy of %s of %s on %s", target, name, uri,
                            exc_info=True)  # fmt: skip
        try:
            uses = self._on_domain(uri, name, lambda dom: any(
                file == path for file, _format in chain(_disk(uri, dom, target))))  # fmt: skip
        except HypervisorError:  # gone, or unreachable (then the delete fails too)
            uses = False
        if uses:
            log.error("%s of %s on %s is now %s: the volume stays", target, name, uri, path)
            return
        try:
            with contextlib.suppress(VolumeNotFound):
                self._call(uri, lambda conn: streams.delete_volume(
                    conn.storagePoolLookupByName(pool), volume))  # fmt: skip
        except HypervisorError:
            log.warning("could not delete %s/%s on %s after a failed copy", pool, volume, uri,
                        exc_info=True)  # fmt: skip


def _freeze(uri: str, dom: libvirt.virDomain) -> None:
    try:
        dom.fsFreeze()
    except libvirt.libvirtError as exc:
        raise _agent_error(uri, exc) from exc


def _abort_own(uri: str, dom: libvirt.virDomain, target: str, path: str) -> None:
    """Abort the copy into ``path`` (without a pivot), if it is still there."""
    if dom.isActive() and _mirror(uri, dom, target, path) is not None:
        dom.blockJobAbort(target, 0)
