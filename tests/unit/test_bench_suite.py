"""The benchmarks `make bench` knows: every module of bench/ with a ``run()`` is in the
suite and in the Makefile's list; and the rbd benchmark's report (bench/rbd_report.py)
says whether its target is met, from figures given here (nothing is timed)."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

from bench.__main__ import SUITE
from bench.rbd import WriteTimes
from bench.rbd_report import report

ROOT = Path(__file__).resolve().parents[2]


def benchmarks() -> set[str]:
    """The modules of bench/ that define a top-level ``run``."""
    found = set()
    for path in (ROOT / "bench").glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body):
            found.add(path.stem)
    return found


def test_every_benchmark_is_in_the_suite_and_the_makefile():
    assert set(SUITE) == benchmarks()
    assert "rbd" in SUITE
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"# BENCH= picks some of:(.*?)\nbench:", makefile, re.S).group(1)
    assert set(listed.replace("#", " ").split()) == set(SUITE)


def figures(local_ms: float, rbd_ms: float) -> dict:
    def move(seconds: float, copy: float) -> dict:
        return {"seconds": seconds, "copy": copy, "migrate": 1.9, "downtime": 0.03}

    first = {"local_a": (0.8, 0.3), "rbd_a": (2.5, 2.1), "rbd_b": (0.3, 0.0),
             "local_b": (0.8, 0.3)}  # fmt: skip
    return {
        "guest_size": 24 * 2**20, "fresh_size": 256 * 2**20, "disk": 2**30,
        "creates": {"local": [local_ms] * 3, "rbd": [rbd_ms] * 3, "size": 25 * 2**20,
                    "parent": 24 * 2**20, "clone": {"first": 30.0, "warm": [6.0, 8.0]},
                    "waits": [0.1, 0.2, 3.0],
                    "local_calls": [{"start": 160.0, "create_overlay": 10.0}] * 3,
                    "rbd_calls": [{"start": 180.0, "ensure_rbd_pool": 1.0}] * 3},
        "firsts": {"node_local": (0.3, 0.05), "node_rbd": (0.4, 0.03), "fresh": [first] * 3},
        "moves": {"cold": [move(4.8, 1.1)] * 3, "warm": [move(2.1, 0.0)] * 3,
                  "rbd": [move(2.0, 0.0)] * 6, "setup_local": (2.2, 1.0),
                  "setup_rbd": (7.5, 7.2)},
    }  # fmt: skip


def test_the_rbd_report_says_whether_the_create_is_within_1_1_x():
    within = "\n".join(report(figures(200.0, 215.0)))
    assert "Target RBD ≤ 1.1 x local, the clone included: 1.07 x (+15.0 ms;" in within
    assert within.split("Target RBD")[1].split("\n")[0].endswith("— met.")
    over = "\n".join(report(figures(200.0, 400.0)))
    assert "2.00 x (+200.0 ms; 1.1 x allows +20.0 ms) — NOT met." in over
    # the other two comparisons, as ratios of RBD to local
    assert "A new node on RBD: 0.30 s against 0.80 s local (the copy to that node): 0.37 x" in over
    assert "RBD against local: 0.42 x the move that copies the disk, 0.95 x" in over
    assert (
        "in-process (Ceph's Python bindings on the process's connection to the cluster, "
        "grown from the image's 24.00 MiB to the root disk's default size, 25 MiB, before "
        "the domain starts)"
    ) in over
    assert "2 times on a kept connection: median 7.0 ms (max 8.0)" in over
    assert "the first on a new connection (a worker's first create) 30.0 ms" in over
    assert (
        "its wait for the clone before the start (begun before the create's claim) 0.2 ms "
        "(max 3.0)" in over
    )


def test_write_times_reads_the_seconds_of_a_write_into_ceph_from_the_create_s_log():
    times = WriteTimes()
    for message in ("Image 4 was written into Ceph pool rbd (2.3 s).", "something else"):
        times.handle(logging.LogRecord("vmapi.services.vms.rbd_boot", logging.INFO, __file__,
                                       1, "vm-%s: %s", (7, message), None))  # fmt: skip
    assert times.last == 2.3
