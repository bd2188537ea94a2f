"""A page of ``GET /vm`` walks an index in id order whatever the planner's statistics say
(issue 22), as placement does (tests/api/test_placement_plans.py).

On a VM table PostgreSQL has no statistics for (never analyzed, or analyzed while empty:
this machine's PostgreSQL runs with autovacuum off, and in production statistics are as
stale right after a fleet is registered in bulk), it took 4,000 VMs for 132 rows and
read the whole table and sorted it for every page: the list page was 1.43 x from 150 to
3,000 VMs (docs/benchmarks-history.md, 2026-11-30 10:12). Here a fleet of 4,000 VMs is
bulk-inserted into a fresh database, half of it one customer's, pages are read through
the API as an admin and as customers (first pages and ``after=`` pages), and the page
statement is replayed with ``EXPLAIN ANALYZE`` after the planner settings the app sent
before it: the VM table must be read by one Index Scan (the primary key, or a customer's
``ix_vm_customer_page``) that stops after the page, nothing sorted, no table read whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from bench.common import host_file, populate
from tests.api.test_placement_plans import autocommit, read, walk
from tests.conftest import create_database, drop_database, make_token, migrate
from vmapi.app import create_app
from vmapi.extensions import db

NODES, VMS_PER_NODE, LIMIT = 2_000, 2, 100
STATS = ("never analyzed", "analyzed while empty")
TABLES = ("node", "virt_node", "vm", "interface", "ipv4_address")
BIG, SMALL = 1, 7  # customers: half the fleet, and four VMs


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
        fleet = populate(url, NODES, VMS_PER_NODE, uri, addresses=10, analyze=False)
        autocommit(url, f"UPDATE vm SET customer_id = {BIG} WHERE id % 2 = 0")
        analyzed = autocommit(url, "SELECT relname FROM pg_stat_user_tables WHERE"
                                   " last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL")  # fmt: skip
        if request.param == "never analyzed":
            assert analyzed == [], "the fleet's tables were analyzed: the test means nothing"
        app = create_app({"DATABASE_URL": url, "TESTING": True})
        tokens = {"admin": make_token(app, "admin"),
                  "big customer": make_token(app, "customer", BIG),
                  "small customer": make_token(app, "customer", SMALL)}  # fmt: skip
        small = [row[0] for row in autocommit(url, f"SELECT id FROM vm WHERE customer_id ="
                                                   f" {SMALL} ORDER BY id")]  # fmt: skip
        assert len(small) >= 3
        yield {"url": url, "app": app, "tokens": tokens, "ids": fleet.vm_ids, "small": small}
        with app.app_context():
            db.engine.dispose()
    finally:
        drop_database(pg_server, url)


def get_and_capture(fleet: dict, who: str, query: str) -> tuple[dict, list[tuple]]:
    """GET /vm?``query`` as ``who``; the answer's data and every statement sent."""
    app = fleet["app"]
    with app.app_context():
        engine = db.engine
    sent: list[tuple] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        response = app.test_client().get(
            f"/api/v1/vm?{query}", headers={"Authorization": f"Bearer {fleet['tokens'][who]}"}
        )
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200, response.json
    return response.json["data"], sent


def page_plan(url: str, sent: list[tuple], settings: bool = True) -> dict:
    """``EXPLAIN ANALYZE`` of the page's statement (the one reading ``vm``), after the
    planner settings the app sent before it (``settings=False``: without them)."""
    index = max(i for i, (s, _p) in enumerate(sent) if "FROM vm" in s)
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


def pages(fleet: dict) -> list[tuple[str, str, str, list[int]]]:
    """(who, query, the index the VM table must be walked by, the ids the page holds)."""
    ids, small = fleet["ids"], fleet["small"]
    middle = ids[len(ids) // 2]
    big = [i for i in ids if i % 2 == 0]
    return [
        ("admin", f"limit={LIMIT}", "pk_vm", ids[:LIMIT]),
        ("admin", f"limit={LIMIT}&after={middle}", "pk_vm",
         [i for i in ids if i > middle][:LIMIT]),
        ("big customer", f"limit={LIMIT}", "ix_vm_customer_page", big[:LIMIT]),
        ("big customer", f"limit={LIMIT}&after={middle}", "ix_vm_customer_page",
         [i for i in big if i > middle][:LIMIT]),
        ("small customer", f"limit={LIMIT}", "ix_vm_customer_page", small),
        ("small customer", f"limit={LIMIT}&after={small[1]}", "ix_vm_customer_page", small[2:]),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(6), ids=["admin first", "admin after", "big first",
                                                "big after", "small first", "small after"])  # fmt: skip
def test_a_page_walks_an_index_on_stale_statistics(stale_fleet, case):
    who, query, index, expected = pages(stale_fleet)[case]
    data, sent = get_and_capture(stale_fleet, who, query)
    assert [int(key) for key in data] == expected
    plan = page_plan(stale_fleet["url"], sent)
    shown = json.dumps(plan, indent=1)[:6000]
    assert not [p for p in walk(plan) if "Sort" in p["Node Type"]], shown
    scans = [p for p in walk(plan) if p.get("Relation Name") == "vm"]
    assert len(scans) == 1, shown
    scan = scans[0]
    assert (scan["Node Type"], scan["Index Name"]) == ("Index Scan", index), shown
    # in id order and stops: the page and the one row that tells whether more follow
    assert read(scan) <= LIMIT + 1, shown
    for other in walk(plan):
        assert other["Node Type"] != "Seq Scan", shown  # no table read whole


def test_without_the_setting_the_stale_plan_sorts_the_fleet(stale_fleet):
    """Why the page is read with sorting off: the same statement, planned on these stale
    statistics without it, reads every VM and sorts them (the test above would catch a
    read that stopped sending the setting)."""
    _data, sent = get_and_capture(stale_fleet, "admin", f"limit={LIMIT}")
    plan = page_plan(stale_fleet["url"], sent, settings=False)
    assert [p for p in walk(plan) if p["Node Type"] == "Sort"], json.dumps(plan)[:3000]
    scans = [p for p in walk(plan) if p.get("Relation Name") == "vm"]
    assert sum(read(p) for p in scans) >= NODES * VMS_PER_NODE
