"""The image store: a directory of image files (``VMAPI_IMAGE_DIR``).

An upload is written, chunk by chunk, to a temporary file ``.upload-<image id>-<random>``
in the store, hashed (sha256) and counted as it arrives, never held whole in memory;
an accepted one is renamed to its final name ``image-<image id>-<random>``, so a file
under a final name is always complete. What a failed upload wrote is removed; what a
killed worker left (a temporary file nobody writes to any more) is swept by the next
upload. Nothing here knows HTTP or the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

TEMP_PREFIX = ".upload-"
FINAL_PREFIX = "image-"
#: a temporary file untouched this long belongs to no live upload (a stalled one is
#: killed at the worker timeout, far sooner)
STALE_AFTER = 3600.0
#: the page cache is flushed to disk every this many bytes, so the flush before the
#: rename is short whatever the file's size
SYNC_EVERY = 64 * 1024**2
READ_CHUNK = 1024**2


class UploadTooLarge(Exception):
    """More bytes arrived than the limit allows."""


class UploadTruncated(Exception):
    """The body ended before the announced length, or broke off (``expected`` None: a
    chunked body whose connection failed)."""

    def __init__(self, received: int, expected: int | None) -> None:
        if expected is None:
            reason = f"the upload broke off after {received} bytes"
        else:
            reason = f"the upload ended after {received} of {expected} bytes"
        super().__init__(reason)
        self.received = received
        self.expected = expected


class TransferTooSlow(UploadTruncated):
    """The transfer averaged below the minimum rate once past its grace period; it is
    cut (and, an upload, cleaned up as one that broke off)."""

    def __init__(self, moved: int, seconds: float, minimum: int) -> None:
        Exception.__init__(
            self,
            f"the transfer averaged {moved / seconds:.0f} bytes/s over {seconds:.1f} s, below "
            f"the minimum of {minimum} bytes/s (VMAPI_TRANSFER_MIN_RATE)",
        )
        self.received = moved
        self.expected = None


class Pace:
    """The average rate of one transfer, checked against a minimum after a grace period
    (a client that crawls must not hold a worker; 0: no minimum)."""

    def __init__(self, minimum: int, grace: float) -> None:
        self.minimum = minimum
        self.grace = grace
        self.began = time.monotonic()
        self.moved = 0

    def moved_bytes(self, count: int) -> None:
        """Count ``count`` more bytes moved; :class:`TransferTooSlow` when the average is
        below the minimum."""
        self.moved += count
        seconds = time.monotonic() - self.began
        if self.minimum > 0 and seconds >= self.grace and self.moved < self.minimum * seconds:
            raise TransferTooSlow(self.moved, seconds, self.minimum)


@dataclass(frozen=True)
class Received:
    """A complete upload in a temporary file."""

    path: str
    size: int
    sha256: str


def receive(
    chunks: Iterable[bytes], directory: str, image_id: int, limit: int, expected: int | None
) -> Received:
    """Write ``chunks`` to a new temporary file in ``directory``: at most ``limit`` bytes
    (:class:`UploadTooLarge` beyond), exactly ``expected`` when it is known
    (:class:`UploadTruncated` when fewer came). Nothing is left behind on failure.

    Each chunk is hashed and written by a thread of its own while the next one arrives
    (receiving, hashing and writing all release the GIL), one chunk in flight at most."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{TEMP_PREFIX}{image_id}-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    writer = _Writer(fd)
    size = 0
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="image-upload") as pool:
            pending: Future | None = None
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise UploadTooLarge()
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write, chunk)
            if pending is not None:
                pending.result()
        if expected is not None and size < expected:
            raise UploadTruncated(size, expected)
        os.fsync(fd)
    except BaseException:
        os.close(fd)  # the pool has finished (leaving its block waits for it)
        remove(path)
        raise
    os.close(fd)
    return Received(path, size, writer.digest.hexdigest())


class _Writer:
    """Hashes and writes the chunks of one upload, flushing to disk every SYNC_EVERY."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.digest = hashlib.sha256()
        self.unsynced = 0

    def write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]
        self.unsynced += len(chunk)
        if self.unsynced >= SYNC_EVERY:
            os.fdatasync(self.fd)
            self.unsynced = 0


def publish(received: Received, directory: str, image_id: int) -> str:
    """Rename a checked upload to its final name (durably); that name."""
    name = f"{FINAL_PREFIX}{image_id}-{secrets.token_hex(8)}"
    os.rename(received.path, os.path.join(directory, name))
    _sync_directory(directory)
    return name


def remove(path: str) -> None:
    """Delete a file of the store; one already gone is fine, another failure is logged
    (the answer stands: the row decides what exists)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.exception("could not remove %s from the image store", path)


def sweep_stale(directory: str, older_than: float = STALE_AFTER) -> list[str]:
    """Remove temporary files no upload has written to for ``older_than`` seconds (left
    by a killed worker); their names."""
    swept = []
    cutoff = time.time() - older_than
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    remove(entry.path)
                    swept.append(entry.name)
    return swept


def read_chunks(handle: BinaryIO, size: int = READ_CHUNK) -> Iterator[bytes]:
    """An open image file in chunks, closed at the end (or when the reader stops)."""
    try:
        while chunk := handle.read(size):
            yield chunk
    finally:
        handle.close()


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
