"""POST /vm/<id>/migrate on libvirt's test driver: roles, validation, every refusal, and a
failure at each step leaving the VM where it was with nothing on the target.

The test driver cannot migrate (nor copy a volume through a stream), so every move here
fails at the step that moves the domain, or earlier where a fault is injected by wrapping
the real driver (tests/faults.py). Moves that succeed run between two real libvirtd hosts
(tests/hypervisor/test_migrate_api.py).
"""

import json
import logging

import pytest
import sqlalchemy as sa

from tests.api.test_metrics import scrape, value
from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

POOL = "vmapi"  # the seeded storage types' pool


@pytest.fixture
def faults(app):
    app.extensions[DRIVER_KEY] = FaultyDriver(app.extensions[DRIVER_KEY])
    return app.extensions[DRIVER_KEY]


@pytest.fixture
def pair(api, vm_host, test_method):
    """Nodes a and b (each its own test-driver host) and a running VM on a with a data
    volume."""
    a, b = vm_host(), vm_host()
    vm = api.post("vm", json=vm_body(test_method, node={"id": a["id"]})).json["data"]
    disk = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    storage = api.post("storage", json=disk).json["data"]
    return {"a": a, "b": b, "vm": vm, "storage": storage}


def books(api, app, driver, pair):
    """Everything a move could change or leave behind."""
    a, b, vm = pair["a"], pair["b"], pair["vm"]
    with app.app_context():
        leftovers = db.session.execute(sa.text("SELECT node_id, kind, name FROM leftover")).all()
        marker = db.session.scalar(
            sa.text("SELECT migration_node_id FROM vm WHERE id = :id"), {"id": vm["id"]}
        )
        db.session.remove()
    node = {n: api.get(f"node/{pair[n]['id']}").json["data"] for n in "ab"}
    storage = api.get(f"storage/{pair['storage']['id']}").json["data"] if pair["storage"] else None
    return {
        "vm_node": api.get(f"vm/{vm['id']}").json["data"]["node"],
        "vm_state": api.get(f"vm/{vm['id']}").json["data"]["vm_state"],
        "allocated": {n: (node[n]["allocated_cores"], node[n]["allocated_ram"]) for n in "ab"},
        "domains": {
            n: sorted(d.name for d in driver.domains(pair[n]["libvirt_uri"])) for n in "ab"
        },
        "volumes_b": volumes(driver, b),
        "volumes_a": volumes(driver, a),
        "storage": storage,
        "marker": marker,
        "leftovers": [tuple(row) for row in leftovers],
    }


def volumes(driver, node):
    try:
        return driver.volumes(node["libvirt_uri"], POOL)
    except Exception:  # no pool there yet
        return []


def unchanged(pair, installation):
    """The books of ``pair`` as they were before any move."""
    vm = pair["vm"]
    return {
        "vm_node": {"id": pair["a"]["id"]},
        "vm_state": {"id": 2},  # running
        "allocated": {"a": (2, GIB), "b": (0, 0)},
        "domains": {"a": [vm["domain_name"]], "b": []},
        "volumes_b": [],
        "volumes_a": [f"{installation}-storage-{pair['storage']['id']}"] if pair["storage"] else [],
        "storage": pair["storage"],
        "marker": None,
        "leftovers": [],
    }


# ---------------------------------------------------------------------- roles, validation
def test_customers_may_not_move_even_their_own_vms(api, customer_api, vm_host, test_method):
    a, _b = vm_host(), vm_host()
    vm = api.post("vm", json=vm_body(test_method, node={"id": a["id"]}, customer_id=7))
    response = customer_api(7).post(f"vm/{vm.json['data']['id']}/migrate", json={})
    assert_error(response, 403, "general/authorization/forbidden")
    assert api.get(f"vm/{vm.json['data']['id']}").json["data"]["node"] == {"id": a["id"]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"live": "yes"}, "live"),
        ({"node": 2}, "node"),
        ({"node": {"id": "two"}}, "node"),
        ({"force": True}, "force"),
    ],
)
def test_bad_bodies_are_refused(api, app, driver, pair, installation, body, field):
    response = api.post(f"vm/{pair['vm']['id']}/migrate", json=body)
    error = assert_error(response, 400, "general/validation")
    assert field in error["data"]
    assert books(api, app, driver, pair) == unchanged(pair, installation)


def test_an_array_body_and_query_parameters_are_refused(api, pair):
    assert_error(api.post(f"vm/{pair['vm']['id']}/migrate", json=[{}]), 400, "general/validation")
    assert_error(api.post(f"vm/{pair['vm']['id']}/migrate?live=false"), 400, "general/validation")


def test_unknown_vm_and_unknown_node(api, pair):
    assert_error(api.post("vm/999/migrate", json={}), 404, "vm/not_found")
    error = assert_error(
        api.post(f"vm/{pair['vm']['id']}/migrate", json={"node": {"id": 999}}), 404,
        "vm/node_not_found",
    )  # fmt: skip
    assert error["data"] == {"node": {"id": 999}}


def test_a_named_node_that_cannot_take_it(api, app, driver, pair, installation, vm_host):
    vm = pair["vm"]
    own = api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": pair["a"]["id"]}})
    assert assert_error(own, 409, "vm/node_unsuitable")["data"]["reasons"] == ["source"]
    small = vm_host(cores=1)
    error = assert_error(
        api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": small["id"]}}), 409,
        "vm/node_unsuitable",
    )  # fmt: skip
    assert error["data"]["reasons"] == ["enough_cores"]
    api.update(f"node/{pair['b']['id']}", json={"node_state": {"id": 2}})  # maintenance
    error = assert_error(
        api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": pair["b"]["id"]}}), 409,
        "vm/node_unsuitable",
    )  # fmt: skip
    assert error["data"]["reasons"] == ["state_schedulable"]
    api.update(f"node/{pair['b']['id']}", json={"node_state": {"id": 1}})
    assert books(api, app, driver, pair) == unchanged(pair, installation)


def test_no_other_node_can_take_it(api, app, driver, pair, installation):
    api.update(f"node/{pair['b']['id']}", json={"node_state": {"id": 2}})
    error = assert_error(api.post(f"vm/{pair['vm']['id']}/migrate"), 409, "vm/no_valid_host")
    # b is in maintenance; a, its own node, holds its UUID
    removed = error["data"]["removed_by_filter"]
    assert (removed["state_schedulable"], removed["uuid_free"]) == (1, 1)
    api.update(f"node/{pair['b']['id']}", json={"node_state": {"id": 1}})
    assert books(api, app, driver, pair) == unchanged(pair, installation)


def test_a_running_vm_does_not_move_cold(api, app, driver, pair, installation):
    response = api.post(f"vm/{pair['vm']['id']}/migrate", json={"live": False})
    error = assert_error(response, 409, "vm/state_conflict")
    assert error["data"] == {"state": "running"} and "Shut it off" in error["message"]
    api.update(f"vm/{pair['vm']['id']}", json={"vm_state": {"id": 3}})  # paused: still live only
    response = api.post(f"vm/{pair['vm']['id']}/migrate", json={"live": False})
    assert assert_error(response, 409, "vm/state_conflict")["data"] == {"state": "paused"}


def test_a_vm_being_built_does_not_move(api, app, pair):
    with app.app_context():
        db.session.execute(sa.text("UPDATE vm SET vm_state_id = 1 WHERE id = :id"),
                           {"id": pair["vm"]["id"]})  # fmt: skip
        db.session.commit()
        db.session.remove()
    assert_error(api.post(f"vm/{pair['vm']['id']}/migrate"), 409, "vm/state_conflict")


def test_the_target_claim_lost_to_a_race_leaves_nothing(
    api, app, driver, pair, installation, monkeypatch
):
    """Between the filters and the claim, another request takes b's room."""
    from vmapi.services.nodes import placement

    real = placement.claim

    def raced(node_id, cores, ram):
        engine = sa.create_engine(app.config["DATABASE_URL"], poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE node SET free_cores = 0 WHERE id = :id"), {"id": node_id})
        engine.dispose()
        return real(node_id, cores, ram)

    monkeypatch.setattr(placement, "claim", raced)
    error = assert_error(
        api.post(f"vm/{pair['vm']['id']}/migrate", json={"node": {"id": pair["b"]["id"]}}), 409,
        "vm/node_unsuitable",
    )  # fmt: skip
    assert error["data"]["reasons"] == ["enough_cores", "enough_ram"]
    with app.app_context():
        db.session.execute(sa.text("UPDATE node SET free_cores = 8 WHERE id = :id"),
                           {"id": pair["b"]["id"]})  # fmt: skip
        db.session.commit()
        db.session.remove()
    assert books(api, app, driver, pair) == unchanged(pair, installation)


# ---------------------------------------------------------------------- failures at each step
@pytest.mark.parametrize(
    ("method", "kind", "status", "error_id", "step", "at"),
    [
        ("ensure_pool", "error", 502, "vm/hypervisor_error", "preparing storage {s} on the target",
         "b"),
        ("create_volume", "error", 502, "vm/hypervisor_error", "making storage {s} on the target",
         "b"),
        ("create_volume", "timeout", 504, "vm/hypervisor_timeout",
         "making storage {s} on the target", "b"),
        ("migrate", "error", 502, "vm/hypervisor_error", "moving the domain", "a"),
        ("migrate", "unavailable", 502, "vm/hypervisor_error", "moving the domain", "a"),
        ("migrate", "timeout", 504, "vm/hypervisor_timeout", "moving the domain", "a"),
        (None, None, 502, "vm/hypervisor_error", "moving the domain", "a"),  # the test driver
    ],
)  # fmt: skip
def test_a_failure_at_each_step_leaves_the_vm_where_it_was(
    api, app, driver, faults, pair, installation, method, kind, status, error_id, step, at
):
    faults.calls.clear()
    if method:
        faults.fail(method, kind)
    error = assert_error(api.post(f"vm/{pair['vm']['id']}/migrate", json={}), status, error_id)
    assert error["data"]["step"] == step.format(s=pair["storage"]["id"])
    assert error["data"]["node"] == {"id": pair[at]["id"]}
    if error["data"]["step"] == "moving the domain":
        assert error["data"]["target"] == {"id": pair["b"]["id"]}
        stays = f"vm-{pair['vm']['id']} stays on" in error["message"]
        assert stays or "keeps running" in error["message"]
    assert books(api, app, driver, pair) == unchanged(pair, installation)
    # the volume was made on b before the move, and deleted by the undo
    made = "create_volume" in faults.calls
    assert made == (method != "ensure_pool")
    assert ("delete_volume" in faults.calls) == made


def test_a_disk_less_vm_that_cannot_move(api, app, driver, vm_host, test_method, installation):
    a, b = vm_host(), vm_host()
    vm = api.post("vm", json=vm_body(test_method, node={"id": a["id"]})).json["data"]
    error = assert_error(api.post(f"vm/{vm['id']}/migrate"), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "moving the domain"
    pair = {"a": a, "b": b, "vm": vm, "storage": None}
    assert books(api, app, driver, pair) == unchanged(pair, installation)


def test_a_shut_off_vm_moves_cold_and_its_volumes_are_copied_first(
    api, app, driver, pair, installation
):
    vm = pair["vm"]
    assert api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}}).status_code == 200
    # the test driver has no volume streams: the copy of the data volume fails
    error = assert_error(
        api.post(f"vm/{vm['id']}/migrate", json={"live": False}), 502, "vm/hypervisor_error"
    )
    assert error["data"]["step"] == f"copying storage {pair['storage']['id']} on the target"
    assert books(api, app, driver, pair) == {**unchanged(pair, installation), "vm_state": {"id": 4}}


def test_a_volume_of_that_name_on_the_target_is_never_touched(api, app, driver, pair, installation):
    name = f"{installation}-storage-{pair['storage']['id']}"
    driver.ensure_pool(pair["b"]["libvirt_uri"], POOL, "/nowhere")
    driver.create_volume(pair["b"]["libvirt_uri"], POOL, name, GIB, "raw")  # not ours there
    error = assert_error(api.post(f"vm/{pair['vm']['id']}/migrate"), 502, "vm/hypervisor_error")
    assert "does not own" in error["message"] and "shared" in error["message"]
    assert driver.volumes(pair["b"]["libvirt_uri"], POOL) == [name]  # still there
    assert books(api, app, driver, pair) == {**unchanged(pair, installation), "volumes_b": [name]}


# ---------------------------------------------------------------------- records
def test_refusals_and_failures_are_audited_counted_and_logged(api, client, pair, caplog):
    vm = pair["vm"]
    before = scrape(client, api.token)
    with caplog.at_level(logging.INFO, logger="vmapi.hypervisor"):
        assert api.post(f"vm/{vm['id']}/migrate").status_code == 502
    assert api.post(f"vm/{vm['id']}/migrate", json={"live": False}).status_code == 409
    after = scrape(client, api.token)
    for labels in ({"kind": "live", "outcome": "vm/hypervisor_error"},
                   {"kind": "cold", "outcome": "vm/state_conflict"}):  # fmt: skip
        total = "vmapi_migrations_total"
        assert value(after, total, **labels) - value(before, total, **labels) == 1
    count = "vmapi_migration_duration_seconds_count"
    assert value(after, count, kind="live") - value(before, count, kind="live") == 1
    events = api.get(f"event?resource=vm&object_id={vm['id']}&action=migrate").json["data"]
    assert [(e["outcome"], e["status"]) for e in events.values()] == [
        ("vm/hypervisor_error", 502),
        ("vm/state_conflict", 409),
    ]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "vmapi.hypervisor"]
    [move] = [line for line in lines if line["action"] == "migrate"]
    assert move["domain"] == vm["domain_name"] and move["result"] != "ok"
    assert move["node"] == pair["a"]["libvirt_uri"] and move["target"] == pair["b"]["libvirt_uri"]


def test_the_openapi_document_describes_the_move(client):
    document = client.get("/api/v1/openapi.json").json
    operation = document["paths"]["/api/v1/vm/{ident}/migrate"]["post"]
    assert operation["requestBody"]["required"] is False
    body = document["components"]["schemas"]["VmMigrateBody"]["properties"]
    assert set(body) == {"node", "live"}
    for status in ("200", "403", "404", "409", "502", "504"):
        assert status in operation["responses"], status


# ---------------------------------------------------------------------- node and type fields
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("migration_uri", "qemu+ext:///system"),
        ("migration_uri", "qemu+ssh://hv2.example.com/system?command=/bin/sh"),
        ("migration_address", "tcp://2001:db8::1"),
        ("migration_address", "127.0.0.1:49152"),
        ("migration_address", "-oProxyCommand=x"),
        ("migration_address", "ssh://hv2.example.com"),
    ],
)
def test_node_migration_fields_are_checked(api, field, value):
    from tests.conftest import node_body

    error = assert_error(api.post("node", json=node_body(**{field: value})), 400,
                         "general/validation")  # fmt: skip
    assert field in error["data"]


def test_node_migration_fields_and_shared_types_are_kept(api, make_node):
    plain = make_node()
    assert (plain["migration_uri"], plain["migration_address"]) == (None, None)
    node = make_node(migration_uri="qemu+tls://hv2.example.com/system",
                     migration_address="tcp://[2001:db8::7]:49200")  # fmt: skip
    assert node["migration_uri"] == "qemu+tls://hv2.example.com/system"
    assert node["migration_address"] == "tcp://[2001:db8::7]:49200"
    assert api.get("storage_type/1").json["data"]["shared"] is False  # seeded: local
    kind = {"name": "nfs", "description": "on the NFS every node mounts", "pool": "nfs",
            "format": "raw", "shared": True}  # fmt: skip
    assert api.post("storage_type", json=kind).json["data"]["shared"] is True


class Spy:
    """The real driver; what ``migrate`` was asked, before it runs (and fails: the test
    driver cannot migrate)."""

    def __init__(self, real):
        self.real, self.asked = real, []

    def __getattr__(self, name):
        target = getattr(self.real, name)
        if name != "migrate":
            return target

        def migrate(uri, name, dest_uri, **kwargs):
            self.asked.append((uri, name, dest_uri, kwargs))
            return target(uri, name, dest_uri, **kwargs)

        return migrate


def test_the_move_goes_where_the_target_node_says(api, app, pair):
    b = pair["b"]
    changed = {"migration_uri": "qemu+tls://hv2.example.com/system",
               "migration_address": "192.0.2.9", "console_address": "198.51.100.20"}  # fmt: skip
    assert api.update(f"node/{b['id']}", json=changed).status_code == 200
    spy = app.extensions[DRIVER_KEY] = Spy(app.extensions[DRIVER_KEY])
    assert api.post(f"vm/{pair['vm']['id']}/migrate").status_code == 502  # the test driver
    [(uri, name, dest, asked)] = spy.asked
    assert (uri, name, dest) == (pair["a"]["libvirt_uri"], pair["vm"]["domain_name"],
                                 "qemu+tls://hv2.example.com/system")  # fmt: skip
    assert asked["live"] is True and asked["migration_address"] == "192.0.2.9"
    assert asked["display"].listen == "198.51.100.20"  # the target's, sealed
    assert asked["display"].password_valid_to.year == 2000
    assert asked["copy_storage"] is True and asked["unchecked_storage"] is False
    with app.app_context():
        path = db.session.scalar(sa.text("SELECT path FROM storage"))
        db.session.remove()
    [(source_path, target_path)] = asked["disk_paths"].items()
    assert source_path == path and target_path  # the data volume, made on b to copy into
    assert asked["console_log"].endswith(f"{pair['vm']['domain_name']}.log")


def test_no_libvirt_call_while_a_row_lock_is_held(api, app, pair):
    """A move's claim, leftovers and record commit before and after libvirt is called,
    never around it (issue 7's rule; the spy of tests/api/test_lock_hold.py)."""
    from tests.api.test_lock_hold import LockSpy

    spy = app.extensions[DRIVER_KEY] = LockSpy(app.extensions[DRIVER_KEY],
                                               app.config["DATABASE_URL"])  # fmt: skip
    assert api.post(f"vm/{pair['vm']['id']}/migrate").status_code == 502  # the test driver
    calls = {name for name, _ in spy.seen}
    assert {"domain", "ensure_pool", "create_volume", "pool_dir", "migrate",
            "delete_volume", "delete_log"} <= calls, calls  # fmt: skip
    assert [(name, held) for name, held in spy.seen if held] == []
    spy.engine.dispose()
