"""The save benchmark's pause figures (bench/pauses.py) from what a watch saw."""

from __future__ import annotations

import json
import sys

import pytest

from bench.pauses import RESUMED, RUNNING, SUSPENDED, Seen, Watch

PAUSED = 3  # libvirt.VIR_DOMAIN_PAUSED


def seen() -> Seen:
    """Polls every 10 ms from 0 to 10 s; paused from 4.00 to 4.12 s (the events say 4.005
    to 4.115); ticks each second but one that came 0.4 s late (at 6.4 s instead of 6.0),
    and the one at 8 s seen only at 8.3 (the watcher held back after its poll at 7.99)."""
    samples = [n / 100 for n in range(1001) if not 799 < n < 830]
    changes = [[0.0, RUNNING], [4.0, PAUSED], [4.12, RUNNING]]
    ticks = [[n - 0.005, n, n - 0.01] for n in range(1, 10) if n not in (6, 8)]
    ticks += [[6.4, 6, 6.39], [8.3, 8, 7.99]]
    events = [[4.005, SUSPENDED, 0], [4.115, RESUMED, 0]]
    return Seen(samples, changes, sorted(ticks), events)


def test_the_longest_stop_is_from_the_first_poll_not_running_to_the_next_running():
    assert seen().longest_stop(3.0, 5.0) == pytest.approx(0.12)
    assert seen().stopped_polls(3.0, 5.0) == 1
    # a pause that began before the window and ends in it counts; one outside does not
    assert seen().longest_stop(4.1, 5.0) == pytest.approx(0.12)
    assert seen().longest_stop(5.0, 9.0) == 0.0
    assert seen().stopped_polls(5.0, 9.0) == 0


def test_a_domain_still_stopped_at_the_end_counts_until_the_watch_ended():
    watched = Seen([0.0, 1.0, 2.0, 3.0], [[0.0, RUNNING], [1.0, PAUSED]], [])
    assert watched.longest_stop(0.5, 1.5) == 2.0


def test_tick_gaps_touching_the_window_as_seen_and_at_least():
    assert max(seen().tick_gaps(5.5, 6.2)) == pytest.approx((1.405, 1.395))
    assert max(seen().tick_gaps(1.5, 3.5)) == pytest.approx((1.0, 0.995))
    # a tick seen late because the watcher was held back: long as seen, not at least
    assert seen().tick_gaps(7.5, 7.6) == [pytest.approx((1.305, 0.995))]
    assert seen().usual_tick_gap() == pytest.approx(1.0)
    # a guest that stopped ticking: the gap runs to the watch's end
    silent = Seen([0.0, 5.0], [[0.0, RUNNING]], [[0.5, 1, 0.0]])
    assert silent.tick_gaps(1.0, 2.0) == [(4.5, 4.5)]


def test_suspensions_from_the_lifecycle_events():
    assert seen().suspensions(3.0, 5.0) == [pytest.approx(0.11)]
    assert seen().suspensions(5.0, 9.0) == []
    # suspended to the end of the watch
    watched = Seen([0.0, 2.0], [[0.0, RUNNING]], [], [[1.0, SUSPENDED, 0]])
    assert watched.suspensions(0.0, 1.5) == [1.0]


def test_poll_gaps_within_the_window():
    gaps = seen().poll_gaps(2.0, 3.0)
    assert len(gaps) == 100 and max(gaps) == pytest.approx(0.01)


def test_a_watch_reads_what_its_process_printed():
    """The watcher process is stopped by closing its stdin; its JSON becomes ``seen``."""
    printed = {
        "samples": [0.0, 1.0],
        "changes": [[0.0, RUNNING]],
        "ticks": [[0.5, 1, 0.0]],
        "events": [[0.7, SUSPENDED, 0]],
    }
    script = (
        "import sys, json, select\n"
        "print('ready', flush=True)\n"
        "select.select([sys.stdin], [], [])\n"
        f"print(json.dumps({json.dumps(printed)}))\n"
    )
    watch = Watch("test:///default", "none", "none")
    watch.args = [sys.executable, "-c", script]
    with watch:
        pass
    assert watch.seen == Seen(**printed)
