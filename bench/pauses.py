"""A running guest's pauses, seen from outside while something runs, for the benchmarks.

``python -m bench.pauses URI DOMAIN LOG`` polls the domain's state about every 5 ms on a
libvirt connection of its own and follows its serial console log (``LOG``) for the test
guest's ``VMAPI-TICK n`` (one a second), until its stdin closes; then it prints what it
saw as JSON. It is a process of its own, not a thread, so that the bench's own work
(vmapi in-process, hashing a download) cannot hold the polls back through the GIL. Its
times are ``time.monotonic()``, one clock for every process of the machine, so the
caller compares them with its own (:class:`Watch`).

What comes of it. The state: the longest run of polls that found the domain not running
(libvirt says paused only when QEMU stopped the vCPUs), and libvirt's lifecycle events
(suspended, resumed), which a pause between two polls cannot slip past. The ticks: the
longest gap between two ticks arriving in the log, against the usual gap (about 1 s): a
guest held back for any reason (stopped vCPUs, or a vCPU waiting on its disk) shows as a
gap that much longer. A tick is seen at the first poll after it was written, so each
gap is also given at least (from the poll before the later tick's): a watcher that was
itself held back does not pass for a guest that was. The watcher runs at a higher
priority (nice -10) where it may, so that it is held back less.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLL = 0.005
TICK = re.compile(rb"VMAPI-TICK (\d+)")
RUNNING = 1  # libvirt.VIR_DOMAIN_RUNNING
SUSPENDED, RESUMED = 3, 4  # libvirt.VIR_DOMAIN_EVENT_SUSPENDED, _RESUMED


def watch(uri: str, domain: str, log: str) -> dict[str, list]:
    """Poll until stdin closes: every poll's time, each change of state, each new tick
    (with the poll before it), each lifecycle event."""
    import libvirt

    with contextlib.suppress(OSError):  # (not allowed: as it is)
        os.nice(-10)
    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open(uri)
    events: list[tuple[float, int, int]] = []
    threading.Thread(target=run_events, daemon=True).start()
    try:
        dom = conn.lookupByName(domain)
        conn.domainEventRegisterAny(
            dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lambda _c, _d, event, detail, _o: events.append((time.monotonic(), event, detail)),
            None,
        )  # fmt: skip
        samples: list[float] = []
        changes: list[tuple[float, int]] = []
        ticks: list[tuple[float, int, float]] = []
        handle = open(log, "rb")  # noqa: SIM115 - followed until the end of the watch
        handle.seek(0, os.SEEK_END)
        pending = b""
        print("ready", flush=True)
        while not select.select([sys.stdin], [], [], 0)[0]:
            state = dom.state()[0]
            now = time.monotonic()
            samples.append(now)
            if not changes or changes[-1][1] != state:
                changes.append((now, state))
            if os.fstat(handle.fileno()).st_size < handle.tell():
                handle.seek(0)  # rotated by virtlogd: a new file from its start
            pending += handle.read()
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if found := TICK.search(line):
                    before = samples[-2] if len(samples) > 1 else now
                    ticks.append((now, int(found.group(1)), before))
            time.sleep(POLL)
        handle.close()
    finally:
        conn.close()
    return {"samples": samples, "changes": changes, "ticks": ticks, "events": list(events)}


def run_events() -> None:
    import libvirt

    while True:
        libvirt.virEventRunDefaultImpl()


@dataclass
class Seen:
    """What one watch saw; each figure for a window ``start``..``end`` (monotonic)."""

    samples: list[float]
    changes: list[list]  # [time, state] at the first poll of each new state
    ticks: list[list]  # [time, n, the poll before] as each tick was found in the log
    events: list[list] = field(default_factory=list)  # [time, event, detail]

    def longest_stop(self, start: float, end: float) -> float:
        """Seconds from a poll that found the domain not running to the next that found
        it running (or the watch's end), the longest that touches the window."""
        longest = 0.0
        bounds = [*self.changes, [self.samples[-1], None]]
        for (began, state), (ended, _next) in itertools.pairwise(bounds):
            if state != RUNNING and began <= end and ended >= start:
                longest = max(longest, ended - began)
        return longest

    def stopped_polls(self, start: float, end: float) -> int:
        """Changes to a state other than running within the window."""
        return sum(1 for t, state in self.changes if state != RUNNING and start <= t <= end)

    def poll_gaps(self, start: float, end: float) -> list[float]:
        times = [t for t in self.samples if start <= t <= end]
        return [b - a for a, b in itertools.pairwise(times)]

    def tick_gaps(self, start: float, end: float) -> list[tuple[float, float]]:
        """Gaps between ticks that touch the window, each as seen and at least (from the
        earlier tick to the poll before the later one); a guest that stopped ticking
        counts until the watch's end."""
        ticks = [(t, before) for t, _n, before in self.ticks]
        if ticks and ticks[-1][0] < self.samples[-1]:
            ticks.append((self.samples[-1], self.samples[-1]))
        return [(b - a, max(0.0, b_before - a)) for (a, _), (b, b_before)
                in itertools.pairwise(ticks) if b >= start and a <= end]  # fmt: skip

    def usual_tick_gap(self) -> float:
        times = [t for t, _n, _before in self.ticks]
        return statistics.median(b - a for a, b in itertools.pairwise(times))

    def suspensions(self, start: float, end: float) -> list[float]:
        """Seconds from each suspended event to the next resumed one (or the watch's
        end), of those that touch the window."""
        found, began = [], None
        for t, event, _detail in [*self.events, [self.samples[-1], RESUMED, 0]]:
            if event == SUSPENDED and began is None:
                began = t
            elif event == RESUMED and began is not None:
                if began <= end and t >= start:
                    found.append(t - began)
                began = None
        return found


class Watch:
    """``with Watch(uri, domain, log) as w:`` runs the watcher process for the body;
    ``w.seen`` afterwards."""

    def __init__(self, uri: str, domain: str, log: str) -> None:
        self.args = [sys.executable, "-m", "bench.pauses", uri, domain, log]
        self.seen: Seen | None = None

    def __enter__(self) -> Watch:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("the pause watcher did not start")
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        try:
            out, _ = self.proc.communicate(timeout=60)  # (closes its stdin: it stops)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        if self.proc.returncode != 0:
            if kind is None:
                raise RuntimeError(f"the pause watcher failed ({self.proc.returncode})")
            return
        self.seen = Seen(**json.loads(out))


if __name__ == "__main__":
    print(json.dumps(watch(*sys.argv[1:4])))
