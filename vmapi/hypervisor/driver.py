"""The hypervisor interface: what vmapi asks of a host (:class:`HypervisorDriver`); its
values are in :mod:`.specs`, its exceptions in :mod:`.errors`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Protocol

from vmapi.hypervisor.specs import (
    CephSource,
    DiskSpec,
    DisplayInfo,
    DisplaySpec,
    DomainInfo,
    DomainSpec,
    HostInfo,
    LogTail,
    MigrationStats,
    NetworkFilter,
    NicSpec,
)


class HypervisorDriver(Protocol):
    """The calls vmapi makes on a host. Every call is bounded by the driver's timeout."""

    def host_info(self, uri: str) -> HostInfo:
        """Capacity of the host behind ``uri``."""
        ...

    def define(self, uri: str, spec: DomainSpec) -> None:
        """Create or replace the persistent definition of ``spec.name`` (``NameTaken`` when a
        domain with another UUID has that name)."""
        ...

    def start(self, uri: str, name: str, paused: bool = False) -> None:
        """Boot a defined, shut-off domain; ``paused``: QEMU runs with its disks open but
        no vCPU has run yet (until :meth:`resume`)."""
        ...

    def shutdown(self, uri: str, name: str) -> None:
        """Ask the guest to power off (ACPI); returns at once."""
        ...

    def destroy(self, uri: str, name: str) -> None:
        """Power off at once; a domain that is not running is left as it is."""
        ...

    def undefine(self, uri: str, name: str) -> None:
        """Remove the definition (``DomainNotFound`` when there is none)."""
        ...

    def suspend(self, uri: str, name: str) -> None: ...

    def resume(self, uri: str, name: str) -> None: ...

    def reboot(self, uri: str, name: str) -> None: ...

    def domain(self, uri: str, name: str) -> DomainInfo:
        """State and size of one domain (``DomainNotFound`` when there is none)."""
        ...

    def domains(self, uri: str) -> list[DomainInfo]:
        """Every domain on the host, with our metadata where present."""
        ...

    def set_vcpus_live(self, uri: str, name: str, vcpus: int) -> None: ...

    def set_memory_live(self, uri: str, name: str, memory: int) -> None: ...

    def set_cputune_live(self, uri: str, name: str, period: int, quota: int) -> None:
        """Change the running domain's CPU bandwidth; quota -1 means unlimited."""
        ...

    def set_display_password(self, uri: str, name: str, password: str, valid_to: datetime) -> None:
        """Give the running domain's VNC display a new password, valid until ``valid_to``
        (UTC, whole seconds); ``NoDisplay`` when it has none."""
        ...

    def display(self, uri: str, name: str) -> DisplayInfo:
        """Where the running domain's VNC display listens now (``NoDisplay`` when it has
        none or the domain is not running)."""
        ...

    def ensure_pool(self, uri: str, pool: str, path: str) -> bool:
        """Make sure a started storage pool ``pool`` exists; define a dir pool at ``path``
        if it does not. True when it was created."""
        ...

    def ensure_ceph_secret(self, uri: str, source: CephSource, key: str) -> bool:
        """Make sure the host's libvirt holds the secret ``source.secret_uuid`` (usage
        ceph, ``client.<user>``) with ``key`` (the cephx key, base64 as Ceph prints it) as
        its value; True when it was defined or its value changed. The key never appears in
        an error or a log. The secret is private (its value cannot be read back): whether
        it holds the key is told by a digest of the key in its description. libvirt
        allows one secret per usage on a host: a secret of that UUID for another usage,
        or another secret for this usage, is ``NameTaken``/``HypervisorError``."""
        ...

    def forget_ceph_secret(self, uri: str, secret_uuid: str) -> bool:
        """Remove the secret ``secret_uuid`` unless a storage pool of the host uses it;
        True when it was removed (none there is no error)."""
        ...

    def ensure_rbd_pool(self, uri: str, pool: str, source: CephSource) -> bool:
        """Make sure a started libvirt storage pool ``pool`` of type rbd over ``source``
        exists (its secret first: :meth:`ensure_ceph_secret`, else ``HypervisorError``
        before anything is made); True when it was created. A pool of that name over
        another source (type, Ceph pool, monitors, user, secret) is ``NameTaken`` and left
        as it is. When the host cannot reach the cluster, ``HypervisorError`` (not
        ``HypervisorUnavailable``: the host answered) within a few seconds, and a pool made
        by this call is undefined again. Its volumes: raw only; grown, never shrunk; no
        upload or download streams (libvirt 9.0)."""
        ...

    def forget_rbd_pool(self, uri: str, pool: str, source: CephSource) -> bool:
        """Stop and undefine the rbd pool ``pool`` when it stands over ``source`` (the
        images in the cluster are not touched); one over another source is left as it
        is. True when it was removed, False when there was none (or not ours)."""
        ...

    def refresh_rbd_pool(self, uri: str, pool: str, source: CephSource) -> tuple[int, int]:
        """Refresh the started rbd pool ``pool`` (over ``source``) from the cluster: the
        host's librados connects to it again (bounded as :meth:`ensure_rbd_pool`'s start).
        The pool's (capacity, available) bytes; ``PoolNotFound`` when the host has no such
        pool, ``HypervisorError`` naming the monitors when the cluster is out of reach
        (libvirt then stops the pool; the next :meth:`ensure_rbd_pool` starts it)."""
        ...

    def pool_dir(self, uri: str, pool: str, path: str) -> str:
        """The directory of pool ``pool`` (made and started as :meth:`ensure_pool` does, at
        ``path`` when missing), as the host has it."""
        ...

    def create_volume(self, uri: str, pool: str, name: str, size: int, fmt: str) -> str:
        """Create a volume; return its path (``NameTaken`` when the pool has one of that
        name)."""
        ...

    def volume(self, uri: str, pool: str, name: str) -> tuple[str, int]:
        """Path and capacity (bytes) of a volume (``VolumeNotFound`` when there is none)."""
        ...

    def volume_length(self, uri: str, pool: str, name: str) -> int:
        """Bytes a download of the volume yields: its file's length (for a qcow2 volume
        not its capacity); ``VolumeNotFound`` when there is none."""
        ...

    def volumes(self, uri: str, pool: str) -> list[str]:
        """Names of the volumes in the pool, as the pool finds them now (``PoolNotFound``
        when the host has no such pool)."""
        ...

    def resize_volume(self, uri: str, pool: str, name: str, size: int) -> None: ...

    def delete_volume(self, uri: str, pool: str, name: str) -> None:
        """Delete a volume; in an rbd pool with the snapshots libvirt made to clone it
        (``VolumeHasClones`` while clones of it exist)."""
        ...

    def attach_disk_live(self, uri: str, name: str, disk: DiskSpec) -> None: ...

    def detach_disk_live(self, uri: str, name: str, disk: DiskSpec, wait: float) -> bool:
        """Ask the running guest to release the disk; True once it is gone (within
        ``wait`` seconds), False if the guest has not released it."""
        ...

    def set_iotune_live(self, uri: str, name: str, target: str, iotune: dict[str, int]) -> None: ...

    def resize_disk_live(self, uri: str, name: str, target: str, size: int) -> None: ...

    def upload_volume(
        self, uri: str, pool: str, name: str, size: int, chunks: Iterable[bytes], timeout: float
    ) -> str:
        """Create volume ``name`` as a file of exactly ``size`` bytes and fill it with
        ``chunks`` (consumed in the caller's thread), on a connection of its own, all within
        ``timeout`` seconds. The bytes are kept as they come, whatever their format. On any
        failure (the iterator's own exceptions included, re-raised as they are), a stream of
        another length, or the timeout, the stream is aborted and the volume deleted.
        Returns the volume's path. ``VolumeExists`` leaves the existing volume alone."""
        ...

    def download_volume(
        self, uri: str, pool: str, name: str, timeout: float, offset: int = 0, length: int = 0
    ) -> Iterator[bytes]:
        """The volume's bytes from ``offset`` (``length`` of them; 0: to the end) in chunks,
        on a connection of its own, all within ``timeout`` seconds (``HypervisorTimeout``
        from the iteration). Close the iterator to stop early."""
        ...

    def volume_sha256(self, uri: str, pool: str, name: str, timeout: float) -> str:
        """Hex sha256 of the volume's content, read through :meth:`download_volume`."""
        ...

    def create_overlay(
        self, uri: str, pool: str, name: str, capacity: int, base: str, base_format: str
    ) -> str:
        """Create a qcow2 volume of ``capacity`` bytes backed by volume ``base`` (format
        ``base_format``, raw or qcow2, given rather than probed) of the same pool; its path."""
        ...

    def tail(self, uri: str, pool: str, volume: str, n: int) -> LogTail:
        """The last ``n`` bytes of a log volume, reaching back into the files the node's log
        daemon rotated it into (``volume.0``, ``volume.1``, ...). ``VolumeNotFound`` when the
        log does not exist (yet: a domain writes its console log from its first start)."""
        ...

    def delete_log(self, uri: str, pool: str, volume: str) -> None:
        """Delete a log volume and its rotated files; nothing to delete is no error."""
        ...

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
        """Move the domain to the host the source reaches at ``dest_uri``, defined there
        and no longer here. ``live``: the running (or paused, which stays paused) guest
        moves with its memory, the stream going to ``migration_address`` (an address, or
        a ``tcp://`` URI); otherwise a shut-off domain's definition moves.
        ``copy_storage`` (live only) copies the disks into files that already exist on
        the target (same size); ``disk_paths`` names, per source path, the file a disk
        has on the target (without it every writable file disk is copied). A network
        disk (RBD) is shared: never copied, never retargeted. Disks not copied must be
        on storage both hosts share; libvirt checks that it is a shared filesystem
        unless ``unchecked_storage`` (for storage declared shared that libvirt cannot
        recognise as such).
        When copying with ``disk_paths``, only the writable disks it names are copied
        (the others must be on shared storage; read-only ones, such as a seed, are only
        pointed at the target's file); ``incremental`` copies only their top layer, onto
        overlays the target made on its own copy of the same base. ``display`` replaces
        the VNC display on the target (its listen address, a fresh password) and
        ``console_log`` the file the serial console is logged to, live and in the
        persistent definition.
        ``bandwidth`` caps the stream (MiB/s). Past ``timeout``
        seconds the migration is aborted, the domain stays where it was (running) and
        :class:`HypervisorTimeout` is raised."""
        ...

    # ------------------------------------------------------------------ network filters
    def network_filters(self, uri: str) -> bool:
        """Whether the host's libvirt has the network filter driver (nwfilter)."""
        ...

    def define_filter(self, uri: str, spec: NetworkFilter) -> None:
        """Create or replace the filter(s) of ``spec`` on the host; libvirt re-applies a
        replaced filter to every running guest using it (``NoNetworkFilters`` when the
        host cannot filter)."""
        ...

    def undefine_filter(self, uri: str, name: str) -> None:
        """Remove a filter; one that is not there is no error."""
        ...

    def filter_names(self, uri: str, prefix: str) -> set[str]:
        """The names of the host's filters that start with ``prefix``."""
        ...

    def stale_filters(self, uri: str, specs: Iterable[NetworkFilter]) -> list[str]:
        """The names of the filters of ``specs`` that the host lacks or holds otherwise."""
        ...

    def update_nic_filter_live(self, uri: str, name: str, nic: NicSpec) -> bool:
        """Give the running domain's NIC (found by its MAC) ``nic``'s filter and addresses,
        live; False when the domain is not running (nothing to change)."""
        ...

    def clone_volume(
        self, uri: str, pool: str, name: str, source_pool: str, source: str, timeout: float
    ) -> str:
        """Create volume ``name`` in ``pool`` as a qcow2 copy that stands alone (no backing
        file) of volume ``source`` of ``source_pool``: the content of its whole backing
        chain as it is now, flattened (nothing may write it meanwhile: a shut-off
        domain's disk, an image's base copy), all within ``timeout`` seconds. The copy
        has the source's virtual size (libvirt's conversion keeps it whatever capacity
        is asked: a larger volume is a :meth:`resize_volume` afterwards). On any failure
        nothing named ``name`` is left; past the timeout libvirt cannot stop the
        conversion it began, so the volume is deleted as soon as it is made (within the
        driver's own timeout more, or later: until then :meth:`delete_volume` is refused
        with ``OperationInvalid``). ``VolumeExists`` leaves the existing volume alone.
        Returns the new volume's path.
        In an rbd pool (``source_pool`` the same pool; another is ``NotSupported``) the
        volume is instead RBD's copy-on-write clone of the source, raw: made in a fraction
        of a second, sharing its parent's data, which cannot be deleted while it exists."""
        ...

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
        """Copy disk ``target`` (vda, vdb, ...) of the running (or paused) domain ``name``
        into a new qcow2 volume ``volume`` of ``pool`` (made here, the disk's capacity):
        a block copy of the disk's whole chain, flattened, that is ended without a pivot
        once source and copy are in sync, so the copy holds the disk as it was at that
        moment, the guest never pauses and its disk chain is exactly as before (checked
        after). With ``quiesce`` the guest's file systems are frozen through its agent
        for that moment only (``NoGuestAgent`` before anything is made when none
        answers; they are thawed whatever happens). ``OperationInvalid`` when the domain
        is not running or the disk has a block job already, ``NotSupported`` when the
        domain has no such disk, ``VolumeExists`` (that volume left alone) when the name
        is taken. All within ``timeout`` seconds (the clean-up after it within the
        driver's own timeout); on any failure the job is aborted and the volume
        deleted. Returns the volume's path."""
        ...

    def freeze_filesystems(self, uri: str, name: str) -> None:
        """Freeze the running guest's file systems through its agent (``NoGuestAgent``
        when none answers, nothing frozen); :meth:`thaw_filesystems` must follow, soon."""
        ...

    def thaw_filesystems(self, uri: str, name: str) -> None:
        """Thaw them (tried twice: a guest left frozen is stuck)."""
        ...

    def abort_disk_copy(self, uri: str, name: str, target: str) -> bool:
        """End a block copy of the domain's disk ``target`` without a pivot (one left by
        a process that died mid-copy); True when there was one, False when there was
        none or the domain is not running."""
        ...

    def last_migration(self, uri: str, name: str) -> MigrationStats | None:
        """The last migration that brought the domain to ``uri`` (read on the host it
        moved to), or None when its last job was none (an offline migration keeps no
        statistics; an aborted one clears them)."""
        ...
