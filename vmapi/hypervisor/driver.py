"""The hypervisor interface: what vmapi asks of a host, in plain dataclasses and exceptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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


@dataclass(frozen=True)
class HostInfo:
    """What a host reports about itself (libvirt's ``virNodeGetInfo``)."""

    cores: int  # logical CPUs online
    ram: int  # bytes
    model: str
    mhz: int


class HypervisorDriver(Protocol):
    """The calls vmapi makes on a host. Every call is bounded by the driver's timeout."""

    def host_info(self, uri: str) -> HostInfo:
        """Capacity of the host behind ``uri``."""
        ...
