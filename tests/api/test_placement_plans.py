"""Placement walks the weigher's index whatever the planner's statistics say (issue 17).

This machine's PostgreSQL runs with autovacuum off, and in production statistics are as
stale right after nodes are registered in bulk: the scheduler's query was then planned
from ``virt_node`` (estimated 1 row, really 2,000), joining and sorting every node —
12-14 ms per create on 2,000 nodes against 1 ms once analyzed. Here a fleet of 2,000
nodes and 4,000 VMs is bulk-inserted into a fresh database that has never been analyzed
(or was analyzed while empty), a VM is created through the API, and the statement the
scheduler sent is replayed with ``EXPLAIN ANALYZE`` after the same planner settings the
app sent before it. The plan must read nodes best-first from the weigher's index, sort
nothing, stop early, and check each node it visits with index lookups only.

The best-ranked 200 nodes of each weigher lack the requested virt_method, so the walk
has to pass them: each of its per-node checks must stay a lookup (an index on the
method alone made the "has this method" check filter the method's every node, once per
node visited: 310 ms).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from bench.common import host_file, populate
from tests.conftest import (
    GIB,
    MIB,
    create_database,
    drop_database,
    make_token,
    migrate,
    node_files_dir,
)
from vmapi.app import create_app
from vmapi.extensions import db

NODES, VMS_PER_NODE, SKIPPED = 2_000, 2, 200
STATS = ("never analyzed", "analyzed while empty")
TABLES = ("node", "virt_node", "vm", "node_state", "interface", "ipv4_address", "image_copy")


def autocommit(url: str, *statements: str) -> list[sa.Row]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1),
                              isolation_level="AUTOCOMMIT")  # fmt: skip
    rows: list[sa.Row] = []
    try:
        with engine.connect() as conn:
            for statement in statements:
                result = conn.execute(sa.text(statement))
                if result.returns_rows:
                    rows += result.all()
    finally:
        engine.dispose()
    return rows


@pytest.fixture(scope="module", params=STATS)
def stale_fleet(request, pg_server, tmp_path_factory) -> Iterator[dict]:
    url = create_database(pg_server)
    try:
        migrate(url)
        # whatever the server's setting, nothing analyzes these tables behind the test
        autocommit(url, *[f"ALTER TABLE {t} SET (autovacuum_enabled = false)" for t in TABLES])
        if request.param == "analyzed while empty":
            autocommit(url, "ANALYZE")
        uri = f"test://{host_file(tmp_path_factory.mktemp('host'))}"
        fleet = populate(url, NODES, VMS_PER_NODE, uri, addresses=50, analyze=False)
        # the 200 nodes each weigher ranks first (most free RAM: ids 1-200; least: the
        # last 200) have another virt_method only
        autocommit(
            url,
            "INSERT INTO virt_method (name, domain_type) VALUES ('OTHER', 'test')",
            f"UPDATE node SET free_ram = free_ram + {GIB} WHERE id <= {SKIPPED}",
            f"UPDATE node SET free_ram = free_ram - {GIB} WHERE id > {NODES - SKIPPED}",
            f"UPDATE virt_node SET virt_method_id = (SELECT id FROM virt_method WHERE name ="
            f" 'OTHER') WHERE node_id <= {SKIPPED} OR node_id > {NODES - SKIPPED}",
        )
        analyzed = autocommit(url, "SELECT relname FROM pg_stat_user_tables WHERE"
                                   " last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL")  # fmt: skip
        if request.param == "never analyzed":
            assert analyzed == [], "the fleet's tables were analyzed: the test means nothing"
        yield {"url": url, "method": fleet.method, "stats": request.param,
               "test_driver_dir": node_files_dir(tmp_path_factory)}  # fmt: skip
    finally:
        drop_database(pg_server, url)


def create_and_capture(fleet: dict, weigher: str, tmp_path) -> tuple[dict, list[tuple]]:
    """POST /vm on the fleet with ``weigher``; the answer and every statement sent."""
    app = create_app({"DATABASE_URL": fleet["url"], "TESTING": True, "LIBVIRT_TIMEOUT": 5.0,
                      "SCHEDULER_WEIGHER": weigher, "IMAGE_DIR": str(tmp_path / "images"),
                      "TEST_DRIVER_DIR": fleet["test_driver_dir"]})  # fmt: skip
    token = make_token(app, "admin")
    with app.app_context():
        engine = db.engine
    sent: list[tuple] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        response = app.test_client().post(
            "/api/v1/vm",
            json={"cores": 1, "ram": 256 * MIB, "virt_method": {"id": fleet["method"]}},
            headers={"Authorization": f"Bearer {token}"},
        )
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
        with app.app_context():
            db.engine.dispose()
    assert response.status_code == 201, response.json
    return response.json["data"], sent


def scheduler_plan(url: str, sent: list[tuple], settings: bool = True) -> dict:
    """``EXPLAIN ANALYZE`` of the scheduler's statement, after the planner settings the app
    sent before it (``settings=False``: without them)."""
    index = next(i for i, (s, _p) in enumerate(sent) if "FOR UPDATE OF node SKIP LOCKED" in s)
    statement, parameters = sent[index]
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for earlier, earlier_parameters in sent[:index]:
            if settings and earlier.lstrip().upper().startswith("SET "):
                cursor.execute(earlier, earlier_parameters)
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
        plan = cursor.fetchone()[0][0]["Plan"]
        raw.rollback()
    finally:
        raw.close()
        engine.dispose()
    return plan


def walk(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from walk(child)


def read(scan: dict) -> float:
    """Rows a scan read: returned and removed by its filter, over all its loops."""
    return (scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)) * scan["Actual Loops"]


@pytest.mark.parametrize("weigher", ["spread", "pack"])
def test_placement_walks_the_index_on_stale_statistics(stale_fleet, weigher, tmp_path):
    vm, sent = create_and_capture(stale_fleet, weigher, tmp_path)
    # the best node that has the method: past the 200 skipped, lowest id among equals
    assert SKIPPED < vm["node"]["id"] <= NODES - SKIPPED
    plan = scheduler_plan(stale_fleet["url"], sent)
    shown = json.dumps(plan, indent=1)[:6000]
    nodes = [p for p in walk(plan) if p.get("Relation Name") == "node"]
    assert len(nodes) == 1, shown
    scan = nodes[0]
    assert scan["Node Type"] == "Index Scan", shown
    assert scan["Index Name"] == f"ix_node_{weigher}", shown
    assert not [p for p in walk(plan) if "Sort" in p["Node Type"]], shown
    # best-first and stops: the 200 skipped nodes and the winner, not the fleet
    assert read(scan) <= SKIPPED + 5, shown
    for other in walk(plan):
        if "Relation Name" in other and other is not scan:
            # each per-node check is a lookup: nothing read that its index did not select
            assert other["Node Type"] in ("Index Scan", "Index Only Scan", "Seq Scan"), shown
            if other["Relation Name"] != "node_state":  # a few seeded rows
                assert other["Node Type"] != "Seq Scan", shown
                assert other.get("Rows Removed by Filter", 0) <= 1, shown
                assert read(other) <= 2 * (SKIPPED + 5), shown  # no table read whole
    # nor a join that pairs every node with every row of a table and filters
    assert sum(p.get("Rows Removed by Join Filter", 0) for p in walk(plan)) <= SKIPPED + 5, shown


def test_without_the_walk_the_stale_plan_sorts_the_fleet(stale_fleet, tmp_path):
    """Why the scheduler sets what it sets: the same statement, planned on these stale
    statistics without it, reads every node and sorts them (the detector above would
    catch a scheduler that stopped sending the settings)."""
    _vm, sent = create_and_capture(stale_fleet, "spread", tmp_path)
    plan = scheduler_plan(stale_fleet["url"], sent, settings=False)
    assert [p for p in walk(plan) if p["Node Type"] == "Sort"], json.dumps(plan)[:3000]
    nodes = [p for p in walk(plan) if p.get("Relation Name") == "node"]
    assert sum(read(p) for p in nodes) >= NODES - 2 * SKIPPED
