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
    DisplayInfo,
    DisplaySpec,
    DomainInfo,
    DomainNotFound,
    DomainSpec,
    HostInfo,
    HypervisorDriver,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    NicSpec,
    NoDisplay,
    NotSupported,
    OperationInvalid,
    VolumeNotFound,
)

__all__ = [
    "CRASHED",
    "ERROR",
    "PAUSED",
    "RUNNING",
    "SHUTOFF",
    "DiskSpec",
    "DisplayInfo",
    "DisplaySpec",
    "DomainInfo",
    "DomainNotFound",
    "DomainSpec",
    "HostInfo",
    "HypervisorDriver",
    "HypervisorError",
    "HypervisorTimeout",
    "HypervisorUnavailable",
    "NicSpec",
    "NoDisplay",
    "NotSupported",
    "OperationInvalid",
    "VolumeNotFound",
]
