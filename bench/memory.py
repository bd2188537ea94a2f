"""Item 5, memory: RSS of every gunicorn worker after the first 1,000 mixed requests and
after 20,000. Target: no worker grows by more than 10% (no leak).

The mix, from 8 client threads: create a VM, read it, read it with ``nest=node``, list
a page, list a page with ``nest=node``, delete the VM. VMs are deleted as they are
made, so the data does not grow with the run and what grows is the process.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bench.common import recommended_workers, rss_mb, served_fleet, worker_pids
from bench.placement import verdict
from tests.concurrency.conftest import gunicorn

FIRST, TOTAL = 1_000, 20_000
CLIENTS = 8
MIX = 6  # requests per cycle


def call(base: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/api/v1/{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def cycle(base: str, token: str, method: int) -> None:
    body = {"cores": 1, "ram": 256 * 1024**2, "virt_method": {"id": method}}
    vm = call(base, token, "POST", "vm", body)["data"]
    call(base, token, "GET", f"vm/{vm['id']}")
    call(base, token, "GET", f"vm/{vm['id']}?nest=node")
    call(base, token, "GET", "vm?limit=100")
    call(base, token, "GET", "vm?limit=100&nest=node")
    call(base, token, "DELETE", f"vm/{vm['id']}")


def drive(base: str, token: str, method: int, requests: int) -> None:
    counter = itertools.count()
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if next(counter) * MIX >= requests:
                    return
            cycle(base, token, method)

    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client) for _ in range(CLIENTS)]:
            future.result()


def run() -> list[str]:
    workers = recommended_workers()
    with served_fleet() as (fleet, env, token), gunicorn("wsgi:app", env, workers) as (base, pid):
        drive(base, token, fleet.method, FIRST)
        pids = worker_pids(pid)
        before = {p: rss_mb(p) for p in pids}
        drive(base, token, fleet.method, TOTAL - FIRST)
        after = {p: rss_mb(p) for p in pids if p in worker_pids(pid)}
    if set(after) != set(before):
        raise RuntimeError("a worker was replaced during the run; RSS is not comparable")
    growth = {p: after[p] / before[p] - 1 for p in pids}
    worst = max(growth.values())
    return [
        "#### 5. Memory: RSS per gunicorn worker (libvirtd test driver)",
        "",
        f"{workers} sync workers; {CLIENTS} client threads; the mix: create, read, read with"
        " nest, list, list with nest, delete.",
        "",
        f"| worker | RSS after {FIRST:,} requests (MB) | after {TOTAL:,} (MB) | growth |",
        "|---:|---:|---:|---:|",
        *[
            f"| {i} | {before[p]:.1f} | {after[p]:.1f} | {growth[p]:+.1%} |"
            for i, p in enumerate(pids, 1)
        ],
        "",
        f"Target every worker ≤ +10%: worst {worst:+.1%} — {verdict(worst <= 0.10)}.",
        "",
    ]
