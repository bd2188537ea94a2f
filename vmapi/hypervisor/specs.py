"""The hypervisor interface's values: what vmapi asks of a host and what it answers, in
plain dataclasses (no libvirt, no database)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO

#: Domain states as vmapi names them (the seeded vm_state rows).
RUNNING, PAUSED, SHUTOFF, CRASHED, ERROR = "running", "paused", "shutoff", "crashed", "error"

#: Bytes per piece of a volume stream: one libvirt stream packet carries at most 256 KiB.
CHUNK_SIZE = 256 * 1024


@dataclass(frozen=True)
class HostInfo:
    """What a host reports about itself (libvirt's ``virNodeGetInfo``)."""

    cores: int  # logical CPUs online
    ram: int  # bytes
    model: str
    mhz: int


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
class CephSource:
    """An RBD pool of a Ceph cluster and who uses it: the cluster's monitors (host, msgr v1
    port), the Ceph pool, the cephx user (without ``client.``) and the UUID of the libvirt
    secret that holds that user's key on every node (one UUID everywhere, so a domain
    moves with its disks' definition unchanged)."""

    monitors: tuple[tuple[str, int], ...]
    pool: str
    user: str
    secret_uuid: str


@dataclass(frozen=True)
class DiskSpec:
    """A volume attached as a virtio disk, with its cache mode and I/O limits."""

    path: str  # a file; for an RBD disk the image's name in its Ceph pool
    format: str  # qcow2 or raw (RBD: raw)
    target: str  # vdb, vdc, ...
    cache: str | None = None
    #: libvirt <iotune> names: read_iops_sec, write_iops_sec, read_bytes_sec, write_bytes_sec
    iotune: dict[str, int] = field(default_factory=dict)
    readonly: bool = False  # the guest cannot write it (a cloud-init seed)
    #: an RBD image, reached by QEMU's librbd (a network disk), not a file
    rbd: CephSource | None = None


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
