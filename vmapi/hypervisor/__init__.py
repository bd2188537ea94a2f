"""The only door to the hypervisors. Takes and returns plain dataclasses.

Nothing here imports Flask, the models or the session; only ``hypervisor/libvirt/``
imports ``libvirt``.
"""

from vmapi.hypervisor.driver import (
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
    NameTaken,
    NicSpec,
    NotSupported,
    OperationInvalid,
    PoolNotFound,
    VolumeNotFound,
)

__all__ = [
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
    "NameTaken",
    "NicSpec",
    "NotSupported",
    "OperationInvalid",
    "PoolNotFound",
    "VolumeNotFound",
]
