"""Moving a domain between hosts: flags, parameters, the target's XML, and the watch.

The driver's ``migrate`` (:class:`MigrationCalls`, at the end) runs
``virDomainMigrateToURI3`` peer-to-peer: the source's libvirtd talks to the target's
itself, and QEMU's stream goes straight to the target's migration address. The call is
long and has no timeout of its own, so it runs in a thread on a connection of its own
(never the shared cached one) while the caller watches the clock; past the deadline the
job is aborted through libvirt (``virDomainAbortJob``), as Nova's
``virt/libvirt/migration.py`` does, and the guest goes on running on the source.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import libvirt

from vmapi.hypervisor.errors import (
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    NotSupported,
    OperationInvalid,
)
from vmapi.hypervisor.libvirt.calls import LibvirtCalls
from vmapi.hypervisor.libvirt.channel import Channel
from vmapi.hypervisor.libvirt.config import Graphics
from vmapi.hypervisor.libvirt.connection import translate
from vmapi.hypervisor.specs import DisplaySpec, MigrationStats

log = logging.getLogger(__name__)
T = TypeVar("T")

LIVE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)
# A shut-off domain: only its definition moves (libvirt defines it on the target, checks
# the name and UUID there, and undefines it here), in one call.
OFFLINE_FLAGS = (
    libvirt.VIR_MIGRATE_OFFLINE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)
#: what the XML of a domain in migration is read with (no host-specific details)
MIGRATABLE = libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE
MS = 1000.0


def flags(
    live: bool, copy_storage: bool, unchecked_storage: bool, incremental: bool = False
) -> int:
    if not live:
        return OFFLINE_FLAGS
    # incremental: only each disk's top layer is copied, into an overlay the target made
    # on its own copy of the same base (a disk without a backing file is copied whole)
    copy = (
        libvirt.VIR_MIGRATE_NON_SHARED_INC if incremental else libvirt.VIR_MIGRATE_NON_SHARED_DISK
    )
    found = LIVE_FLAGS | (copy if copy_storage else 0)
    # libvirt refuses to leave a disk behind on a filesystem it does not know as shared
    # (NFS, GlusterFS, ...); the caller may vouch for storage both hosts see anyway.
    return found | (libvirt.VIR_MIGRATE_UNSAFE if unchecked_storage else 0)


def stream_uri(address: str) -> str:
    """QEMU's migration URI for an address (``tcp://`` URIs pass through as they are)."""
    if "://" in address:
        return address
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"tcp://[{address}]"
    except ValueError:
        pass  # a host name
    return f"tcp://{address}"


def listen_address(address: str) -> str:
    """The address the target's QEMU (and its disk server) listens on: the stream's host,
    so nothing listens on every interface of the target."""
    host = address.split("://", 1)[-1].rsplit("@", 1)[-1]
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.split(":", 1)[0] if host.count(":") == 1 else host


def retarget(
    xml: str,
    paths: dict[str, str],
    display: DisplaySpec | None = None,
    console_log: str | None = None,
) -> str:
    """The domain's XML as the target is to have it: each disk whose file is a key of
    ``paths`` pointing at its value instead (where the volume is on the target), the
    VNC display replaced by ``display`` (the target's listen address: the source's may
    not exist there; a fresh sealed password: the source's may have been handed out),
    and the serial console logged to ``console_log`` (a file of the target's)."""
    root = ET.fromstring(xml)  # noqa: S314 - from libvirt, not from a guest
    if console_log is not None:
        for log_element in [*root.iterfind("devices/serial/log"),
                            *root.iterfind("devices/console/log")]:  # fmt: skip
            log_element.set("file", console_log)
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        if source is None or source.get("file") not in paths:
            continue
        source.set("file", paths[source.get("file")])
        # The chain libvirt read on the source names the source's files; the target
        # reads its file's own.
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
    devices = root.find("devices")
    if display is not None and devices is not None:
        new = Graphics(display.listen, display.password, display.password_valid_to).element()
        for index, old in enumerate(list(devices)):
            if old.tag == "graphics" and old.get("type") == "vnc":
                devices.remove(old)
                devices.insert(index, new)
    return ET.tostring(root, encoding="unicode")


def copied_targets(xml: str, paths: dict[str, str] | None) -> list[str]:
    """Device names of the writable disks whose files are keys of ``paths`` (None: of
    every writable file or block disk): the ones a non-shared-disk migration copies. The
    others stay on storage both hosts share: a network disk (RBD) always; a read-only
    disk, such as a seed, is not copied either: the target has its own."""
    root = ET.fromstring(xml)  # noqa: S314 - from libvirt, not from a guest
    found = []
    for disk in root.iterfind("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if disk.find("readonly") is not None or source is None or target is None:
            continue
        local = source.get("file") or source.get("dev")
        if disk.get("type") != "network" and local and (paths is None or local in paths):
            found.append(target.get("dev"))
    return found


def params(
    live: bool,
    migration_address: str | None,
    bandwidth: int | None,
    dest_xml: str | None,
    persist_xml: str | None,
    copy_disks: list[str] | None = None,
) -> dict[str, object]:
    found: dict[str, object] = {}
    if live and copy_disks:
        found[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = copy_disks
    if live and migration_address:
        found[libvirt.VIR_MIGRATE_PARAM_URI] = stream_uri(migration_address)
        found[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = listen_address(migration_address)
    if live and bandwidth:
        found[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth
    if dest_xml is not None:
        found[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
    if persist_xml is not None:
        found[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = persist_xml
    return found


def stats(raw: dict[str, object]) -> MigrationStats | None:
    """The completed job's statistics, or None when the last job was not a migration."""
    operation = raw.get(libvirt.VIR_DOMAIN_JOB_OPERATION)
    incoming = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN
    if operation not in (incoming, libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT):
        return None

    def number(key: str) -> int | None:
        value = raw.get(key)
        return int(value) if isinstance(value, int) else None

    downtime = number(libvirt.VIR_DOMAIN_JOB_DOWNTIME)
    return MigrationStats(
        incoming=operation == incoming,
        seconds=(number(libvirt.VIR_DOMAIN_JOB_TIME_ELAPSED) or 0) / MS,
        downtime=None if downtime is None else downtime / MS,
        memory_bytes=number(libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED),
        memory_iterations=number(libvirt.VIR_DOMAIN_JOB_MEMORY_ITERATION),
    )


def in_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """Run ``fn`` in a daemon thread (a hung host never holds the process at exit)."""
    future: Future[T] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def wait(
    uri: str,
    dom: libvirt.virDomain,
    job: Future[None],
    timeout: float,
    bounded: Callable[[Callable[[], object]], object],
    grace: float,
) -> None:
    """Wait ``timeout`` seconds for the migration ``job``; past them abort it through
    libvirt (a call bounded by ``bounded``) and wait up to ``grace`` seconds for libvirt
    to give the domain back to the source, then raise :class:`HypervisorTimeout`. Returns
    when the job ended well (even as it was being aborted: the domain moved); a failed
    job's libvirt error is raised as it is."""
    try:
        job.result(timeout)
        return
    except FutureTimeout:
        pass
    except (KeyboardInterrupt, SystemExit):
        # the caller is going away (Ctrl-C, a worker ended): the job must not go on alone
        try:
            bounded(dom.abortJob)
        except HypervisorError as exc:
            log.info("aborting the migration of %s: %s", dom.name(), exc)
        raise
    try:
        bounded(dom.abortJob)
    except HypervisorError as exc:  # no job any more: it ended as the deadline passed
        log.info("aborting the migration of %s: %s", dom.name(), exc)
    try:
        job.result(grace)
    except FutureTimeout:
        log.error("the migration of %s did not end after its abort", dom.name())
    except libvirt.libvirtError as exc:
        log.info("migration of %s aborted after %g s: %s", dom.name(), timeout, exc)
    else:
        log.warning("the migration of %s finished as it was being aborted", dom.name())
        return
    raise HypervisorTimeout(uri, timeout)


def error(
    uri: str, dest_uri: str, conn: libvirt.virConnect, exc: libvirt.libvirtError, timeout: float
) -> HypervisorError:
    """A failed migration's libvirt error, translated; ``timeout`` is the driver's own."""
    found = translate(uri, exc)
    if isinstance(found, HypervisorUnavailable) and conn.isAlive():
        # The source still answers: it was the target it could not reach.
        return HypervisorUnavailable(dest_uri, found.reason, found.reason_class or "unreachable")
    if isinstance(found, HypervisorTimeout):  # a job lock libvirt waited for in vain
        return HypervisorTimeout(uri, timeout)
    return found


class MigrationCalls(LibvirtCalls):
    """Migrate a domain to another host, and read what its last migration did."""

    def migrate(
        self,
        uri: str,
        name: str,
        dest_uri: str,
        *,
        timeout: float,
        live: bool = True,
        migration_address: str | None = None,
        copy_storage: bool = False,
        disk_paths: dict[str, str] | None = None,
        bandwidth: int | None = None,
        unchecked_storage: bool = False,
        display: DisplaySpec | None = None,
        incremental: bool = False,
        console_log: str | None = None,
    ) -> None:
        if copy_storage and not live:
            raise NotSupported(uri, "libvirt copies disks only in a live migration; "
                                    "copy the volumes before moving a shut-off domain")  # fmt: skip
        self.connections.check(dest_uri)  # the source's libvirtd opens it: the same rules
        # A connection of its own (with a thread of its own for the bounded calls): the
        # migration holds it for as long as it runs.
        private = Channel.open(uri, self.connections.opener(uri), self.timeout)
        conn = private.conn

        def bounded(fn: Callable[[], T]) -> T:
            return self._bounded(private, fn)

        try:
            dom = bounded(lambda: conn.lookupByName(name))
            # libvirt would move a running domain's definition offline and leave it
            # running here, transient: a guest on one host defined on another.
            if not live and bounded(dom.isActive):
                raise OperationInvalid(uri, "the domain is running; only a shut-off one "
                                            "moves cold")  # fmt: skip
            dest_xml = persist_xml = copied = None
            changed = disk_paths or display is not None or console_log is not None
            if changed or copy_storage:
                xml = bounded(lambda: dom.XMLDesc(MIGRATABLE))
            if changed:
                paths = disk_paths or {}
                inactive = bounded(lambda: dom.XMLDesc(
                    MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE))  # fmt: skip
                dest_xml = retarget(xml, paths, display, console_log)
                persist_xml = retarget(inactive, paths, display, console_log)
            if copy_storage:
                # Always named: left to itself libvirt would copy every writable disk
                # with a source, network (RBD) disks too. Only the disks named are
                # copied, the others are on shared storage; none: nothing is copied.
                copied = copied_targets(xml, disk_paths)
            copying = bool(copied)
            parameters = params(live, migration_address, bandwidth, dest_xml, persist_xml,
                                copied)  # fmt: skip
            job = in_thread(
                lambda: dom.migrateToURI3(
                    dest_uri,
                    parameters,
                    flags(live, copying, unchecked_storage, incremental),
                ),
                f"libvirt-migrate {name}",
            )
            try:
                wait(uri, dom, job, timeout, bounded, grace=self.timeout)
            except libvirt.libvirtError as exc:
                raise error(uri, dest_uri, conn, exc, self.timeout) from exc
        finally:
            private.close(wait=False)  # an aborted migration's call may still hang on it

    def last_migration(self, uri: str, name: str) -> MigrationStats | None:
        completed = (
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
        )
        return self._on_domain(uri, name, lambda dom: stats(dom.jobStats(completed)))
