"""The libvirt driver: each public method is one bounded, translated hypervisor action."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import libvirt

from vmapi.hypervisor.driver import HostInfo, HypervisorError, HypervisorTimeout
from vmapi.hypervisor.libvirt.connection import ConnectionCache, call_with_timeout, translate

log = logging.getLogger(__name__)
T = TypeVar("T")

MIB = 1024 * 1024


class LibvirtDriver:
    """Implements :class:`vmapi.hypervisor.HypervisorDriver` over libvirt-python."""

    def __init__(
        self, timeout: float = 10.0, keepalive_interval: int = 5, keepalive_count: int = 3
    ) -> None:
        self.timeout = timeout
        self.connections = ConnectionCache(keepalive_interval, keepalive_count)

    def _call(self, uri: str, action: Callable[[libvirt.virConnect], T]) -> T:
        conn = self.connections.get(uri, self.timeout)
        try:
            return call_with_timeout(uri, self.timeout, lambda: action(conn))
        except HypervisorTimeout:
            self.connections.drop(uri)
            raise
        except libvirt.libvirtError as exc:
            error = translate(uri, exc)
            if isinstance(error, HypervisorTimeout):
                error = HypervisorTimeout(uri, self.timeout)
            if type(error) is not HypervisorError:
                self.connections.drop(uri)
            raise error from exc

    def host_info(self, uri: str) -> HostInfo:
        model, memory_mib, cpus, mhz, *_ = self._call(uri, lambda conn: conn.getInfo())
        return HostInfo(cores=int(cpus), ram=int(memory_mib) * MIB, model=str(model), mhz=int(mhz))
