"""Hostile input: always a 4xx envelope with the right error id, and nothing changes:
every row of every table, and the libvirt test driver's domains, pools and volumes, are
read before the request and again after it."""

from typing import Any

import pytest
import sqlalchemy as sa

from tests.errors import assert_error
from vmapi.extensions import db
from vmapi.models import Event

pytestmark = pytest.mark.embedded

#: the libvirt host of the nodes made here (make_node's default URI)
LIBVIRT = "test:///default"


@pytest.fixture
def state(app, driver):
    """``state()``: everything a request could change, to compare before and after it:
    the rows of every table but the audit trail's (``event``, apart: a refused write is
    recorded there), and the libvirt test driver's domains and pools with their volumes."""

    def read() -> dict[str, Any]:
        with app.app_context():
            tables = [t for t in db.metadata.sorted_tables if t.name != "event"]
            rows = {
                f"table {t.name}": sorted(map(tuple, db.session.execute(sa.select(t))), key=repr)
                for t in tables
            }
            events = [dict(row) for row in db.session.execute(
                sa.select(Event.id, Event.resource, Event.action, Event.outcome, Event.status,
                          Event.before, Event.after).order_by(Event.id)).mappings()]  # fmt: skip
            db.session.remove()
        conn = driver.connections.get(LIBVIRT, 5)
        domains = sorted((d.name(), d.state(), d.XMLDesc(0)) for d in conn.listAllDomains())
        pools = sorted(
            (p.name(), p.isActive(), sorted(p.listVolumes()) if p.isActive() else [])
            for p in conn.listAllStoragePools()
        )
        return {**rows, "libvirt domains": domains, "libvirt pools": pools, "events": events}

    return read


def assert_unchanged(before: dict[str, Any], after: dict[str, Any], refused=None) -> None:
    """Nothing changed between the two states; the audit trail gained only the refused
    write's one event (``refused``: its resource, action, error id and status; fields
    none), or nothing at all for a read (None)."""
    differ = {key: (before[key], after[key]) for key in before
              if key != "events" and before[key] != after[key]}  # fmt: skip
    assert differ == {}, differ
    new = [{k: v for k, v in event.items() if k != "id"} for event in after["events"]
           if event not in before["events"]]  # fmt: skip
    assert after["events"][: len(before["events"])] == before["events"]
    expected = []
    if refused is not None:
        resource, action, outcome, status = refused
        expected = [{"resource": resource, "action": action, "outcome": outcome,
                     "status": status, "before": None, "after": None}]  # fmt: skip
    assert new == expected


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000 + "]" * 100_000,  # nesting deeper than any parser's recursion
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        '{"name": "x", "name": "y"}',  # a key twice is ambiguous: refused, not guessed
    ],
)
def test_deeply_nested_or_odd_json(api, state, raw):
    before = state()
    response = api.post("node_state", data=raw, content_type="application/json")
    assert_error(response, 400, "general/malformed_body")
    assert_unchanged(before, state(), ("node_state", "create", "general/malformed_body", 400))


def test_deeply_nested_msgpack(api, state):
    before = state()
    raw = b"\x91" * 100_000 + b"\x00"
    assert_error(
        api.post("node_state", data=raw, headers={"Content-Type": "application/msgpack"}),
        400,
        "general/malformed_body",
    )
    assert_unchanged(before, state(), ("node_state", "create", "general/malformed_body", 400))


@pytest.mark.parametrize(
    "body",
    [
        {"name": {"nested": ["garbage", {"deeper": None}]}},
        {"name": ["a", "b"]},
        {"name": 12345678901234567890123},
        {"name": "x", "schedulable": {"$ne": None}},
        {"name": "x'; DROP TABLE node_state; --"},
    ],
)
def test_garbage_fields(api, state, body):
    before = state()
    response = api.post("node_state", json=body)
    if response.status_code == 201:  # a SQL-looking name is just a (refused) name
        pytest.fail(f"accepted {body}")
    assert_error(response, 400, "general/validation")
    assert_unchanged(before, state(), ("node_state", "create", "general/validation", 400))


@pytest.mark.parametrize("value", [2**64, -(2**64), 1e308, 1.5, True, "2", [], {}])
def test_numbers_where_integers_go(api, make_node, state, value):
    node = make_node()
    before = state()
    assert_error(api.update(f"node/{node['id']}", json={"cores": value}), 400, "general/validation")
    assert_unchanged(before, state(), ("node", "update", "general/validation", 400))


@pytest.mark.parametrize(
    "path",
    [
        "node_state/1%00",
        "node_state/%2e%2e/vm",
        "node_state/1;2",
        "node_state/0x1",
        "node_state/\uff11",  # a fullwidth digit one
    ],
)
def test_path_tricks(api, state, path):
    before = state()
    assert_error(api.get(path), 404, "general/not_found")
    assert_unchanged(before, state())


def test_array_over_the_limit_changes_nothing(api, state):
    before = state()
    assert_error(
        api.post("node_state", json=[{"name": f"n{i}"} for i in range(101)]),
        400,
        "general/validation",
    )
    assert_unchanged(before, state(), ("node_state", "create", "general/validation", 400))


@pytest.mark.parametrize("given", ["<script>alert(1)</script>", "a" * 129, "ünï", "a b"])
def test_odd_request_ids_are_replaced(api, given):
    response = api.get("node_state", headers={"X-Request-Id": given})
    assert response.headers["X-Request-Id"] != given and len(response.headers["X-Request-Id"]) == 32


def test_huge_token_header(client):
    response = client.get(
        "/api/v1/node_state", headers={"Authorization": "Bearer " + "a" * 100_000}
    )
    assert_error(response, 401, "general/authentication/failed")


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("limit=" + "9" * 5000, 400),
        ("after=" + "9" * 30, 400),
        ("cores=1e400", 400),
        ("node_state.id=-1", 400),
        ("nest=" + ",".join(["node_state"] * 1000), 200),  # the same nest, once
    ],
)
def test_hostile_query_strings(api, make_node, state, query, status):
    node = make_node()
    before = state()
    response = api.get(f"node?{query}")
    if status == 400:
        assert_error(response, 400, "general/validation")
    else:
        assert response.status_code == 200, response.json
        assert list(response.json["data"]) == [str(node["id"])]
        assert response.json["data"][str(node["id"])]["node_state"]["name"]  # nested
    assert_unchanged(before, state())
