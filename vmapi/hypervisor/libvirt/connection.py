"""One libvirt connection per URI per process, opened lazily, checked before reuse.

Why this shape (see DESIGN.md):
- gunicorn forks workers; a connection (or libvirt's event loop thread) inherited from
  the master is unusable, so the cache notices a new pid and starts empty.
- libvirt has no per-call timeout. Every call runs on a long-lived thread of its
  connection (:mod:`.channel`) and the request waits at most ``timeout`` seconds; a hung
  host then fails one request with a timeout instead of freezing a gunicorn worker. The
  timed-out connection is dropped from the cache (the next call opens a new one, with
  threads of its own), and keepalive (which needs libvirt's event loop running in a
  thread) makes libvirt itself close it so the thread stuck in the hung call ends too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable

import libvirt

from vmapi.hypervisor.errors import (
    DiskLeased,
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    NameTaken,
    NotSupported,
    OperationInvalid,
    PoolNotFound,
    UriRefused,
    VolumeExists,
    VolumeNotFound,
)
from vmapi.hypervisor.libvirt.channel import Channel, close_quietly
from vmapi.hypervisor.uri import UriPolicy, validate_libvirt_uri

__all__ = [
    "Channel",
    "ConnectionCache",
    "close_quietly",
    "connection_failure",
    "open_connection",
    "translate",
]

log = logging.getLogger(__name__)

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


_AUTH = {
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_CANCELLED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
}
_REFUSED_ERRNOS = {errno.ECONNREFUSED}
_TIMEOUT_ERRNOS = {errno.ETIMEDOUT}


def reason_class(exc: libvirt.libvirtError) -> str:
    """Why a connection failed, by libvirt's error code (and errno for system errors)."""
    code = exc.get_error_code()
    if code in _AUTH:
        return "auth_failed"
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return "timeout"
    if code == libvirt.VIR_ERR_SYSTEM_ERROR:
        number = exc.get_int1()
        if number in _REFUSED_ERRNOS:
            return "refused"
        if number in _TIMEOUT_ERRNOS:
            return "timeout"
    return "unreachable"


def connection_failure(uri: str, exc: libvirt.libvirtError) -> HypervisorUnavailable:
    """A failed connection as its reason class only: libvirt's text can quote a file it
    read (the test driver's XML errors, a remote ``name=``), so it goes to the log."""
    found = reason_class(exc)
    log.warning(
        "libvirt connection to %s failed (%s): %s", uri, found, exc.get_error_message() or exc
    )
    return HypervisorUnavailable(uri, found, found)


def translate(uri: str, exc: libvirt.libvirtError) -> HypervisorError:
    """Map a libvirt error onto the hypervisor package's exceptions by its error code."""
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return HypervisorTimeout(uri, 0)
    if code in _UNREACHABLE:
        return connection_failure(uri, exc)
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
    if code == libvirt.VIR_ERR_RESOURCE_BUSY and "Lockspace resource" in message:
        return DiskLeased(uri, message)  # "resource busy: Lockspace resource '<sha256>' is locked"
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


def refuse_unsafe(uri: str, policy: UriPolicy) -> None:
    """Raise :class:`UriRefused` unless ``policy`` lets vmapi (or a libvirtd it asks, as
    in a peer-to-peer migration) open ``uri``."""
    try:
        validate_libvirt_uri(uri, policy)
    except ValueError as exc:
        raise UriRefused(uri, f"not an acceptable libvirt URI: {exc}") from None


def open_connection(
    uri: str, keepalive_interval: int, keepalive_count: int, policy: UriPolicy | None = None
) -> libvirt.virConnect:
    """A new connection with keepalive, outside any cache (blocking: bound it by the caller).

    The cache's connections and the private ones of long streams (:mod:`.streams`) are
    opened alike. A URI ``policy`` (default: the strictest) refuses is never opened
    (:class:`UriRefused`); a failure to open answers its reason class only.
    """
    refuse_unsafe(uri, policy or UriPolicy())
    _event_loop.ensure_running()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise connection_failure(uri, exc) from None
    if conn is None:  # older bindings return None instead of raising
        raise HypervisorUnavailable(uri, "unreachable")
    # Local drivers (test, qemu:///system over unix) have no keepalive.
    with contextlib.suppress(libvirt.libvirtError):
        conn.setKeepAlive(keepalive_interval, keepalive_count)
    return conn


class ConnectionCache:
    """Per-process cache of open libvirt connections, keyed by URI: a :class:`Channel`
    each (the connection and the threads that make its calls)."""

    def __init__(
        self, keepalive_interval: int = 5, keepalive_count: int = 3, policy: UriPolicy | None = None
    ) -> None:
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        #: which URIs may be opened at all (built from the configuration by create_app)
        self.policy = policy or UriPolicy()
        self._pid = os.getpid()
        self._channels: dict[str, Channel] = {}
        self._lock = threading.Lock()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            # Inherited channels belong to the parent (their threads did not come along);
            # forget them without closing.
            self._channels = {}
            self._lock = threading.Lock()
            self._pid = os.getpid()

    def opener(self, uri: str) -> Callable[[], libvirt.virConnect]:
        """Opens a new connection to ``uri`` like the cache's (blocking: bound it)."""
        interval, count, policy = self.keepalive_interval, self.keepalive_count, self.policy
        return lambda: open_connection(uri, interval, count, policy)

    def check(self, uri: str) -> None:
        """Raise :class:`UriRefused` unless this cache's policy allows ``uri``."""
        refuse_unsafe(uri, self.policy)

    def channel(self, uri: str, timeout: float) -> Channel:
        """The channel of a live connection to ``uri``; opens one (bounded by ``timeout``)
        if needed."""
        self._check_fork()
        channel = self._channels.get(uri)
        if channel is not None:
            # virConnectIsAlive looks at local state only and never blocks: no thread.
            try:
                if channel.conn is not None and channel.conn.isAlive():
                    return channel
            except libvirt.libvirtError:
                pass
            self.drop(uri, channel)
        opened = Channel.open(uri, self.opener(uri), timeout)
        with self._lock:
            # threads calling several nodes of one URI at once (an array's node threads)
            # may each have opened one: the first cached is kept, the others closed
            channel = self._channels.setdefault(uri, opened)
        if channel is not opened:
            opened.close(wait=False)
        return channel

    def get(self, uri: str, timeout: float) -> libvirt.virConnect:
        """An open, live connection to ``uri`` (the cached channel's)."""
        return self.channel(uri, timeout).conn

    def drop(self, uri: str, channel: Channel | None = None) -> None:
        """Forget (and close, without waiting) the connection to ``uri`` - only if it is
        still ``channel``, when given (another thread may have replaced it already)."""
        self._check_fork()
        with self._lock:
            current = self._channels.get(uri)
            if current is None or (channel is not None and current is not channel):
                return
            del self._channels[uri]
        current.close(wait=False)

    def clear(self) -> None:
        """Close every connection of this process (tests, shutdown)."""
        self._check_fork()
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
