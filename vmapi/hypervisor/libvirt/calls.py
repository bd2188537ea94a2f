"""The one way the driver calls libvirt: bounded by its timeout, errors translated.

Every concern of :class:`~vmapi.hypervisor.libvirt.driver.LibvirtDriver` (its domains,
their live changes, storage, migration) is a mixin over :class:`LibvirtCalls`, and makes
its libvirt calls through it: on a thread of the URI's cached :class:`Channel`
(:mod:`.connection`), within what is left of the timeout, libvirt's error translated
into the hypervisor package's exceptions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import libvirt

from vmapi.hypervisor.errors import HypervisorTimeout, HypervisorUnavailable
from vmapi.hypervisor.libvirt.connection import Channel, ConnectionCache, translate
from vmapi.hypervisor.uri import UriPolicy

T = TypeVar("T")


class LibvirtCalls:
    """The driver's timeout and connection cache, and the bounded, translated calls."""

    def __init__(
        self,
        timeout: float = 10.0,
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        policy: UriPolicy | None = None,
    ) -> None:
        self.timeout = timeout
        self.connections = ConnectionCache(keepalive_interval, keepalive_count, policy)

    def _call(self, uri: str, action: Callable[[libvirt.virConnect], T]) -> T:
        started = time.monotonic()
        return self._on_channel(self.connections.channel(uri, self.timeout), started, action)

    def _on_channel(
        self, channel: Channel, started: float, action: Callable[[libvirt.virConnect], T]
    ) -> T:
        """``action(conn)`` on ``channel``'s thread within what is left of the timeout,
        translated; a channel that timed out or lost its host is dropped from the cache."""
        uri = channel.uri
        remaining = max(self.timeout - (time.monotonic() - started), 0.1)
        try:
            return channel.call(remaining, action)
        except HypervisorTimeout:
            self.connections.drop(uri, channel)
            raise HypervisorTimeout(uri, self.timeout) from None
        except libvirt.libvirtError as exc:
            # Whatever this connection remembered (a pool's directory) is looked up again
            # after any failure: the host may have changed under it.
            channel.memo.clear()
            error = translate(uri, exc)
            if isinstance(error, HypervisorTimeout):
                error = HypervisorTimeout(uri, self.timeout)
            if isinstance(error, HypervisorUnavailable | HypervisorTimeout):
                self.connections.drop(uri, channel)
            raise error from exc

    def _on_domain(self, uri: str, name: str, action: Callable[[libvirt.virDomain], T]) -> T:
        return self._call(uri, lambda conn: action(conn.lookupByName(name)))

    def _open_private(self, uri: str) -> Callable[[], libvirt.virConnect]:
        """Opens a connection of a stream's own (see :mod:`.streams`)."""
        return self.connections.opener(uri)

    def _bounded(self, private: Channel, fn: Callable[[], T]) -> T:
        """One call on a channel of the caller's own, bounded and translated like _call."""
        uri = private.uri
        try:
            return private.run(self.timeout, fn)
        except HypervisorTimeout:
            raise HypervisorTimeout(uri, self.timeout) from None
        except libvirt.libvirtError as exc:
            error = translate(uri, exc)
            raise (HypervisorTimeout(uri, self.timeout) if isinstance(error, HypervisorTimeout)
                   else error) from exc  # fmt: skip
