"""flask vmapi node drain and node evacuate on libvirt's test driver, and reconcile's
part: interrupted moves settled, leftovers removed when their node answers again.

The test driver cannot migrate, so every move of a drain fails here (the real drain is
in tests/hypervisor/test_migrate_api.py); an evacuation defines and starts domains from
the database, which the test driver does.
"""

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.api.test_metrics import scrape, value
from tests.conftest import GIB, vm_body
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.models import Node, Storage, Vm
from vmapi.services.nodes.hosts import DRIVER_KEY

POOL = "vmapi"


def cli(runner, *args):
    result = runner.invoke(args=["vmapi", *args])
    return result.exit_code, result.output


def sql(app, statement, **params):
    with app.app_context():
        rows = db.session.execute(sa.text(statement), params)
        found = rows.all() if rows.returns_rows else None
        db.session.commit()
        db.session.remove()
    return [tuple(row) for row in found] if found is not None else None


@pytest.fixture
def fleet(api, vm_host, test_method):
    """Node a with two running VMs (the second with a data volume), and an empty node b."""
    a, b = vm_host(), vm_host()
    vms = [api.post("vm", json=vm_body(test_method, node={"id": a["id"]})).json["data"]
           for _ in range(2)]  # fmt: skip
    disk = {"size": GIB, "vm": {"id": vms[1]["id"]}, "storage_type": {"id": 1}}
    storage = api.post("storage", json=disk).json["data"]
    return {"a": a, "b": b, "vms": vms, "storage": storage}


def node_of(api, vm):
    return api.get(f"vm/{vm['id']}").json["data"]["node"]["id"]


# ---------------------------------------------------------------------- drain
def test_drain_puts_the_node_in_maintenance_and_says_what_did_not_move(api, runner, fleet):
    code, output = cli(runner, "node", "drain", fleet["a"]["fqdn"])
    assert code == 1, output
    assert api.get(f"node/{fleet['a']['id']}").json["data"]["node_state"] == {"id": 2}
    for vm in fleet["vms"]:
        assert f"NOT moved  vm-{vm['id']}: vm/hypervisor_error" in output  # no migration here
        assert node_of(api, vm) == fleet["a"]["id"]
    assert "0 moved, 2 not moved" in output
    assert api.get(f"node/{fleet['b']['id']}").json["data"]["allocated_cores"] == 0
    events = api.get("event?action=migrate").json["data"].values()
    assert sorted(e["object_id"] for e in events) == [vm["id"] for vm in fleet["vms"]]
    assert all(e["actor"].startswith("cli:") and e["status"] == 502 for e in events)
    # again, after the interruption: the same, nothing doubled
    code, again = cli(runner, "node", "drain", fleet["a"]["fqdn"])
    assert code == 1 and "0 moved, 2 not moved" in again
    assert api.get(f"node/{fleet['b']['id']}").json["data"]["allocated_cores"] == 0


def test_drain_of_an_empty_node_and_of_an_unknown_one(api, runner, vm_host):
    node = vm_host()
    code, output = cli(runner, "node", "drain", node["fqdn"])
    assert (code, output.splitlines()[-1]) == (0, "0 moved, 0 not moved")
    assert api.get(f"node/{node['id']}").json["data"]["node_state"] == {"id": 2}
    code, output = cli(runner, "node", "drain", "nowhere.example.com")
    assert code == 1 and "No node nowhere.example.com" in output


def test_a_vm_that_left_the_node_meanwhile_is_not_moved_again(app, api, fleet):
    from vmapi.cli import CLI_PRINCIPAL
    from vmapi.services.moves.migrate import drain_one

    vm = fleet["vms"][0]
    sql(app, "UPDATE vm SET node_id = :b WHERE id = :id", b=fleet["b"]["id"], id=vm["id"])
    with app.test_request_context():
        done = drain_one(vm["id"], fleet["a"]["id"], CLI_PRINCIPAL, None)
    assert done.moved and "no longer on node" in done.detail
    with app.test_request_context():
        gone = drain_one(999, fleet["a"]["id"], CLI_PRINCIPAL, None)
    assert gone.moved and "deleted meanwhile" in gone.detail


# ---------------------------------------------------------------------- evacuate
def down(app, node):
    sql(app, "UPDATE node SET unreachable_since = :at WHERE id = :id", at=datetime.now(UTC),
        id=node["id"])  # fmt: skip


def test_a_node_that_answers_is_not_evacuated(api, runner, fleet):
    code, output = cli(runner, "node", "evacuate", fleet["a"]["fqdn"])
    assert code == 1 and "is not down" in output and "drain" in output
    assert api.get(f"node/{fleet['a']['id']}").json["data"]["node_state"] == {"id": 1}
    code, output = cli(runner, "node", "evacuate", "nowhere.example.com")
    assert code == 1 and "no node nowhere.example.com" in output


def test_evacuation_rebuilds_vms_elsewhere_and_refuses_data_loss(
    app, api, client, runner, driver, fleet, installation
):
    a, b, (plain, with_data) = fleet["a"], fleet["b"], fleet["vms"]
    before_uuid = {vm["id"]: vm["uuid"] for vm in fleet["vms"]}
    macs = {vm["id"]: api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
            for vm in fleet["vms"]}  # fmt: skip
    down(app, a)
    before = scrape(client, api.token)
    code, output = cli(runner, "node", "evacuate", a["fqdn"])
    assert code == 1, output
    assert api.get(f"node/{a['id']}").json["data"]["node_state"] == {"id": 3}  # offline
    assert f"rebuilt      vm-{plain['id']}: on {b['fqdn']} (running)" in output
    assert f"NOT rebuilt  vm-{with_data['id']}: its storage [{fleet['storage']['id']}]" in output
    assert node_of(api, plain) == b["id"] and node_of(api, with_data) == a["id"]
    # the same UUID, MAC and addresses, running on b
    info = driver.domain(b["libvirt_uri"], plain["domain_name"])
    assert (info.uuid, info.state) == (before_uuid[plain["id"]], "running")
    nic = api.get(f"interface/{plain['interfaces'][0]['id']}").json["data"]
    assert nic == macs[plain["id"]]

    code, output = cli(runner, "node", "evacuate", a["fqdn"], "--accept-data-loss")
    assert code == 0, output
    assert f"vm-{plain['id']}" not in output  # it is not on a any more
    assert f"storage [{fleet['storage']['id']}] made anew, empty" in output
    assert node_of(api, with_data) == b["id"]
    storage = api.get(f"storage/{fleet['storage']['id']}").json["data"]
    assert storage["size"] == GIB
    name = f"{installation}-storage-{fleet['storage']['id']}"
    assert driver.volumes(b["libvirt_uri"], POOL) == [name]
    allocated = {n: api.get(f"node/{fleet[n]['id']}").json["data"]["allocated_cores"]
                 for n in "ab"}  # fmt: skip
    assert allocated == {"a": 0, "b": 4}
    after = scrape(client, api.token)
    total, ok = "vmapi_migrations_total", {"kind": "evacuate", "outcome": "ok"}
    assert value(after, total, **ok) - value(before, total, **ok) == 2
    events = api.get("event?action=evacuate").json["data"].values()
    assert [(e["object_id"], e["outcome"], e["before"], e["after"]["node_id"]) for e in events] == [
        (plain["id"], "ok", {"node_id": a["id"]}, b["id"]),
        (with_data["id"], "ok", {"node_id": a["id"]}, b["id"]),
    ]

    # a comes back: reconcile lists what it still has, and --fix removes it
    sql(app, "UPDATE node SET unreachable_since = NULL WHERE id = :id", id=a["id"])
    code, output = cli(runner, "reconcile")
    assert code == 1
    for vm in fleet["vms"]:
        assert f"leftover        {vm['domain_name']}" in output
    assert f"leftover        {POOL}/{name}" in output and "left by the evacuation" in output
    assert "misplaced" not in output and "unowned_volume" not in output
    code, output = cli(runner, "reconcile", "--fix")
    assert code == 0, output
    assert driver.domains(a["libvirt_uri"]) == [] and driver.volumes(a["libvirt_uri"], POOL) == []
    assert cli(runner, "reconcile") == (0, "0 finding(s), 0 fixed, 0 left\n")
    on_b = sorted(d.name for d in driver.domains(b["libvirt_uri"]))
    assert on_b == sorted(vm["domain_name"] for vm in fleet["vms"])


def test_a_rebuild_that_fails_leaves_nothing_on_the_other_node(
    app, api, runner, driver, fleet, installation
):
    faults = app.extensions[DRIVER_KEY] = FaultyDriver(app.extensions[DRIVER_KEY])
    a, b = fleet["a"], fleet["b"]
    down(app, a)
    faults.fail("start")
    code, output = cli(runner, "node", "evacuate", a["fqdn"], "--accept-data-loss")
    assert code == 1
    first, second = fleet["vms"]
    assert f"NOT rebuilt  vm-{first['id']}: vm/hypervisor_error" in output
    assert "starting the domain on the target" in output
    assert f"rebuilt      vm-{second['id']}" in output
    assert node_of(api, first) == a["id"]
    assert [d.name for d in driver.domains(b["libvirt_uri"])] == [second["domain_name"]]
    assert api.get(f"node/{b['id']}").json["data"]["allocated_cores"] == 2
    assert sql(app, "SELECT count(*) FROM leftover WHERE node_id = :b", b=b["id"]) == [(0,)]
    assert sql(app, "SELECT migration_node_id FROM vm WHERE id = :id", id=first["id"]) == [(None,)]
    event = api.get(f"event?action=evacuate&object_id={first['id']}").json["data"]
    assert [e["outcome"] for e in event.values()] == ["vm/hypervisor_error"]


# ---------------------------------------------------------------------- interrupted moves
def interrupted(app, driver, fleet, landed):
    """Play a move of the VM with the volume from a to b whose process died: b claimed,
    the VM marked, b's volume made and listed; ``landed``: libvirt had finished it."""
    from vmapi.services.leftovers import note_leftover
    from vmapi.services.moves.books import claim_target
    from vmapi.services.vms.specs import domain_spec

    vm, a, b, storage = fleet["vms"][1], fleet["a"], fleet["b"], fleet["storage"]
    with app.test_request_context():
        row = db.session.get(Vm, vm["id"])
        claim_target(row, b["id"])
        volume = db.session.get(Storage, storage["id"])
        driver.ensure_pool(b["libvirt_uri"], POOL, "/nowhere")
        path = driver.create_volume(b["libvirt_uri"], POOL, volume.volume_name, GIB, "qcow2")
        note_leftover(b["id"], "volume", volume.volume_name, "made for a move", vm["id"], POOL)
        db.session.commit()
        if landed:
            from vmapi.models import VirtMethod

            spec = domain_spec(row, db.session.get(VirtMethod, row.virt_method_id),
                               db.session.get(Node, b["id"]), app.config)  # fmt: skip
            driver.define(b["libvirt_uri"], spec)
            driver.start(b["libvirt_uri"], vm["domain_name"])
            driver.destroy(a["libvirt_uri"], vm["domain_name"])
            driver.undefine(a["libvirt_uri"], vm["domain_name"])
        db.session.remove()
    return vm, path


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "not-landed"])
def test_reconcile_settles_an_interrupted_move(
    app, api, runner, driver, fleet, installation, landed
):
    vm, b_path = interrupted(app, driver, fleet, landed)
    a, b = fleet["a"], fleet["b"]
    code, output = cli(runner, "reconcile")
    assert code == 1 and f"interrupted_move {vm['domain_name']}" in output
    assert "missing_domain" not in output and "misplaced" not in output
    code, output = cli(runner, "reconcile", "--fix")
    assert code == 0, output
    name = f"{installation}-storage-{fleet['storage']['id']}"
    allocated = {n: api.get(f"node/{fleet[n]['id']}").json["data"]["allocated_cores"]
                 for n in "ab"}  # fmt: skip
    if landed:
        assert "was recorded" in output
        assert node_of(api, vm) == b["id"] and allocated == {"a": 2, "b": 2}
        assert driver.volumes(a["libvirt_uri"], POOL) == []  # the source's copy went
        assert sql(app, "SELECT node_id, path FROM storage") == [(b["id"], b_path)]
    else:
        assert "was undone" in output
        assert node_of(api, vm) == a["id"] and allocated == {"a": 4, "b": 0}
        assert driver.volumes(b["libvirt_uri"], POOL) == []  # the volume made for it went
        assert driver.volumes(a["libvirt_uri"], POOL) == [name]
    assert sql(app, "SELECT count(*) FROM leftover") == [(0,)]
    assert sql(app, "SELECT migration_node_id FROM vm WHERE id = :id", id=vm["id"]) == [(None,)]
    assert cli(runner, "reconcile") == (0, "0 finding(s), 0 fixed, 0 left\n")


def test_the_next_move_settles_an_interrupted_one_first(app, api, driver, fleet):
    vm, _path = interrupted(app, driver, fleet, landed=True)
    response = api.post(f"vm/{vm['id']}/migrate", json={})
    assert response.status_code == 200, response.json
    assert response.json["data"]["node"] == {"id": fleet["b"]["id"]}
    assert "an interrupted move to" in response.json["message"]
    assert "was recorded" in response.json["message"]
    event = api.get(f"event?action=migrate&object_id={vm['id']}").json["data"]
    assert [(e["before"], e["after"]["node_id"]) for e in event.values()] == [
        ({"node_id": fleet["a"]["id"]}, fleet["b"]["id"])
    ]
