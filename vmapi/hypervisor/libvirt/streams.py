"""Volume streams (upload, download) on connections of their own, bounded in total time.

Why this shape:
- Copying an image takes far longer than an ordinary call's timeout and must not hold up
  other calls to the same host, so each transfer opens its own connection (closed at the
  end) instead of borrowing the cached one, and has its own deadline.
- One helper thread owns that connection and its stream, so no libvirt object is used
  from two threads at once. The caller's thread only passes chunks through a small queue
  (memory stays at a few chunks whatever the size) and watches the deadline; the chunk
  iterator runs in the caller's thread, where its file or request belongs.
- On failure or timeout the helper aborts the stream and deletes what it created. If the
  helper is stuck inside libvirt (a hung host), the caller deletes the volume through the
  ordinary connection instead, and the helper undoes its own work when it wakes up.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import libvirt

from vmapi.hypervisor.errors import HypervisorError, HypervisorTimeout
from vmapi.hypervisor.libvirt.config import Volume
from vmapi.hypervisor.libvirt.connection import close_quietly, translate
from vmapi.hypervisor.specs import CHUNK_SIZE

log = logging.getLogger(__name__)

#: Chunks in flight between the caller and the helper thread (memory: this x CHUNK_SIZE).
QUEUE_CHUNKS = 4
#: How often a thread waiting on the queue looks whether the other side gave up.
POLL = 0.1

Opener = Callable[[], libvirt.virConnect]

_END = object()
_ABORT = object()


class _Expired(Exception):
    """The helper's own view of the deadline."""


def _hypervisor_error(uri: str, exc: BaseException, timeout: float) -> BaseException:
    """What the caller raises for an exception of the helper thread."""
    if isinstance(exc, libvirt.libvirtError):
        error = translate(uri, exc)
        return HypervisorTimeout(uri, timeout) if isinstance(error, HypervisorTimeout) else error
    if isinstance(exc, _Expired):
        return HypervisorTimeout(uri, timeout)
    return exc


def abort_quietly(stream: libvirt.virStream) -> None:
    try:
        stream.abort()
    except libvirt.libvirtError:
        log.debug("aborting a libvirt stream failed", exc_info=True)


def delete_volume(pool: libvirt.virStoragePool, name: str) -> None:
    """Delete ``name`` from ``pool``, looking again once after "no such volume".

    libvirtd refreshes a pool in the background when an upload stream closes; a delete that
    runs into that refresh can unlink the file and still answer "no storage vol", or find
    the volume list being rebuilt. Whether the file is gone is decided by a fresh look.
    """
    for attempt in range(2):
        try:
            pool.storageVolLookupByName(name).delete(0)
            return
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL or attempt:
                raise
        try:
            pool.refresh(0)
        except libvirt.libvirtError:  # busy building another volume: look without it
            log.debug("refreshing pool %s failed", pool.name(), exc_info=True)
        try:
            pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return
            raise


def send_all(uri: str, stream: libvirt.virStream, data: bytes) -> None:
    offset = 0
    while offset < len(data):
        # (a slice of a whole bytes object is that object: no copy for ordinary chunks)
        sent = stream.send(data[offset : offset + CHUNK_SIZE])
        if sent < 0:  # -2 is "would block", only for non-blocking streams
            raise HypervisorError(uri, f"stream send answered {sent}")
        offset += sent


class _Uploader(threading.Thread):
    """The helper thread of one upload: connection, volume, stream, chunks from the queue."""

    def __init__(self, uri: str, opener: Opener, pool: str, name: str, size: int,
                 deadline: float) -> None:  # fmt: skip
        super().__init__(name=f"libvirt-upload {pool}/{name}", daemon=True)
        self.uri, self.opener, self.pool, self.name, self.size, self.deadline = (
            uri, opener, pool, name, size, deadline)  # fmt: skip
        self.chunks: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.lock = threading.Lock()
        self.cancelled = False
        self.touched = False  # the volume may exist because of us (createXML was called)
        self.leftover = False  # it exists and could not be deleted
        self.error: BaseException | None = None
        self.path: str | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        conn = stream = pool = None
        created = False
        try:
            conn = self.opener()
            pool = conn.storagePoolLookupByName(self.pool)
            with self.lock:
                if self.cancelled:
                    raise _Expired
                self.touched = True
            # A sparse file of the stream's exact length: the bytes land as they come, so
            # the copy's checksum is the source's (a qcow2 made by libvirt would leave its
            # own header bytes past the end of a shorter image).
            vol = pool.createXML(Volume(self.name, self.size, "raw", allocation=0).to_xml(), 0)
            created = True
            stream = conn.newStream(0)
            vol.upload(stream, 0, self.size, 0)
            while True:
                item = self._next()
                if item is _END:
                    stream.finish()
                    stream = None
                    path = vol.path()
                    with self.lock:  # the caller may have given up meanwhile: undo then
                        if self.cancelled:
                            raise _Expired
                        self.path = path
                    return
                send_all(self.uri, stream, item)  # type: ignore[arg-type]
        except BaseException as exc:
            self.error = exc
            if stream is not None:
                abort_quietly(stream)
            if created and pool is not None:
                self._delete_partial(pool)
        finally:
            if conn is not None:
                close_quietly(conn)
            self.finished.set()

    def _next(self) -> object:
        while True:
            with self.lock:
                if self.cancelled:
                    raise _Expired
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise _Expired
            try:
                item = self.chunks.get(timeout=min(remaining, POLL))
            except queue.Empty:
                continue
            if item is _ABORT:
                raise _Expired
            return item

    def _delete_partial(self, pool: libvirt.virStoragePool) -> None:
        try:
            delete_volume(pool, self.name)
        except libvirt.libvirtError:
            self.leftover = True
            log.warning("could not delete the partial volume %s/%s", self.pool, self.name,
                        exc_info=True)  # fmt: skip

    def put(self, item: object, deadline: float) -> bool:
        """Hand ``item`` over; False when the helper has finished or the deadline passed."""
        while not self.finished.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                self.chunks.put(item, timeout=min(remaining, POLL))
                return True
            except queue.Full:
                continue
        return False

    def cancel(self, wait: float) -> bool:
        """Stop the helper; True when it has finished and left nothing behind."""
        with self.lock:
            self.cancelled = True
        while True:  # make room for the abort marker whatever the helper is doing
            try:
                self.chunks.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):
            self.chunks.put_nowait(_ABORT)
        return self.finished.wait(wait) and not self.leftover


def upload(
    uri: str,
    pool: str,
    name: str,
    size: int,
    chunks: Iterable[bytes],
    timeout: float,
    *,
    opener: Opener,
    cleanup_wait: float,
    delete: Callable[[], None],
) -> str:
    """Create ``pool/name`` of ``size`` bytes and stream ``chunks`` into it; its path.

    ``delete`` removes the volume through another connection when the helper cannot
    (``cleanup_wait`` seconds after being told to stop).
    """
    deadline = time.monotonic() + timeout
    helper = _Uploader(uri, opener, pool, name, size, deadline)
    helper.start()
    try:
        sent = 0
        for chunk in chunks:
            sent += len(chunk)
            if sent > size:
                raise HypervisorError(uri, f"the stream for {name} is longer than {size} bytes")
            if not helper.put(chunk, deadline):
                break
        else:
            if sent != size:
                raise HypervisorError(
                    uri, f"the stream for {name} ended after {sent} of {size} bytes"
                )
            if helper.put(_END, deadline):
                helper.finished.wait(max(deadline - time.monotonic(), 0))
        with helper.lock:  # finished in time, or never: decided once, with the helper
            if helper.path is not None:
                return helper.path
            helper.cancelled = True
        if helper.error is not None:
            raise _hypervisor_error(uri, helper.error, timeout)
        raise HypervisorTimeout(uri, timeout)
    except BaseException:
        if not helper.cancel(cleanup_wait) and helper.touched:
            log.warning("upload of %s/%s on %s: deleting the partial volume from outside",
                        pool, name, uri)  # fmt: skip
            try:
                delete()
            except HypervisorError:  # the first error is the answer; this one is logged
                log.warning("could not delete the partial volume %s/%s on %s", pool, name,
                            uri, exc_info=True)  # fmt: skip
        raise


class VolumeReader(Iterator[bytes]):
    """A volume's bytes in chunks from a helper thread with its own connection."""

    def __init__(self, uri: str, pool: str, name: str, offset: int, length: int,
                 timeout: float, opener: Opener) -> None:  # fmt: skip
        self.uri, self.pool, self.name, self.timeout = uri, pool, name, timeout
        self.offset, self.length, self.opener = offset, length, opener
        self.deadline = time.monotonic() + timeout
        self.chunks: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.stop = threading.Event()
        self.done = False
        threading.Thread(target=self._run, name=f"libvirt-download {pool}/{name}",
                         daemon=True).start()  # fmt: skip

    def _run(self) -> None:
        conn = stream = None
        try:
            conn = self.opener()
            vol = conn.storagePoolLookupByName(self.pool).storageVolLookupByName(self.name)
            stream = conn.newStream(0)
            vol.download(stream, self.offset, self.length, 0)
            while not self.stop.is_set():
                data = stream.recv(CHUNK_SIZE)
                if not isinstance(data, bytes):  # -2: "would block", non-blocking only
                    raise HypervisorError(self.uri, f"stream receive answered {data}")
                if not data:
                    stream.finish()
                    stream = None
                    self._put(_END)
                    return
                if not self._put(data):
                    return  # the reader is gone or out of time: abort below
        except BaseException as exc:
            self._put(exc)
        finally:
            if stream is not None:
                abort_quietly(stream)
            if conn is not None:
                close_quietly(conn)

    def _put(self, item: object) -> bool:
        # The reader may stop reading (closed, timed out, dropped): give up then, never
        # block on it nor read on for nobody.
        while not self.stop.is_set() and time.monotonic() < self.deadline + POLL:
            try:
                self.chunks.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> bytes:
        if self.done:
            raise StopIteration
        remaining = self.deadline - time.monotonic()
        try:
            item = self.chunks.get(timeout=max(remaining, 0))
        except queue.Empty:
            self.close()
            raise HypervisorTimeout(self.uri, self.timeout) from None
        if item is _END:
            self.done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise _hypervisor_error(self.uri, item, self.timeout) from item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop reading; the helper aborts the stream and closes its connection."""
        self.done = True
        self.stop.set()

    def __del__(self) -> None:
        self.stop.set()
