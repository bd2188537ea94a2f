"""Fault injection: the real driver, with chosen calls made to fail (DESIGN.md).

libvirt cannot be told to fail the third call of a request, so this wrapper passes
every call through to the real driver except the ones armed to fail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from vmapi.hypervisor import (
    DiskLeased,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    NoNetworkFilters,
)

KINDS: dict[str, Callable[[str], Exception]] = {
    "error": lambda uri: HypervisorError(uri, "injected failure"),
    "timeout": lambda uri: HypervisorTimeout(uri, 5.0),
    "unavailable": lambda uri: HypervisorUnavailable(uri, "injected: connection refused"),
    # libvirt without its network filter driver (a daemon built or packaged without it)
    "no_nwfilter": lambda uri: NoNetworkFilters(uri, "injected: no network filter driver"),
    # the lock manager (lockd) refusing a disk another host's QEMU holds; the test driver
    # has no lock manager (the real refusal: tests/hypervisor/test_ha_leases.py)
    "leased": lambda uri: DiskLeased(uri, "resource busy: Lockspace resource 'ab12' is locked"),
}


class FaultyDriver:
    """Wraps a driver; ``fail("start")`` makes the next call of ``start`` raise."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.armed: dict[tuple[str, str | None], list[tuple[int, str]]] = {}
        self.calls: list[str] = []
        #: each call's method and arguments after the URI, in order
        self.called: list[tuple[str, tuple[Any, ...]]] = []
        #: the same with each call's keyword arguments
        self.called_with: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        #: each call's method, URI and the thread it ran in (calls may come from threads)
        self.threads: list[tuple[str, str, int]] = []
        #: called as ``before(method, uri, args)`` ahead of every call (e.g. a barrier)
        self.before: Callable[[str, str, tuple[Any, ...]], None] | None = None
        self._lock = threading.Lock()

    def fail(self, method: str, kind: str = "error", skip: int = 0, uri: str | None = None) -> None:
        """Make ``method`` fail once, after letting ``skip`` calls of it through; with
        ``uri``, only on that host (its calls alone are counted)."""
        self.armed.setdefault((method, uri), []).append((skip, kind))

    def _armed(self, name: str, uri: str) -> str | None:
        """The kind of failure this call is to raise, if any."""
        with self._lock:
            for key in ((name, uri), (name, None)):
                plans = self.armed.get(key)
                if plans:
                    skip, kind = plans[0]
                    if skip == 0:
                        plans.pop(0)
                        return kind
                    plans[0] = (skip - 1, kind)
                    return None
        return None

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.real, name)
        if not callable(target):
            return target

        def call(uri: str, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls.append(name)
                self.called.append((name, args))
                self.called_with.append((name, args, kwargs))
                self.threads.append((name, uri, threading.get_ident()))
            if self.before is not None:
                self.before(name, uri, args)
            kind = self._armed(name, uri)
            if kind is not None:
                raise KINDS[kind](uri)
            return target(uri, *args, **kwargs)

        return call
