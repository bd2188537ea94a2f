"""One libvirt connection per URI per process, opened lazily, checked before reuse.

Why this shape (see DESIGN.md):
- gunicorn forks workers; a connection (or libvirt's event loop thread) inherited from
  the master is unusable, so the cache notices a new pid and starts empty.
- libvirt has no per-call timeout. Every call runs in a helper thread and the request
  waits at most ``timeout`` seconds; a hung host then fails one request with a timeout
  instead of freezing a gunicorn worker. The timed-out connection is dropped from the
  cache, and keepalive (which needs libvirt's event loop running in a thread) makes
  libvirt itself close it so the abandoned helper thread ends too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import libvirt

from vmapi.hypervisor.driver import (
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    NameTaken,
    NotSupported,
    OperationInvalid,
    PoolNotFound,
    VolumeExists,
    VolumeNotFound,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# libvirt prints every error to stderr by default; ours are raised and translated instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# Errors that mean "could not talk to the host" rather than "the host said no".
_UNREACHABLE = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_CANCELLED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    libvirt.VIR_ERR_INVALID_CONN,
}
# "Already exists": the codes some drivers use; others (QEMU, the test driver) answer
# "operation failed: domain 'x' already exists with uuid ..." or "storage vol already
# exists". "is already defined with uuid" (the UUID taken under another name) is not this.
_EXISTS = {libvirt.VIR_ERR_DOM_EXIST, libvirt.VIR_ERR_STORAGE_VOL_EXIST}
_NOT_SUPPORTED = {
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
}


def translate(uri: str, exc: libvirt.libvirtError) -> HypervisorError:
    """Map a libvirt error onto the hypervisor package's exceptions by its error code."""
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return HypervisorTimeout(uri, 0)
    if code in _UNREACHABLE:
        return HypervisorUnavailable(uri, message)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(uri, message)
    if code == libvirt.VIR_ERR_NO_STORAGE_VOL:
        return VolumeNotFound(uri, message)
    if code == libvirt.VIR_ERR_NO_STORAGE_POOL:
        return PoolNotFound(uri, message)
    if code in _EXISTS or (
        code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in message
    ):
        return (
            VolumeExists(uri, message)
            if code == libvirt.VIR_ERR_STORAGE_VOL_EXIST
            else NameTaken(uri, message)
        )
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return OperationInvalid(uri, message)
    if code in _NOT_SUPPORTED:
        return NotSupported(uri, message)
    return HypervisorError(uri, message)


class _EventLoop:
    """libvirt's default event loop in a daemon thread; needed for keepalive."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.lock = threading.Lock()

    def ensure_running(self) -> None:
        with self.lock:
            if self.pid == os.getpid():
                return
            libvirt.virEventRegisterDefaultImpl()
            thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)
            thread.start()
            self.pid = os.getpid()

    @staticmethod
    def _run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


_event_loop = _EventLoop()


def call_with_timeout(uri: str, timeout: float, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a helper thread; raise :class:`HypervisorTimeout` after ``timeout`` s."""
    outcome: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed back to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"libvirt-call {uri}", daemon=True).start()
    if not done.wait(timeout):
        raise HypervisorTimeout(uri, timeout)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def open_connection(uri: str, keepalive_interval: int, keepalive_count: int) -> libvirt.virConnect:
    """A new connection with keepalive, outside any cache (blocking: bound it by the caller).

    The cache's connections and the private ones of long streams (:mod:`.streams`) are
    opened alike.
    """
    _event_loop.ensure_running()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorUnavailable(uri, exc.get_error_message() or str(exc)) from exc
    if conn is None:  # older bindings return None instead of raising
        raise HypervisorUnavailable(uri, "libvirt returned no connection")
    # Local drivers (test, qemu:///system over unix) have no keepalive.
    with contextlib.suppress(libvirt.libvirtError):
        conn.setKeepAlive(keepalive_interval, keepalive_count)
    return conn


class ConnectionCache:
    """Per-process cache of open libvirt connections, keyed by URI."""

    def __init__(self, keepalive_interval: int = 5, keepalive_count: int = 3) -> None:
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self._pid = os.getpid()
        self._conns: dict[str, libvirt.virConnect] = {}
        self._lock = threading.Lock()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            # Inherited connections belong to the parent; forget them without closing.
            self._conns = {}
            self._lock = threading.Lock()
            self._pid = os.getpid()

    def get(self, uri: str, timeout: float) -> libvirt.virConnect:
        """An open, live connection to ``uri``; opens one (bounded by ``timeout``) if needed."""
        self._check_fork()
        with self._lock:
            conn = self._conns.get(uri)
        if conn is not None:
            # virConnectIsAlive looks at local state only and never blocks, so it needs no
            # helper thread (it was one per libvirt call).
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
            self.drop(uri)
        interval, count = self.keepalive_interval, self.keepalive_count
        conn = call_with_timeout(uri, timeout, lambda: open_connection(uri, interval, count))
        with self._lock:
            # Threads calling several nodes of one URI at once (an array's node threads)
            # may each have opened one: the first cached is kept, the others closed.
            cached = self._conns.setdefault(uri, conn)
        if cached is not conn:
            threading.Thread(target=close_quietly, args=(conn,), daemon=True).start()
        return cached

    def drop(self, uri: str) -> None:
        """Forget (and close, without waiting) the connection to ``uri``."""
        self._check_fork()
        with self._lock:
            conn = self._conns.pop(uri, None)
        if conn is not None:
            threading.Thread(target=close_quietly, args=(conn,), daemon=True).start()

    def clear(self) -> None:
        """Close every connection of this process (tests, shutdown)."""
        self._check_fork()
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            close_quietly(conn)


def close_quietly(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        log.debug("closing a libvirt connection failed", exc_info=True)
