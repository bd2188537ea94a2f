"""Item 6, scaling out: POST /vm throughput of two gunicorn instances on two ports over
one PostgreSQL against one instance. Target: ≥ 1.6 x.

Two instances can only be faster than one if something other than the CPUs bounds one
instance. So while each load runs, this samples every 50 ms: how busy the machine's
CPUs are (/proc/stat) and which PostgreSQL backends wait on a lock
(``pg_stat_activity.wait_event_type = 'Lock'``) and in which statement — the claim's
conditional ``UPDATE node`` is the one place where creates could queue on each other.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlalchemy as sa

from bench.common import lua_request, recommended_workers, served_fleet, wrk
from bench.placement import verdict
from tests.concurrency.conftest import gunicorn

SECONDS = 10
THREADS = 16


def cpu_times() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


GROUPS = {"python": "vmapi (gunicorn workers)", "postgres": "PostgreSQL",
          "libvirtd": "libvirtd", "wrk": "wrk (the client)"}  # fmt: skip


def ticks_by_program() -> Counter[str]:
    """CPU ticks (user + system) of every live process, by program name."""
    out: Counter[str] = Counter()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        group = next((g for prefix, g in GROUPS.items() if name.startswith(prefix)), "other")
        out[group] += int(fields[11]) + int(fields[12])
    return out


class Sampler(threading.Thread):
    """CPU busy share and lock waits, sampled while a load runs."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        self.stop = threading.Event()
        self.samples = 0
        self.waiting_samples = 0
        self.waits: Counter[str] = Counter()
        self.active = 0

    def run(self) -> None:
        self.busy0, self.total0 = cpu_times()
        programs0 = ticks_by_program()
        with self.engine.connect() as conn:
            while not self.stop.wait(0.05):
                rows = conn.execute(sa.text(
                    "SELECT wait_event_type, left(regexp_replace(query, '\\s+', ' ', 'g'), 60)"
                    " FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'active' AND pid <> pg_backend_pid()"
                )).all()  # fmt: skip
                conn.rollback()
                self.samples += 1
                self.active += len(rows)
                locked = [query for kind, query in rows if kind == "Lock"]
                if locked:
                    self.waiting_samples += 1
                    self.waits.update(locked)
        busy1, total1 = cpu_times()
        self.cpu = (busy1 - self.busy0) / max(total1 - self.total0, 1)
        used = ticks_by_program()
        used.subtract(programs0)
        spent = sum(max(v, 0) for v in used.values()) or 1
        self.programs = {name: max(v, 0) / spent for name, v in used.most_common()}
        self.engine.dispose()


def load(urls: list[str], lua: str) -> tuple[float, int]:
    threads = THREADS // len(urls)
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(lambda u: wrk(u, SECONDS, threads=threads, lua=lua), urls))
    bad = sum(r["non_2xx"] for r in results)
    return sum(r["rps"] for r in results), bad


def run() -> list[str]:
    workers = recommended_workers()
    rows = []
    with served_fleet() as (fleet, env, token):
        body = json.dumps({"cores": 1, "ram": 256 * 1024**2, "virt_method": {"id": fleet.method}})
        lua = lua_request("POST", token, body)
        with (
            gunicorn("wsgi:app", env, workers) as (one, _),
            gunicorn("wsgi:app", env, workers) as (
                two,
                _,
            ),
        ):
            for label, urls in (("one instance", [one]), ("two instances", [one, two])):
                sampler = Sampler(fleet.url)
                sampler.start()
                time.sleep(0.1)
                rate, bad = load([u + "/api/v1/vm" for u in urls], lua)
                sampler.stop.set()
                sampler.join()
                if bad:
                    raise RuntimeError(f"{label}: {bad} non-2xx answers")
                rows.append((label, rate, sampler))
    base = rows[0][1]
    ratio = rows[1][1] / base
    lines = [
        "#### 6. Scaling out: POST /vm, one vs two gunicorn instances over one PostgreSQL",
        "",
        f"Each instance: {workers} sync workers; wrk {THREADS} threads in all, {SECONDS} s;"
        " samples every 50 ms.",
        "",
        "| load | creates/s | vs one | CPU busy | active backends (mean) |"
        " samples with a lock wait |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, rate, s in rows:
        lines.append(
            f"| {label} | {rate:.0f} | {rate / base:.2f} x | {s.cpu:.0%} |"
            f" {s.active / max(s.samples, 1):.2f} | {s.waiting_samples}/{s.samples} |"
        )
    lines += ["", "Where the CPU went (share of all CPU time used during the load):", "",
              "| load | " + " | ".join(GROUPS.values()) + " | other |",
              "|---|" + "---:|" * (len(GROUPS) + 1)]  # fmt: skip
    for label, _rate, s in rows:
        shares = [s.programs.get(g, 0.0) for g in [*GROUPS.values(), "other"]]
        lines.append(f"| {label} | " + " | ".join(f"{v:.0%}" for v in shares) + " |")
    waits = sum((s.waits for _l, _r, s in rows), Counter())
    lines += ["", f"Target two ≥ 1.6 x one: {ratio:.2f} x — {verdict(ratio >= 1.6)}."]
    if waits:
        lines += ["", "Statements seen waiting on a lock:", ""]
        lines += [f"- {n} x `{query}`" for query, n in waits.most_common(5)]
    return [*lines, ""]
