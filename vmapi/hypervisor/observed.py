"""A driver wrapper that times every hypervisor action and tells a listener.

It wraps any :class:`~vmapi.hypervisor.HypervisorDriver` (the libvirt one, or a test's
fault injector) without knowing what the listener does with it (vmapi logs a JSON line
and updates its metrics: :mod:`vmapi.telemetry`). Plain Python: no Flask, no models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vmapi.hypervisor.specs import DomainSpec

#: actions that answer an iterator: timed until it is exhausted, fails or is closed
STREAM_ACTIONS = frozenset({"download_volume"})

#: actions whose second argument is a domain name
DOMAIN_ACTIONS = frozenset({
    "start", "shutdown", "destroy", "undefine", "suspend", "resume", "reboot", "domain",
    "set_vcpus_live", "set_memory_live", "set_cputune_live", "attach_disk_live",
    "detach_disk_live", "set_iotune_live", "resize_disk_live", "migrate", "last_migration",
    "set_display_password", "display", "copy_disk_live", "abort_disk_copy",
})  # fmt: skip


@dataclass(frozen=True)
class Action:
    """One finished hypervisor call."""

    node: str  # the host part of the libvirt URI (the URI itself when it has none)
    action: str
    domain: str | None
    seconds: float
    error: str | None  # None: it worked; else the exception's class name
    #: a migration's destination, as ``node`` is written (None for every other action)
    target: str | None = None


def node_of(uri: str) -> str:
    return urlsplit(uri).hostname or uri


def target_of(action: str, args: tuple[Any, ...]) -> str | None:
    if action == "migrate" and len(args) > 1 and isinstance(args[1], str):
        return node_of(args[1])
    return None


def domain_of(action: str, args: tuple[Any, ...]) -> str | None:
    if args and isinstance(args[0], DomainSpec):
        return args[0].name
    if action in DOMAIN_ACTIONS and args and isinstance(args[0], str):
        return args[0]
    return None


class ObservedDriver:
    """Every public method of ``inner`` whose first argument is a libvirt URI, timed."""

    def __init__(self, inner: Any, listener: Callable[[Action], None]) -> None:
        self._inner = inner
        self._listener = listener

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if name.startswith("_") or not callable(target):
            return target

        def report(uri: str, args: tuple[Any, ...], started: float, error: str | None) -> None:
            self._listener(Action(node_of(uri), name, domain_of(name, args),
                                  time.perf_counter() - started, error,
                                  target_of(name, args)))  # fmt: skip

        def observed(uri: str, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            error = None
            streaming = False
            try:
                result = target(uri, *args, **kwargs)
                if name in STREAM_ACTIONS:
                    streaming = True
                    return _Timed(result, lambda error: report(uri, args, started, error))
                return result
            except Exception as exc:  # HypervisorError mostly; reported, then re-raised
                error = type(exc).__name__
                raise
            finally:
                if not streaming:
                    report(uri, args, started, error)

        observed.__name__ = name
        return observed


class _Timed(Iterator[Any]):
    """``chunks``, calling ``done`` once: when they end, fail, or the reader closes them."""

    def __init__(self, chunks: Iterator[Any], done: Callable[[str | None], None]) -> None:
        self._chunks = chunks
        self._done: Callable[[str | None], None] | None = done

    def _finish(self, error: str | None) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(error)

    def __next__(self) -> Any:
        try:
            return next(self._chunks)
        except StopIteration:
            self._finish(None)
            raise
        except Exception as exc:
            self._finish(type(exc).__name__)
            raise

    def close(self) -> None:
        """Stop early: the stream underneath is closed too."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._finish(None)
