"""Item 1b (issue 17), fleets as production has them: built through the API, statistics
as they come. 10 nodes with 150 VMs against 2,000 nodes with 3,000 VMs, every VM made by
POST /vm (its interface, addresses, audit events and domain); nodes registered in bulk
and nothing analyzed afterwards (this machine's PostgreSQL runs with autovacuum off, and
in production statistics are as stale right after nodes are registered in bulk).
Measured: POST /vm (placement), the first list page and GET /vm/<id>, the two fleets in
turns after a ``CHECKPOINT``; then both fleets are analyzed and the first list page
measured again (issue 22). Target: each ≤ 1.3 x from the small fleet to the large.

Items 1 and 2 run ``VACUUM ANALYZE`` after their bulk inserts, which hid the stale-plan
cost of the scheduler's query (12-14 ms on 2,000 nodes against 1 ms).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bench.common import (
    GIB,
    TEST_DRIVER_DIR,
    admin_token,
    database,
    host_file,
    interleaved,
    median,
    p95,
    populate,
)
from bench.placement import verdict
from vmapi.app import create_app
from vmapi.extensions import db

FLEETS = ((10, 150), (2_000, 3_000))  # (nodes, VMs made by POST /vm)
REQUESTS = 150
BATCH = 50  # VMs per array POST while building


def checkpoint(url: str) -> None:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1),
                              isolation_level="AUTOCOMMIT")  # fmt: skip
    with engine.connect() as conn:
        conn.execute(sa.text("CHECKPOINT"))
    engine.dispose()


def analyze(url: str) -> None:
    """Statistics for the planner, as autovacuum's ANALYZE would make them."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1),
                              isolation_level="AUTOCOMMIT")  # fmt: skip
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE"))
        conn.execute(sa.text("CHECKPOINT"))
    engine.dispose()


def analyzed_tables(url: str) -> int:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM pg_stat_user_tables WHERE"
                                     " last_analyze IS NOT NULL OR last_autoanalyze IS NOT"
                                     " NULL")).scalar_one()  # fmt: skip
    engine.dispose()
    return count


def run() -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        uri = f"test://{host_file(Path(tmp))}"
        sides = []
        for nodes, vms in FLEETS:
            url = stack.enter_context(database())
            fleet = populate(url, nodes, 0, uri, addresses=vms + 2 * REQUESTS + 100,
                             analyze=False)  # fmt: skip
            app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING",
                              "LOG_REQUESTS": False, "LOG_HYPERVISOR": False,
                              "TEST_DRIVER_DIR": TEST_DRIVER_DIR})  # fmt: skip
            client = app.test_client()
            headers = {"Authorization": f"Bearer {admin_token(url)}"}
            body = {"cores": 1, "ram": GIB // 4, "virt_method": {"id": fleet.method}}
            began = time.monotonic()
            ids = []
            for start in range(0, vms, BATCH):  # arrays: all-or-nothing creates, as one by one
                batch = [body] * min(BATCH, vms - start)
                response = client.post("/api/v1/vm", json=batch, headers=headers)
                assert response.status_code == 201, response.json
                ids += [int(ident) for ident in response.json["data"]]
            built = time.monotonic() - began
            checkpoint(url)
            sides.append((app, client, headers, body, ids, nodes, vms, built, url))

        def creator(client, headers, body):
            def create() -> None:
                response = client.post("/api/v1/vm", json=body, headers=headers)
                assert response.status_code == 201, response.json

            return create

        def getter(client, headers, path):
            def get() -> None:
                response = client.get(path, headers=headers)
                assert response.status_code == 200, response.json

            return get

        cases = {
            "POST /vm": [creator(c, h, b) for _a, c, h, b, *_ in sides],
            "GET /vm?limit=100": [getter(c, h, "/api/v1/vm?limit=100") for _a, c, h, *_ in sides],
            "GET /vm/<id>": [
                getter(s[1], s[2], f"/api/v1/vm/{s[4][len(s[4]) // 2]}") for s in sides
            ],
        }
        for label, calls in cases.items():
            small, large = interleaved(calls, REQUESTS, warmup=10)
            rows.append((label, median(small), median(large), p95(large)))
        stale = [analyzed_tables(s[-1]) for s in sides]
        for side in sides:
            analyze(side[-1])
        label = "GET /vm?limit=100, analyzed"
        small, large = interleaved(cases["GET /vm?limit=100"], REQUESTS, warmup=10)
        rows.append((label, median(small), median(large), p95(large)))
        for app, *_ in sides:
            with app.app_context():
                db.engine.dispose()
    worst = max(large / small for _l, small, large, _p in rows)
    return [
        "#### 1b. Fleets built through the API, statistics as they come (in-process client)",
        "",
        f"Nodes bulk-registered, then every VM made by POST /vm (arrays of {BATCH}); nothing"
        " analyzed"
        f" (tables with statistics: {stale[0]} and {stale[1]}). Built in"
        f" {sides[0][7]:.0f} s and {sides[1][7]:.0f} s. {REQUESTS} requests per case after"
        " 10 warm-up, the fleets taking turns; the last row after an ANALYZE of both.",
        "",
        "| request | 10 nodes / 150 VMs median ms | 2,000 nodes / 3,000 VMs median ms |"
        " p95 ms (large) | ratio |",
        "|---|---:|---:|---:|---:|",
        *[f"| {label} | {s:.2f} | {m:.2f} | {p:.2f} | {m / s:.2f} x |" for label, s, m, p in rows],
        "",
        f"Target every request ≤ 1.3 x: worst {worst:.2f} x — {verdict(worst <= 1.3)}.",
        "",
    ]
