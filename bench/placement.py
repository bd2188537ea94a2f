"""Item 1, placement scaling: POST /vm median and p95 with 10, 1,000 and 10,000 nodes,
each already holding 20 placed VMs. Target: 10,000 nodes ≤ 1.3 x 10 nodes.

Requests go through Flask's test client (the whole app: auth, schemas, scheduler,
claims, addresses, libvirt define + start on an in-process test-driver host), so the
figure is the server's own cost per create, without HTTP or a client in the way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import GIB, admin_token, database, host_file, median, p95, populate, timed
from vmapi import create_app
from vmapi.extensions import db

FLEETS = (10, 1_000, 10_000)
VMS_PER_NODE = 20
REQUESTS = 200


def run() -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in FLEETS:
            uri = f"test://{host_file(Path(tmp))}"
            with database() as url:
                fleet = populate(url, nodes, VMS_PER_NODE, uri, addresses=REQUESTS + 50)
                app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING"})
                client = app.test_client()
                headers = {"Authorization": f"Bearer {admin_token(url)}"}
                body = {"cores": 1, "ram": GIB // 4, "virt_method": {"id": fleet.method}}

                def create(client=client, headers=headers, body=body):
                    response = client.post("/api/v1/vm", json=body, headers=headers)
                    assert response.status_code == 201, response.json

                timings = timed(create, REQUESTS, warmup=20)
                with app.app_context():
                    db.engine.dispose()
            rows.append((nodes, median(timings), p95(timings)))
    base = rows[0][1]
    ratio = rows[-1][1] / base
    return [
        "#### 1. Placement scaling: POST /vm (in-process client, libvirt test driver)",
        "",
        f"{VMS_PER_NODE} VMs already placed per node; {REQUESTS} creates after 20 warm-up.",
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
