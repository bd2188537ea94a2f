"""Fault injection: the real driver, with chosen calls made to fail (DESIGN.md).

libvirt cannot be told to fail the third call of a request, so this wrapper passes
every call through to the real driver except the ones armed to fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmapi.hypervisor import HypervisorError, HypervisorTimeout, HypervisorUnavailable

KINDS: dict[str, Callable[[str], Exception]] = {
    "error": lambda uri: HypervisorError(uri, "injected failure"),
    "timeout": lambda uri: HypervisorTimeout(uri, 5.0),
    "unavailable": lambda uri: HypervisorUnavailable(uri, "injected: connection refused"),
}


class FaultyDriver:
    """Wraps a driver; ``fail("start")`` makes the next call of ``start`` raise."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.armed: dict[str, list[tuple[int, str]]] = {}
        self.calls: list[str] = []
        #: each call's method and arguments after the URI, in order
        self.called: list[tuple[str, tuple[Any, ...]]] = []

    def fail(self, method: str, kind: str = "error", skip: int = 0) -> None:
        """Make ``method`` fail once, after letting ``skip`` calls of it through."""
        self.armed.setdefault(method, []).append((skip, kind))

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.real, name)
        if not callable(target):
            return target

        def call(uri: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            self.called.append((name, args))
            plans = self.armed.get(name)
            if plans:
                skip, kind = plans[0]
                if skip == 0:
                    plans.pop(0)
                    raise KINDS[kind](uri)
                plans[0] = (skip - 1, kind)
            return target(uri, *args, **kwargs)

        return call
