"""The only door to the hypervisors. Takes and returns plain dataclasses.

Nothing here imports Flask, the models or the session; only ``hypervisor/libvirt/``
imports ``libvirt``.
"""

from vmapi.hypervisor.driver import (
    CHUNK_SIZE,
    CRASHED,
    ERROR,
    PAUSED,
    RUNNING,
    SHUTOFF,
    DiskSpec,
    DomainInfo,
    DomainNotFound,
    DomainSpec,
    HostInfo,
    HypervisorDriver,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    LogTail,
    MigrationStats,
    NicSpec,
    NotSupported,
    OperationInvalid,
    VolumeExists,
    VolumeNotFound,
    read_chunks,
)

__all__ = [
    "CHUNK_SIZE",
    "CRASHED",
    "ERROR",
    "PAUSED",
    "RUNNING",
    "SHUTOFF",
    "DiskSpec",
    "DomainInfo",
    "DomainNotFound",
    "DomainSpec",
    "HostInfo",
    "HypervisorDriver",
    "HypervisorError",
    "HypervisorTimeout",
    "HypervisorUnavailable",
    "LogTail",
    "MigrationStats",
    "NicSpec",
    "NotSupported",
    "OperationInvalid",
    "VolumeExists",
    "VolumeNotFound",
    "read_chunks",
]
