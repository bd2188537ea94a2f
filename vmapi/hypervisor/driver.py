"""The hypervisor interface: what vmapi asks of a host, in plain dataclasses and exceptions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

#: Domain states as vmapi names them (the seeded vm_state rows).
RUNNING, PAUSED, SHUTOFF, CRASHED, ERROR = "running", "paused", "shutoff", "crashed", "error"


class HypervisorError(Exception):
    """The hypervisor answered with an error. ``reason`` is its own message."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")


class HypervisorUnavailable(HypervisorError):
    """The hypervisor could not be reached (connection refused, DNS, auth, dead link)."""


class HypervisorTimeout(HypervisorError):
    """The hypervisor did not answer within the configured time."""

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


class OperationInvalid(HypervisorError):
    """The domain is not in a state that allows the operation (e.g. suspend a shut-off one)."""


class NotSupported(HypervisorError):
    """The hypervisor cannot do this (e.g. change a live setting its driver does not support)."""


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


@dataclass(frozen=True)
class DiskSpec:
    """A volume attached as a virtio disk, with its cache mode and I/O limits."""

    path: str
    format: str  # qcow2 or raw
    target: str  # vdb, vdc, ...
    cache: str | None = None
    #: libvirt <iotune> names: read_iops_sec, write_iops_sec, read_bytes_sec, write_bytes_sec
    iotune: dict[str, int] = field(default_factory=dict)


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

    def ensure_pool(self, uri: str, pool: str, path: str) -> bool:
        """Make sure a started storage pool ``pool`` exists; define a dir pool at ``path``
        if it does not. True when it was created."""
        ...

    def create_volume(self, uri: str, pool: str, name: str, size: int, fmt: str) -> str:
        """Create a volume; return its path (``NameTaken`` when the pool has one of that
        name)."""
        ...

    def volume(self, uri: str, pool: str, name: str) -> tuple[str, int]:
        """Path and capacity (bytes) of a volume (``VolumeNotFound`` when there is none)."""
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
