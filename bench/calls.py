"""Issue 17, the cost of one bounded libvirt call: a cheap call (``getLibVersion``) made
through each way of bounding it, on the test driver in-process (``test:///default``) and
through libvirtd (``test+unix:///default``).

- ``inline``: the call on the caller's thread, unbounded: the floor;
- ``thread per call``: what vmapi did before issue 17 (a new helper thread per call,
  the caller waits on an Event with the timeout), copied here as it was;
- ``channel``: what vmapi does now (:mod:`vmapi.hypervisor.libvirt.channel`: long-lived
  threads, an idle one per call or a new one when all are busy);
- ``one worker``: a single thread per connection with a queue in front of it
  (``ThreadPoolExecutor(max_workers=1)``, a Future per call): the other shape considered.

Sequential: CALLS calls from one thread. Concurrent: CALLERS threads at once sharing the
connection (gunicorn threads, an array's per-node threads when nodes share a URI).
Behind a slow call: one thread makes SLOW_CALLS calls that take SLOW_SECONDS each (a
define, a console-log tail) while another makes cheap ones; the cheap calls' latency.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvirt

from vmapi.hypervisor.errors import HypervisorTimeout
from vmapi.hypervisor.libvirt.channel import Channel
from vmapi.hypervisor.libvirt.connection import open_connection

URIS = ("test:///default", "test+unix:///default")
CALLS = 10_000
CALLERS = 4
ROUNDS = 2
SLOW_SECONDS = 0.05
SLOW_CALLS = 20
TIMEOUT = 10.0


def thread_per_call(uri: str, timeout: float, fn: Callable[[], Any]) -> Any:
    """vmapi's ``call_with_timeout`` before issue 17, as it was."""
    outcome: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"libvirt-call {uri}", daemon=True).start()
    if not done.wait(timeout):
        raise HypervisorTimeout(uri, timeout)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


class Paths:
    """The four ways of making a call on one connection to ``uri``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.channel = Channel.open(uri, lambda: open_connection(uri, 5, 3), TIMEOUT)
        self.conn: libvirt.virConnect = self.channel.conn
        self.single = ThreadPoolExecutor(max_workers=1, thread_name_prefix="one-worker")

    def ways(self) -> dict[str, Callable[[Callable[[libvirt.virConnect], Any]], Any]]:
        conn, uri = self.conn, self.uri
        return {
            "inline": lambda fn: fn(conn),
            "thread per call": lambda fn: thread_per_call(uri, TIMEOUT, lambda: fn(conn)),
            "channel": lambda fn: self.channel.call(TIMEOUT, fn),
            "one worker": lambda fn: self.single.submit(fn, conn).result(TIMEOUT),
        }

    def close(self) -> None:
        self.single.shutdown()
        self.channel.close()


def cheap(conn: libvirt.virConnect) -> int:
    return conn.getLibVersion()


def slow(conn: libvirt.virConnect) -> int:
    time.sleep(SLOW_SECONDS)  # a long call (the thread holds no GIL, as in libvirt)
    return conn.getLibVersion()


def sequential(way: Callable[..., Any]) -> float:
    """µs per call, CALLS calls from this thread."""
    started = time.perf_counter()
    for _ in range(CALLS):
        way(cheap)
    return (time.perf_counter() - started) / CALLS * 1e6


def concurrent(way: Callable[..., Any]) -> float:
    """Calls per second, CALLERS threads making CALLS / CALLERS calls each."""
    each = CALLS // CALLERS
    barrier = threading.Barrier(CALLERS + 1)

    def caller() -> None:
        barrier.wait()
        for _ in range(each):
            way(cheap)

    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return each * CALLERS / (time.perf_counter() - started)


def behind_slow(way: Callable[..., Any]) -> tuple[float, float]:
    """Median and max ms of cheap calls made while another thread makes slow ones."""
    stop = threading.Event()

    def slow_caller() -> None:
        for _ in range(SLOW_CALLS):
            way(slow)
        stop.set()

    thread = threading.Thread(target=slow_caller)
    thread.start()
    latencies = []
    while not stop.is_set():
        began = time.perf_counter()
        way(cheap)
        latencies.append((time.perf_counter() - began) * 1e3)
        time.sleep(0.002)
    thread.join()
    return statistics.median(latencies), max(latencies)


def run() -> list[str]:
    lines = [
        "#### Bounded libvirt calls: per-call overhead (issue 17)",
        "",
        f"`getLibVersion` through each way of bounding a call; sequential: {CALLS:,} calls"
        f" from one thread (µs per call, best of {ROUNDS} alternating rounds); concurrent:"
        f" {CALLERS} threads sharing the connection (calls/s, best of {ROUNDS}); behind a"
        f" slow call: cheap calls from one thread while another makes {SLOW_CALLS} calls of"
        f" {SLOW_SECONDS * 1000:.0f} ms (ms, median / max).",
        "",
        "| URI | way | sequential µs/call | concurrent calls/s | behind a slow call ms |",
        "|---|---|---:|---:|---:|",
    ]
    for uri in URIS:
        paths = Paths(uri)
        try:
            ways = paths.ways()
            seq: dict[str, list[float]] = {name: [] for name in ways}
            par: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(ROUNDS):
                for name, way in ways.items():
                    seq[name].append(sequential(way))
                    par[name].append(concurrent(way))
            behind = {name: behind_slow(way) for name, way in ways.items()}
            started = paths.channel.threads_started
        finally:
            paths.close()
        for name in ways:
            median, worst = behind[name]
            lines.append(f"| `{uri}` | {name} | {min(seq[name]):.1f} | {max(par[name]):,.0f} |"
                         f" {median:.2f} / {worst:.1f} |")  # fmt: skip
        lines.append(f"| `{uri}` | (channel threads started in all: {started}) | | | |")
    return [*lines, ""]
