"""Item 2, list paging: GET /vm?limit=100 (first page; a middle page by ``after``; the
middle page with ``nest=node``) and GET /vm/<id>, with 100 VMs and with 200,000 VMs.
Target: 200,000 ≤ 1.3 x 100 for each.

In-process client, like item 1: the server's own cost per request. Both fleets live side
by side and answer in turns, so the machine's noise falls on both alike.
"""

from __future__ import annotations

import contextlib

from bench.common import admin_token, database, interleaved, median, p95, populate
from bench.placement import verdict
from vmapi.app import create_app
from vmapi.extensions import db

SIZES = ((5, 20), (10_000, 20))  # (nodes, VMs per node): 100 and 200,000 VMs
REQUESTS = 300


def requests_for(ids: list[int]) -> dict[str, str]:
    """Every page holds 100 rows in both fleets: the middle page starts after the VM 50
    before the middle (with 100 VMs that is ``after=0``: the same rows as the first
    page, read through the keyset condition)."""
    start = len(ids) // 2 - 50
    after = ids[start - 1] if start > 0 else 0
    middle = ids[len(ids) // 2]
    return {
        "first page": "/api/v1/vm?limit=100",
        "middle page (after)": f"/api/v1/vm?limit=100&after={after}",
        "middle page, nest=node": f"/api/v1/vm?limit=100&after={after}&nest=node",
        "GET /vm/<id>": f"/api/v1/vm/{middle}",
    }


def reader(client, headers, path):
    def get() -> None:
        response = client.get(path, headers=headers)
        assert response.status_code == 200, response.json
        data = response.json["data"]  # a list is keyed by id
        assert "id" in data or len(data) == 100, (path, len(data))

    return get


def run() -> list[str]:
    with contextlib.ExitStack() as stack:
        fleets = []
        for nodes, per in SIZES:
            url = stack.enter_context(database())
            fleet = populate(url, nodes, per, "test:///default", addresses=10)
            app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING",
                              "LOG_REQUESTS": False})  # fmt: skip
            headers = {"Authorization": f"Bearer {admin_token(url)}"}
            fleets.append((app, app.test_client(), headers, requests_for(fleet.vm_ids), fleet))
        results = {}
        for label in fleets[0][3]:
            calls = [reader(client, headers, paths[label]) for _a, client, headers, paths, _f
                     in fleets]  # fmt: skip
            small, large = interleaved(calls, REQUESTS, warmup=20)
            results[label] = (median(small), median(large), p95(large))
        counts = [len(f[4].vm_ids) for f in fleets]
        for app, *_ in fleets:
            with app.app_context():
                db.engine.dispose()
    small_n, large_n = counts
    lines = [
        "#### 2. List paging and reads (in-process client)",
        "",
        f"{REQUESTS} requests each after 20 warm-up, the two fleets taking turns; every VM"
        " has one interface.",
        "",
        f"| request | {small_n:,} VMs median ms | {large_n:,} VMs median ms | p95 ms"
        f" ({large_n:,}) | ratio | ≤ 1.3 x |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, (m1, m2, p2) in results.items():
        ratio = m2 / m1
        lines.append(f"| {label} | {m1:.2f} | {m2:.2f} | {p2:.2f} | {ratio:.2f} x |"
                     f" {verdict(ratio <= 1.3)} |")  # fmt: skip
    return [*lines, ""]
