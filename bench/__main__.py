"""``make bench``: POST /vm latency with 10 and with 10,000 nodes, side by side.

Each fleet gets its own PostgreSQL database, built by the migrations, with nodes and
virt_nodes bulk-inserted in SQL and one in-process libvirt test-driver host per fleet.
Requests go through Flask's test client (the whole app: auth, schemas, scheduler,
claims, libvirt define + start), so the figure is the server's own cost per create.
The target (issue 3): 10,000 nodes at most 1.3 x the 10-node median.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import create_database, drop_database, make_token, migrate
from vmapi import create_app
from vmapi.extensions import db

PG_URL = os.environ.get("VMAPI_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FLEETS = (10, 10_000)
WARMUP, REQUESTS = 20, 200
GIB = 1024**3
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def fleet(server: str, nodes: int, host_file: Path):
    url = create_database(server)
    migrate(url)
    app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING"})
    host_file.write_text(
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>"
        "<cores>64</cores><threads>1</threads></cpu><memory>268435456</memory></node>"
    )
    with app.app_context():
        method = db.session.execute(
            sa.text(
                "INSERT INTO virt_method (name, domain_type) VALUES ('TEST', 'test') RETURNING id"
            )
        ).scalar_one()
        db.session.execute(
            sa.text(
                "INSERT INTO node (fqdn, ipv4_addr_ext, ipv6_addr_ext, ipv4_gw_ext, ipv6_gw_ext,"
                " node_state_id, libvirt_uri, cores, ram, cpu_allocation_ratio,"
                " ram_allocation_ratio, reserved_ram, free_cores, free_ram)"
                " SELECT 'node' || i || '.bench.example', '192.0.2.10/24', '2001:db8::10/64',"
                " '192.0.2.1', '2001:db8::1', 1, :uri, 64, :ram, 1.0, 1.0, 0, 64, :ram"
                " FROM generate_series(1, :n) AS i"
            ),
            {"uri": f"test://{host_file}", "ram": 256 * GIB, "n": nodes},
        )
        db.session.execute(
            sa.text("INSERT INTO virt_node (node_id, virt_method_id) SELECT id, :m FROM node"),
            {"m": method},
        )
        db.session.execute(
            sa.text(
                "INSERT INTO ipv4_address (address, prefix, gateway)"
                " SELECT '10.' || (i / 65536) || '.' || (i / 256 % 256) || '.' || (i % 256),"
                " 8, '10.255.255.254' FROM generate_series(1, :n) AS i"
            ),
            {"n": WARMUP + REQUESTS + 10},
        )
        db.session.execute(
            sa.text(
                "INSERT INTO ipv6_pool (network, prefix, gateway, next_host, size)"
                " VALUES ('2001:db8::/64', 64, '2001:db8::1', 1, 4611686018427387904)"
            )
        )
        db.session.execute(sa.text("ANALYZE"))
        db.session.commit()
    return url, app, method


def measure(app, method: int) -> list[float]:
    client = app.test_client()
    headers = {"Authorization": f"Bearer {make_token(app, 'admin')}"}
    body = {"cores": 1, "ram": 256 * 1024 * 1024, "virt_method": {"id": method}}
    timings = []
    for i in range(WARMUP + REQUESTS):
        started = time.perf_counter()
        response = client.post("/api/v1/vm", json=body, headers=headers)
        elapsed = time.perf_counter() - started
        assert response.status_code == 201, response.json
        if i >= WARMUP:
            timings.append(elapsed * 1000)
    return timings


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    server = sa.engine.make_url(PG_URL).set(database="postgres").render_as_string(False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in FLEETS:
            url, app, method = fleet(server, nodes, Path(tmp) / f"host-{nodes}.xml")
            try:
                timings = measure(app, method)
            finally:
                with app.app_context():
                    db.engine.dispose()
                drop_database(server, url)
            rows.append((nodes, statistics.median(timings), p95(timings)))
    base = rows[0][1]
    verdict = "met" if rows[-1][1] / base <= 1.3 else "NOT met"
    lines = [
        f"### POST /vm placement scaling — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()};"
        f" {REQUESTS} creates after {WARMUP} warm-up, in-process client, libvirt test driver.",
        "",
        "| nodes | median ms | p95 ms | median vs 10 nodes |",
        "|---:|---:|---:|---:|",
        *[f"| {n:,} | {m:.2f} | {p:.2f} | {m / base:.2f} x |" for n, m, p in rows],
        "",
        f"Target: 10,000 nodes ≤ 1.3 x 10 nodes — {verdict}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmarks\n\nFigures recorded by `make bench`, newest last.\n\n")
    with RESULTS.open("a") as out:
        out.write(text + "\n")


if __name__ == "__main__":
    main()
