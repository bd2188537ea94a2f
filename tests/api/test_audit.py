"""The audit trail (issue 8): every change recorded in its own transaction, /event to
read it with filters and paging, customers seeing their own, failures with their error
id, and no secrets."""

from datetime import timedelta

import pytest

from tests.conftest import GIB, Api, make_token, vm_body
from tests.errors import assert_error
from vmapi.extensions import db
from vmapi.models import Event


def events(api, **filters):
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    response = api.get(f"event?limit=1000&{query}")
    assert response.status_code == 200, response.json
    return list(response.json["data"].values())


def test_a_create_is_recorded_with_who_when_and_what(app, client, api, vm_host, test_method):
    vm_host()
    auditor = Api(client, make_token(app, "admin", name="auditor"))
    response = auditor.post("vm", json=vm_body(test_method, customer_id=7))
    assert response.status_code == 201
    vm = response.json["data"]
    mine = events(api, resource="vm", object_id=vm["id"])
    assert [e["action"] for e in mine] == ["create", "update"]
    created, started = mine
    assert created["after"]["cores"] == 2 and created["after"]["ram"] == GIB
    assert created["after"]["customer_id"] == 7
    assert created["before"] is None and created["outcome"] == "ok"
    assert started["before"]["vm_state_id"] != started["after"]["vm_state_id"]
    assert set(started["after"]) == {"vm_state_id"}  # an update lists what changed
    for e in mine:
        assert e["request_id"] == response.headers["X-Request-Id"]
        assert e["actor"] == "auditor" and e["customer_id"] == 7
        assert e["at"]
    interface = events(api, resource="interface", object_id=vm["interfaces"][0]["id"])
    assert interface[0]["action"] == "create" and interface[0]["customer_id"] == 7
    held = events(api, resource="ipv4", action="update")
    assert held and held[-1]["after"] == {"interface_id": vm["interfaces"][0]["id"]}


def test_update_and_delete_record_before_and_after(api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert api.update(f"vm/{vm['id']}", json={"cores": 3}).status_code == 200
    assert api.delete(f"vm/{vm['id']}").status_code == 200
    mine = events(api, resource="vm", object_id=vm["id"])
    resize = [e for e in mine if e["action"] == "update" and "cores" in e["after"]]
    assert resize[0]["before"]["cores"] == 2 and resize[0]["after"]["cores"] == 3
    deleted = mine[-1]
    assert deleted["action"] == "delete" and deleted["after"] is None
    assert deleted["before"]["id"] == vm["id"] and deleted["before"]["cores"] == 3
    released = events(api, resource="ipv4", action="update")
    assert released[-1]["after"] == {"interface_id": None}


def test_a_failed_change_is_recorded_with_its_error_id(api, vm_host, test_method):
    vm_host(cores=1)
    response = api.post("vm", json=vm_body(test_method, cores=64))
    assert_error(response, 409, "vm/no_valid_host")
    failed = events(api, outcome="vm/no_valid_host")
    assert len(failed) == 1
    assert failed[0]["status"] == 409 and failed[0]["action"] == "create"
    assert (
        failed[0]["resource"] == "vm"
        and failed[0]["request_id"] == response.headers["X-Request-Id"]
    )
    assert events(api, resource="vm", outcome="ok") == []  # nothing was changed


def test_the_event_and_the_change_commit_together(app, api, vm_host, test_method, monkeypatch):
    """An event that cannot be written takes its change down with it."""
    node = vm_host()
    monkeypatch.setattr("vmapi.services.audit.plain", lambda value: object())  # not JSON
    response = api.post("vm", json=vm_body(test_method))
    assert response.status_code == 500
    monkeypatch.undo()
    assert api.get("vm").json["data"] == {}
    assert api.get(f"node/{node['id']}").json["data"]["allocated_cores"] == 0
    assert events(api, resource="vm", outcome="ok") == []


def test_secrets_are_never_recorded(app, runner, api):
    result = runner.invoke(args=["vmapi", "token", "create", "--admin", "--name", "ops"])
    assert result.exit_code == 0, result.output
    plain = result.output.strip().splitlines()[-1]
    created = [e for e in events(api, resource="token") if e["after"]["name"] == "ops"]
    assert created and created[0]["actor"].startswith("cli:")
    assert "token_hash" not in created[0]["after"]
    with app.app_context():
        dumped = str([(e.before, e.after) for e in db.session.query(Event).all()])
    assert plain not in dumped


def test_customers_read_their_own_events_only(app, client, api, vm_host, test_method):
    vm_host(cores=16, ram=64 * GIB)
    seven, eight = (Api(client, make_token(app, "customer", c)) for c in (7, 8))
    vm7 = seven.post("vm", json=vm_body(test_method)).json["data"]
    vm8 = eight.post("vm", json=vm_body(test_method)).json["data"]
    own = events(seven)
    assert own and {e["customer_id"] for e in own} == {7}
    assert vm7["id"] in {e["object_id"] for e in own if e["resource"] == "vm"}
    other = events(api, resource="vm", object_id=vm8["id"])[0]
    assert_error(seven.get(f"event/{other['id']}"), 404, "event/not_found")
    assert eight.get(f"event/{other['id']}").status_code == 200


def test_events_page_filter_and_cannot_be_written(api, vm_host, test_method):
    vm_host(cores=16, ram=64 * GIB)
    for _ in range(3):
        api.post("vm", json=vm_body(test_method, cores=1))
    first = api.get("event?limit=2&resource=vm")
    assert len(first.json["data"]) == 2 and 'rel="next"' in first.headers["Link"]
    last = max(int(i) for i in first.json["data"])
    rest = api.get(f"event?resource=vm&after={last}").json["data"]
    assert rest and all(int(i) > last for i in rest)
    assert all(e["resource"] == "vm" for e in rest.values())
    for method in ("post", "delete", "update"):
        response = getattr(api, method)("event", json={})
        assert_error(response, 405, "general/method_not_allowed")


@pytest.mark.embedded
def test_the_trail_works_on_the_embedded_database(api, backend):
    assert api.post("node_state", json={"name": "burn-in"}).status_code == 201
    made = events(api, resource="node_state", action="create")
    assert made[-1]["after"]["name"] == "burn-in"
    assert made[-1]["at"].endswith("+00:00")  # SQLite keeps no zone; every time is UTC


def test_events_past_their_retention_are_purged(app, runner, api):
    assert api.post("node_state", json={"name": "old"}).status_code == 201
    with app.app_context():
        aged = db.session.query(Event).all()
        for e in aged:
            e.at = e.at - timedelta(days=31)
        db.session.commit()
    assert api.post("node_state", json={"name": "new"}).status_code == 201
    result = runner.invoke(args=["vmapi", "event", "purge", "--older-than", "30"])
    assert result.exit_code == 0, result.output
    assert f"deleted {len(aged)} event(s)" in result.output
    names = [e["after"]["name"] for e in events(api, resource="node_state")]
    assert names == ["new"]
    assert runner.invoke(args=["vmapi", "event", "purge", "--older-than", "0"]).exit_code != 0
