"""The API host as a Ceph client inside its own process: librbd through Ceph's Python
bindings (Debian's python3-rados and python3-rbd, linked into vmapi's virtualenv by
``make venv``: ``scripts/link-ceph-bindings.sh``), for what POST /vm waits for, a root
disk's clone of the image's protected snapshot grown to ``root_size``.

Why not the ``rbd`` tool here (:mod:`vmapi.hypervisor.rbd` keeps it for the rest): each
``rbd`` process starts, authenticates and fetches the cluster's maps before its first
operation (a clone took 57 ms, most of it that), and POST /vm waited for it. Here one
connection per process and cluster (made on first use, so after gunicorn forked its
workers; a forked child makes its own and never touches its parent's) serves every
clone, which is then a few round trips to the OSDs.

Bounds: a call into librados cannot be killed as a process is. Every connection is made
with Ceph's own timeouts set from the access's ``timeout`` (whole seconds, at least 1):
``client_mount_timeout`` for connecting, ``rados_mon_op_timeout`` and
``rados_osd_op_timeout`` for each operation, which then fails with ETIMEDOUT
(:class:`RbdTimeout`). A connection that failed so, or was shut down or blocklisted, is
dropped (shut down once no thread uses it) and the next call makes a new one; so is one
whose key file changed.

The key is read by librados from its file (the ``keyfile`` option), never passed as a
value; no ceph.conf and no keyring in /etc/ceph are read (``CEPH_ARGS`` in the
environment still is: librados reads it, the service's environment has none). Errors
are the tool client's classes (:class:`RbdBusy` for a name taken, :class:`RbdNotFound`,
:class:`RbdError` for a cluster out of reach: "couldn't connect to the cluster"), so the
services answer them as before.

Nothing here knows vmapi's database or Flask.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from vmapi.hypervisor.rbd import (
    CephAccess,
    RbdBusy,
    RbdClient,
    RbdError,
    RbdNotFound,
    RbdTimeout,
    _checked,
    _monitor,
)

try:  # Debian's python3-rados and python3-rbd, linked in by `make venv`
    import rados

    import rbd
except ImportError as exc:  # (said at the first use: an API host without rbd types runs)
    rados = rbd = None  # type: ignore[assignment]
    MISSING: str | None = str(exc)
else:
    MISSING = None

log = logging.getLogger(__name__)

#: errno values after which a connection is not used again (ESHUTDOWN is also Ceph's
#: EBLOCKLISTED: the cluster cut this client off)
_LOST = frozenset({errno.ETIMEDOUT, errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET})


class BindingsMissing(RbdError):
    """Ceph's Python bindings cannot be imported in vmapi's Python."""


def _seconds(timeout: float) -> str:
    """A bound as Ceph's timeouts take it: whole seconds, at least 1 (0 would be none)."""
    return str(max(1, math.ceil(timeout)))


def _stamp(path: str) -> tuple[int, int]:
    """What tells a changed key file (a rotated key): its inode and modification time."""
    try:
        found = os.stat(path)
    except OSError as exc:
        raise RbdError(f"the key file {path} cannot be read: {exc.strerror}") from None
    return found.st_ino, found.st_mtime_ns


@dataclass(eq=False)
class _Connection:
    cluster: Any  # rados.Rados, connected
    stamp: tuple[int, int]  # the key file's when it was made
    users: int = 0
    dropped: bool = False


@dataclass(eq=False)
class _Registry:
    """This process's connections, one per cluster access."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: dict[CephAccess, _Connection] = field(default_factory=dict)
    connecting: dict[CephAccess, threading.Lock] = field(default_factory=dict)
    #: the last failure to connect: when, and the error
    failed: dict[CephAccess, tuple[float, RbdError]] = field(default_factory=dict)

    def acquire(self, access: CephAccess) -> _Connection:
        stamp = _stamp(access.keyfile)
        with self.lock:
            found = self._current(access, stamp)
            if found is not None:
                return found
            gate = self.connecting.setdefault(access, threading.Lock())
        arrived = time.monotonic()
        with gate:  # one thread connects, the others wait for its connection
            with self.lock:
                found = self._current(access, stamp)
                if found is not None:
                    return found
                last = self.failed.get(access)
            if last is not None and last[0] >= arrived:
                # it failed while this thread waited: the same answer, not another wait
                # of the mount timeout
                raise type(last[1])(str(last[1]))
            try:
                made = _Connection(_connect(access), stamp)
            except RbdError as exc:
                self.failed[access] = (time.monotonic(), exc)
                raise
            with self.lock:
                old = self.connections.get(access)
                self.connections[access] = made
                made.users += 1
                if old is not None:
                    self._drop(old)
            return made

    def _current(self, access: CephAccess, stamp: tuple[int, int]) -> _Connection | None:
        found = self.connections.get(access)
        if found is None or found.stamp != stamp:
            return None
        found.users += 1
        return found

    def release(self, access: CephAccess, connection: _Connection, lost: bool) -> None:
        with self.lock:
            connection.users -= 1
            if lost and self.connections.get(access) is connection:
                del self.connections[access]
                self._drop(connection)
            elif connection.dropped and connection.users == 0:
                _shut_down(connection.cluster)

    @staticmethod
    def _drop(connection: _Connection) -> None:
        connection.dropped = True
        if connection.users == 0:
            _shut_down(connection.cluster)


_registry = _Registry()
#: the parent's connections in a forked child: kept referenced and never used (their
#: threads are not in the child; shutting them down there could hang)
_inherited: list[_Registry] = []


def _after_fork() -> None:
    global _registry
    _inherited.append(_registry)
    _registry = _Registry()


os.register_at_fork(after_in_child=_after_fork)


def _shut_down(cluster: Any) -> None:
    """Shut a dropped connection down beside the caller (it may wait for the cluster)."""
    threading.Thread(target=cluster.shutdown, daemon=True, name="vmapi-rados-shutdown").start()


def _connect(access: CephAccess) -> Any:
    if rados is None:
        raise BindingsMissing(
            f"Ceph's Python bindings cannot be imported ({MISSING}): the API host needs "
            "Debian's python3-rados and python3-rbd, linked into vmapi's virtualenv by "
            "`make venv` (scripts/link-ceph-bindings.sh)"
        )
    bound = _seconds(access.timeout)
    monitors = ",".join(_monitor(host, port) for host, port in access.monitors)
    conf = {"mon_host": monitors, "keyfile": access.keyfile, "keyring": "",
            "admin_socket": "", "log_file": "", "client_mount_timeout": bound,
            "rados_mon_op_timeout": bound, "rados_osd_op_timeout": bound}  # fmt: skip
    where = f"connecting to the Ceph cluster at {monitors} as client.{access.user}"
    try:
        cluster = rados.Rados(rados_id=access.user, conffile=None, conf=conf)
    except rados.Error as exc:
        raise RbdError(f"{where} failed: {exc}") from None
    try:
        cluster.connect()
    except rados.Error as exc:
        cluster.shutdown()
        # (the tool's words for it: what callers and operators already read)
        raise RbdError(f"{where} failed: couldn't connect to the cluster: {exc}") from None
    return cluster


def _failure(what: str, exc: Exception, timeout: float) -> RbdError:
    """The tool client's error class for a failed call of the bindings; ``lost`` set
    when the connection is not to be used again."""
    code = getattr(exc, "errno", None)
    message = f"{what} failed: {exc}"
    failure: RbdError
    if code == errno.ETIMEDOUT:
        failure = RbdTimeout(f"{what}: no answer within Ceph's timeout of "
                             f"{_seconds(timeout)} s", timeout)  # fmt: skip
    elif code == errno.EEXIST:
        failure = RbdBusy(f"{what} failed: the image exists ({exc})")
    elif code == errno.ENOENT:
        failure = RbdNotFound(message)
    elif code == errno.EBUSY:
        failure = RbdBusy(message)
    else:
        failure = RbdError(message)
    shut = isinstance(exc, rados.ConnectionShutdown | rbd.ConnectionShutdown)
    failure.lost = code in _LOST or shut
    return failure


class LibRbdClient:
    """Operations on one cluster as one user through this process's connection to it."""

    def __init__(self, access: CephAccess) -> None:
        self.access = access

    @contextmanager
    def _pool(self, pool: str, what: str) -> Iterator[Any]:
        """An I/O context on the pool, on the process's connection (made when there is
        none; dropped when a call on it failed as lost)."""
        registry = _registry
        connection = registry.acquire(self.access)
        lost = False
        try:
            try:
                ioctx = connection.cluster.open_ioctx(pool)
            except rados.Error as exc:
                failure = _failure(what, exc, self.access.timeout)
                if isinstance(failure, RbdNotFound):  # a missing pool is not a missing image
                    failure = RbdError(f"{what} failed: error opening pool {pool}: {exc}")
                    failure.lost = False
                raise failure from None
            try:
                yield ioctx
            finally:
                ioctx.close()
        except RbdError as exc:
            lost = getattr(exc, "lost", False)
            raise
        finally:
            registry.release(self.access, connection, lost)

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (rbd.Error, rados.Error) as exc:
            raise _failure(what, exc, self.access.timeout) from None

    def clone(self, pool: str, parent: str, snapshot: str, name: str, size: int) -> None:
        """Make ``name`` RBD's copy-on-write clone of ``parent@snapshot`` (a protected
        snapshot) and grow it to ``size`` bytes when that is more than the parent's, before
        anything opens it. On a failure to grow, the clone is removed again. ``RbdBusy``
        when ``name`` exists (left alone), ``RbdNotFound`` when the snapshot does not."""
        spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
        source = f"{pool}/{_checked('image', parent)}@{_checked('snapshot', snapshot)}"
        with self._pool(pool, f"cloning {source} to {spec}") as ioctx:
            self._call(f"cloning {source} to {spec}",
                       lambda: rbd.RBD().clone(ioctx, parent, snapshot, ioctx, name))  # fmt: skip
            try:
                self._call(f"growing {spec} to {size} bytes", lambda: _grow(ioctx, name, size))
            except BaseException as exc:
                RbdClient._undo(exc, [lambda: self._remove(ioctx, spec, name)], spec)
                raise

    def _remove(self, ioctx: Any, spec: str, name: str) -> None:
        with suppress(RbdNotFound):
            self._call(f"removing {spec}", lambda: rbd.RBD().remove(ioctx, name))


def _grow(ioctx: Any, name: str, size: int) -> None:
    with rbd.Image(ioctx, name) as image:
        if image.size() < size:
            image.resize(size, allow_shrink=False)
