"""``make bench``: every benchmark of issue 7, printed as tables and appended, with the
date and the machine, to docs/benchmarks-history.md (docs/benchmarks.md holds the
latest figure of each against its floor and target, kept by hand).

``python -m bench`` runs them all; ``python -m bench placement listing`` runs some.
Compare ratios within one run: these machines are shared and noisy.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

SUITE = (
    "placement",
    "stale",
    "listing",
    "overhead",
    "hypervisor",
    "memory",
    "scaleout",
    "streams",
    "images",
    "boot",
    "migration",
    "calls",
    "arrays",
    "health",
    "filters",
    "backups",
    "save",
    "rbd",
    "ha",
    "failover",
)
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-history.md"


def main(argv: list[str]) -> int:
    chosen = argv or list(SUITE)
    unknown = [name for name in chosen if name not in SUITE]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(SUITE)}")
        return 2
    started = time.monotonic()
    header = [
        f"### make bench — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs,"
        f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB,"
        f" Python {platform.python_version()}, {platform.platform()}.",
        "",
    ]
    print("\n".join(header), flush=True)
    sections = []
    for name in chosen:
        began = time.monotonic()
        lines = importlib.import_module(f"bench.{name}").run()
        lines.append(f"_({name}: {time.monotonic() - began:.0f} s)_")
        lines.append("")
        print("\n".join(lines), flush=True)
        sections += lines
    footer = f"Whole run: {time.monotonic() - started:.0f} s."
    print(footer)
    text = "\n".join([*header, *sections, footer, ""])
    with RESULTS.open("a") as out:
        out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
