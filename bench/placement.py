"""Item 1, placement scaling: POST /vm median and p95 with 10, 1,000 and 10,000 nodes,
each already holding 20 placed VMs. Target: 10,000 nodes ≤ 1.3 x 10 nodes.

Requests go through Flask's test client (the whole app: auth, schemas, scheduler,
claims, addresses, libvirt define + start on an in-process test-driver host), so the
figure is the server's own cost per create. The three fleets live side by side and
take their creates in turns, so the machine's noise falls on all three alike.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

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
from vmapi.app import create_app
from vmapi.extensions import db

FLEETS = (10, 1_000, 10_000)
VMS_PER_NODE = 20
REQUESTS = 200


def creator(url: str, method: int):
    app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "LOG_REQUESTS": False,
                      "LOG_HYPERVISOR": False, "TEST_DRIVER_DIR": TEST_DRIVER_DIR})  # fmt: skip
    client = app.test_client()
    headers = {"Authorization": f"Bearer {admin_token(url)}"}
    body = {"cores": 1, "ram": GIB // 4, "virt_method": {"id": method}}

    def create() -> None:
        response = client.post("/api/v1/vm", json=body, headers=headers)
        assert response.status_code == 201, response.json

    return app, create


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        uri = f"test://{host_file(Path(tmp))}"
        apps, calls = [], []
        for nodes in FLEETS:
            url = stack.enter_context(database())
            fleet = populate(url, nodes, VMS_PER_NODE, uri, addresses=REQUESTS + 50)
            app, create = creator(url, fleet.method)
            apps.append(app)
            calls.append(create)
        timings = interleaved(calls, REQUESTS, warmup=20)
        for app in apps:
            with app.app_context():
                db.engine.dispose()
    rows = [(n, median(t), p95(t)) for n, t in zip(FLEETS, timings, strict=True)]
    base = rows[0][1]
    ratio = rows[-1][1] / base
    return [
        "#### 1. Placement scaling: POST /vm (in-process client, libvirt test driver)",
        "",
        f"{VMS_PER_NODE} VMs already placed per node; {REQUESTS} creates per fleet after 20"
        " warm-up, the fleets taking turns.",
        "",
        "| nodes | VMs placed | median ms | p95 ms | median vs 10 nodes |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {n:,} | {n * VMS_PER_NODE:,} | {m:.2f} | {p:.2f} | {m / base:.2f} x |"
            for n, m, p in rows
        ],
        "",
        f"Target 10,000 nodes ≤ 1.3 x 10 nodes: {ratio:.2f} x — {verdict(ratio <= 1.3)}.",
        "",
    ]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"
