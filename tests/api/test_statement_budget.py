"""Round trips per request, counted: a page costs the same whatever its size and nest,
and the hot paths stay within a budget (issue 7; a regression here costs every user).
"""

import pytest
from sqlalchemy import event

from tests.conftest import GIB, vm_body
from vmapi.extensions import db

# statements per POST /vm: 16 (21 before issue 7's profile), plus one INSERT of audit
# events for each of its two commits (issue 8)
CREATE_BUDGET = 15
GET_BUDGET = 1  # statements per GET /vm/<id> with a cached token (was 3, plus a ping)


@pytest.fixture
def counted(app):
    statements: list[str] = []
    with app.app_context():
        engine = db.engine

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield statements
    event.remove(engine, "before_cursor_execute", record)


def count(counted, call):
    counted.clear()
    response = call()
    assert response.status_code in (200, 201), response.json
    return len(counted)


def test_a_page_costs_the_same_whatever_its_size_and_nest(api, vm_host, test_method, counted):
    for _ in range(2):
        vm_host(cores=16, ram=64 * GIB)
    for _ in range(12):
        assert api.post("vm", json=vm_body(test_method, cores=1)).status_code == 201
    nest = "nest=node,vm_state,virt_method"
    small = count(counted, lambda: api.get(f"vm?limit=2&{nest}"))
    large = count(counted, lambda: api.get(f"vm?limit=12&{nest}"))
    plain = count(counted, lambda: api.get("vm?limit=12"))
    assert small == large  # no query per row
    assert large == plain + 3  # one per nested reference, not per VM


def test_create_and_read_stay_within_budget(api, vm_host, test_method, counted):
    vm_host(cores=16, ram=64 * GIB)
    # the first create fills per-database caches (seeded state ids) and skips the IPv6
    # pool's gateway address; the second is the steady state
    assert api.post("vm", json=vm_body(test_method)).status_code == 201
    created = count(counted, lambda: api.post("vm", json=vm_body(test_method)))
    vm_id = max(int(i) for i in api.get("vm").json["data"])
    read = count(counted, lambda: api.get(f"vm/{vm_id}"))
    assert created <= CREATE_BUDGET, counted
    assert read <= GET_BUDGET, counted
