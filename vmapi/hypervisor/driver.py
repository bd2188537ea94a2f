"""The hypervisor interface: what vmapi asks of a host, in plain dataclasses and exceptions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Protocol

#: Domain states as vmapi names them (the seeded vm_state rows).
RUNNING, PAUSED, SHUTOFF, CRASHED, ERROR = "running", "paused", "shutoff", "crashed", "error"

#: Bytes per piece of a volume stream: one libvirt stream packet carries at most 256 KiB.
CHUNK_SIZE = 256 * 1024


#: Why a host could not be reached: the only words about a failed connection an answer
#: carries (libvirt's own text can quote a file it read, so it goes to the log only).
REASON_CLASSES = ("unreachable", "auth_failed", "timeout", "refused")


class HypervisorError(Exception):
    """The hypervisor answered with an error. ``reason`` is its own message."""

    #: one of REASON_CLASSES when the host could not be reached
    reason_class: str | None = None

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")


class HypervisorUnavailable(HypervisorError):
    """The hypervisor could not be reached (connection refused, DNS, auth, dead link).

    ``reason_class`` says why in one of :data:`REASON_CLASSES`; the libvirt layer gives
    it as the ``reason`` too, never libvirt's text."""

    def __init__(self, uri: str, reason: str, reason_class: str = "unreachable") -> None:
        if reason_class not in REASON_CLASSES:
            raise ValueError(f"not a reason class: {reason_class!r}")
        self.reason_class = reason_class
        super().__init__(uri, reason)


class UriRefused(HypervisorError):
    """The URI is not one vmapi may open (vmapi.hypervisor.uri): nothing was connected."""


class HypervisorTimeout(HypervisorError):
    """The hypervisor did not answer within the configured time."""

    reason_class = "timeout"

    def __init__(self, uri: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(uri, f"no answer within {timeout:g} s")


class DomainNotFound(HypervisorError):
    """The host has no domain of that name."""


class VolumeNotFound(HypervisorError):
    """The pool has no volume of that name."""


class PoolNotFound(HypervisorError):
    """The host has no storage pool of that name."""


class NameTaken(HypervisorError):
    """Something else on the host already has the name (a domain, or a volume in the pool)."""


class VolumeExists(NameTaken):
    """The pool already has a volume of that name (it is left as it is)."""


class OperationInvalid(HypervisorError):
    """The domain is not in a state that allows the operation (e.g. suspend a shut-off one)."""


class NotSupported(HypervisorError):
    """The hypervisor cannot do this (e.g. change a live setting its driver does not support)."""


class NoDisplay(HypervisorError):
    """The running domain has no VNC display (defined before vmapi gave domains one)."""


@dataclass(frozen=True)
class HostInfo:
    """What a host reports about itself (libvirt's ``virNodeGetInfo``)."""

    cores: int  # logical CPUs online
    ram: int  # bytes
    model: str
    mhz: int


class NoNetworkFilters(HypervisorError):
    """The host's libvirt has no network filter driver (nwfilter): it cannot guard NICs."""


class NoGuestAgent(HypervisorError):
    """The domain has no guest agent that answers (none configured, none running in the
    guest, or it did not reply in time): its file systems cannot be frozen."""


@dataclass(frozen=True)
class NicSpec:
    """One network interface: how it is wired and what the guest should configure."""

    mac: str
    mode: str  # bridge (device = bridge name), ethernet (device = tap name), user
    device: str | None = None
    ipv4: str | None = None  # with prefix, e.g. 192.0.2.5/24
    ipv4_gateway: str | None = None
    ipv6: str | None = None
    ipv6_gateway: str | None = None
    vlan: int | None = None
    #: the network filter guarding this NIC (a :class:`PortFilter`'s name), with the
    #: addresses its rules hold the guest to; None: no filter (``user`` mode)
    filter: str | None = None
    filter_ipv4: tuple[str, ...] = ()  # addresses without prefix
    filter_ipv6: tuple[str, ...] = ()  # the global ones and the link-local one


#: Directions and families of a :class:`FilterRule` (a security group's rule, seen from
#: the guest: ``in`` reaches it, ``out`` leaves it).
IN, OUT = "in", "out"


@dataclass(frozen=True)
class FilterRule:
    """One allow rule of a security group: traffic of ``protocol`` (tcp, udp, icmp,
    icmpv6, any) and ``family`` (ipv4, ipv6) in ``direction``, to ports ``port_min`` ..
    ``port_max`` (tcp/udp), from (in) or to (out) ``remote`` (a CIDR; None: any)."""

    direction: str
    family: str
    protocol: str
    port_min: int | None = None
    port_max: int | None = None
    remote: str | None = None


@dataclass(frozen=True)
class GroupFilter:
    """A security group as one filter of the node: its allow rules (stateful: the answers
    of allowed traffic come back)."""

    name: str
    rules: tuple[FilterRule, ...] = ()


#: The guard's parts: the guest's MAC; its IPv4 addresses (or none); its IPv6 addresses;
#: ARP for its IPv4 addresses (or none); layer 2 protocols.
GUARD_PARTS = ("mac", "ipv4", "noipv4", "ipv6", "arp", "noarp", "l2")


@dataclass(frozen=True)
class GuardFilters:
    """The anti-spoofing filters every guarded NIC references (the same on every node of
    an installation), their names starting with ``prefix``."""

    prefix: str

    def name(self, part: str) -> str:
        return f"{self.prefix}-guard-{part}"

    def names(self) -> tuple[str, ...]:
        return tuple(self.name(part) for part in GUARD_PARTS)


@dataclass(frozen=True)
class PortFilter:
    """What one NIC's filter is made of: the guard (``guard``: holds the guest to its MAC
    and addresses; ``ipv4``: it has IPv4 addresses, else it may send no IPv4 and no ARP),
    the groups' filters by name, and the policy around them: with groups, what reaches
    the guest is dropped unless a group allows it; with ``egress_limited`` (a group has
    egress rules) what it sends too."""

    name: str
    guard: GuardFilters | None
    ipv4: bool = True
    groups: tuple[str, ...] = ()
    egress_limited: bool = False


NetworkFilter = GuardFilters | GroupFilter | PortFilter


@dataclass(frozen=True)
class DiskSpec:
    """A volume attached as a virtio disk, with its cache mode and I/O limits."""

    path: str
    format: str  # qcow2 or raw
    target: str  # vdb, vdc, ...
    cache: str | None = None
    #: libvirt <iotune> names: read_iops_sec, write_iops_sec, read_bytes_sec, write_bytes_sec
    iotune: dict[str, int] = field(default_factory=dict)
    readonly: bool = False  # the guest cannot write it (a cloud-init seed)


@dataclass(frozen=True)
class DisplaySpec:
    """A VNC display on ``listen``, on a port the hypervisor picks, behind a password that
    is valid until ``password_valid_to`` (UTC; a past time: no one can log in with it)."""

    listen: str
    password: str  # VNC uses at most 8 characters
    password_valid_to: datetime | None = None


@dataclass(frozen=True)
class DisplayInfo:
    """Where a running domain's VNC display is now (the port changes at every start)."""

    listen: str | None
    port: int


@dataclass(frozen=True)
class DomainSpec:
    """Everything a domain is made of; the persistent definition is rewritten from it."""

    name: str
    uuid: str
    domain_type: str  # libvirt's <domain type>: kvm, qemu, test, ...
    vcpus: int
    max_vcpus: int
    memory: int  # bytes, current
    max_memory: int  # bytes
    vm_id: int
    installation: str
    cpu_period: int | None = None  # microseconds; with cpu_quota: <cputune>
    cpu_quota: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    nics: tuple[NicSpec, ...] = ()
    disks: tuple[DiskSpec, ...] = ()
    #: where the node logs the serial console: a file in a storage pool's directory, so it
    #: can be read back through libvirt (:meth:`HypervisorDriver.tail`); None: no log
    console_log: str | None = None
    display: DisplaySpec | None = None
    #: the guest's cloud-init seed: a read-only raw disk after the others
    seed: DiskSpec | None = None


@dataclass(frozen=True)
class DomainInfo:
    """A domain as the host reports it. ``vm_id``/``installation`` come from our metadata."""

    name: str
    uuid: str
    state: str
    vcpus: int
    memory: int  # bytes
    vm_id: int | None = None
    installation: str | None = None


@dataclass(frozen=True)
class LogTail:
    """The end of a log volume (and of its rotated predecessors, oldest first)."""

    data: bytes
    truncated: bool  # older output exists before ``data``


def read_chunks(readable: BinaryIO, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """A readable (file, request body) as the chunk iterator the stream calls take."""
    while chunk := readable.read(size):
        yield chunk


@dataclass(frozen=True)
class MigrationStats:
    """What libvirt reports about a finished live migration (its completed job), as read
    on the host the domain moved to; ``None`` where the hypervisor reported nothing.
    (libvirt counts a non-shared-disk copy on the source only, so it is not here.)"""

    incoming: bool  # True: the domain came to this host; False: it left it
    seconds: float  # the whole job, start to end
    downtime: float | None  # seconds the guest was paused at the switch-over
    memory_bytes: int | None = None  # guest memory sent
    memory_iterations: int | None = None  # passes over the guest's memory


class HypervisorDriver(Protocol):
    """The calls vmapi makes on a host. Every call is bounded by the driver's timeout."""

    def host_info(self, uri: str) -> HostInfo:
        """Capacity of the host behind ``uri``."""
        ...

    def define(self, uri: str, spec: DomainSpec) -> None:
        """Create or replace the persistent definition of ``spec.name`` (``NameTaken`` when a
        domain with another UUID has that name)."""
        ...

    def start(self, uri: str, name: str) -> None:
        """Boot a defined, shut-off domain."""
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

    def delete_volume(self, uri: str, pool: str, name: str) -> None: ...

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
        has on the target. Disks not copied must be on storage both hosts share;
        libvirt checks that it is a shared filesystem unless ``unchecked_storage`` (for
        storage declared shared that libvirt cannot recognise as such).
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
        Returns the new volume's path."""
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
