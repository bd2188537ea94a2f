"""One libvirt connection and the long-lived threads that make its calls, each bounded.

Why this shape (see DESIGN.md and docs/benchmarks-history.md, issue 17):
- libvirt has no per-call timeout and a blocking C call cannot be interrupted, so a call
  runs on another thread while the caller waits at most ``timeout`` seconds. vmapi first
  started a new thread for every call; here a connection keeps its threads and hands
  them call after call (a put on the thread's queue, a lock released when it is done).
- A call never waits behind another one: it goes to an idle thread of the connection, or
  to a new thread when every one is busy (a slow call, a hung one, another request
  thread's). A channel thus has as many threads as it ever had calls in flight at once -
  one in a sync gunicorn worker - and a thread idle for ``IDLE_SECONDS`` ends. Long
  transfers (volume streams, migrations) never come here: they have connections and
  threads of their own (:mod:`.streams`, the driver's ``migrate``).
- A channel that timed out is closed by its owner: its idle threads end at once, a busy
  (hung) one ends when libvirt gives its call back - keepalive closes a connection whose
  host stopped answering - and the next call gets a new channel: a new connection with
  new threads, never stuck behind the hung one.
- Nothing here survives a fork usefully (threads do not); the cache of channels
  (:class:`.connection.ConnectionCache`) starts empty in a child.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import libvirt

from vmapi.hypervisor.errors import HypervisorTimeout, HypervisorUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A thread with nothing to do for this long ends (a busy channel keeps its threads).
IDLE_SECONDS = 60.0
#: Idle threads kept by the whole process, all channels together: a sweep over a large
#: fleet (reconcile, node checks) would otherwise leave one idle thread per node behind
#: for IDLE_SECONDS. Past it a thread ends after its call, as in a thread per call.
MAX_IDLE_THREADS = 64


class _IdleCount:
    """Idle threads of this process (a child of a fork has none)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = 0

    def take(self) -> bool:
        with self.lock:
            if self.value >= MAX_IDLE_THREADS:
                return False
            self.value += 1
            return True

    def give_back(self, n: int = 1) -> None:
        with self.lock:
            self.value -= n

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.value = 0


_idle_count = _IdleCount()
os.register_at_fork(after_in_child=_idle_count.reset)


class _Call(Generic[T]):
    """One call handed to a thread; ``done`` is held until its outcome is set."""

    __slots__ = ("done", "error", "fn", "value")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        # A bare lock is the cheapest one-shot signal CPython has (an Event or a Future
        # is a Condition over one): acquired here, released by the thread that ran it.
        self.done = threading.Lock()
        self.done.acquire()
        self.value: T | None = None
        self.error: BaseException | None = None


class _Worker:
    """A thread of a channel, taking calls from its own queue."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"libvirt {channel.uri}",
                                       daemon=True)  # fmt: skip

    def _run(self) -> None:
        channel = self.channel
        while True:
            try:
                call = self.calls.get(timeout=channel.idle_seconds)
            except queue.Empty:
                if channel._retire(self):
                    return
                continue  # taken for a call just now: it is on its way
            if call is None:
                return
            try:
                call.value = call.fn()
            except BaseException as exc:  # handed back to the waiting caller
                call.error = exc
            # Idle again before the caller learns the outcome, so the caller's next call
            # finds this thread instead of starting another.
            keep = channel._rest(self)
            call.done.release()
            del call
            if not keep:
                return


class Channel:
    """A libvirt connection (``conn``) and the threads that call it."""

    def __init__(self, uri: str, idle_seconds: float = IDLE_SECONDS) -> None:
        self.uri = uri
        self.idle_seconds = idle_seconds
        self.conn: libvirt.virConnect | None = None
        #: answers worth keeping while this connection lives (the driver's pool dirs)
        self.memo: dict[object, Any] = {}
        #: threads this channel ever started (tests, the benchmark)
        self.threads_started = 0
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._closed = False

    @classmethod
    def open(cls, uri: str, opener: Callable[[], libvirt.virConnect], timeout: float) -> Channel:
        """A channel whose connection ``opener`` made on the channel's first thread."""
        channel = cls(uri)
        try:
            channel.conn = channel.run(timeout, opener)
        except BaseException:
            channel.close(wait=False)
            raise
        return channel

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, timeout: float, fn: Callable[[libvirt.virConnect], T]) -> T:
        """``fn(conn)`` on a thread of the channel; :class:`HypervisorTimeout` after
        ``timeout`` seconds (the call goes on, its outcome is dropped). libvirt's own
        errors are raised as they are: the caller translates them."""
        conn = self.conn
        if conn is None:  # closed by another thread meanwhile (it timed out, or failed)
            raise HypervisorUnavailable(self.uri, "the connection was closed")
        return self.run(timeout, lambda: fn(conn))

    def run(self, timeout: float, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread of the channel, bounded like :meth:`call`."""
        call: _Call[T] = _Call(fn)
        fresh = None
        with self._lock:
            if self._idle:
                worker = self._idle.pop()  # the one that rested last: warm, and the
                _idle_count.give_back()  # others may reach their idle time and end
            else:
                worker = fresh = _Worker(self)
                self.threads_started += 1
        worker.calls.put(call)
        if fresh is not None:
            fresh.thread.start()
        if not call.done.acquire(timeout=timeout):
            raise HypervisorTimeout(self.uri, timeout)
        if call.error is not None:
            error, call.error = call.error, None
            raise error
        return call.value  # type: ignore[return-value]

    def close(self, wait: bool = True) -> None:
        """Close the connection and end the threads; a busy thread ends when its call
        returns. ``wait=False`` never blocks (a call may hang on the connection: libvirt
        would make the close wait for it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            _idle_count.give_back(len(idle))
        conn, self.conn = self.conn, None
        self.memo = {}
        for worker in idle:
            worker.calls.put(None)
        if conn is None:
            return
        if wait:
            close_quietly(conn)
        else:
            threading.Thread(target=close_quietly, args=(conn,), daemon=True,
                             name=f"libvirt-close {self.uri}").start()  # fmt: skip

    def _rest(self, worker: _Worker) -> bool:
        """Back among the idle; False when the channel is closed (the thread ends)."""
        with self._lock:
            if self._closed or not _idle_count.take():
                return False
            self._idle.append(worker)
            return True

    def _retire(self, worker: _Worker) -> bool:
        """Leave after ``idle_seconds`` without a call, unless just taken for one."""
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                _idle_count.give_back()
                return True
            return False


def close_quietly(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        log.debug("closing a libvirt connection failed", exc_info=True)
