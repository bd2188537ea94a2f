"""``flask vmapi ha watch`` on libvirt's test driver: a node that stops answering is
suspect, then fenced through its agent (tests/fence_agent.py), then its HA VMs are made
anew on other nodes by priority; a node whose fencing fails keeps its VMs until an admin
confirms; one that answers again is ok; a watcher that died mid-fencing fences again;
one watcher is active, a second waits and takes over.

A test-driver host cannot die, so its death is a fault injected into the real driver
(tests/faults.py): its capacity call answers "unavailable" as a dead host's does. The
real death (processes killed by the agent) is tests/hypervisor/test_ha.py.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from tests.conftest import GIB, vm_body
from tests.fence_agent import calls, install
from vmapi.extensions import db
from vmapi.models import Node, Vm, VmState
from vmapi.services.ha.watch import watch
from vmapi.services.moves.books import claim_target
from vmapi.services.moves.evacuation import rebuild
from vmapi.services.moves.move import EVACUATE, Move, moved_volumes
from vmapi.services.moves.volumes import prepare_target
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.undo import Undo

pytestmark = pytest.mark.embedded


@pytest.fixture
def agents(tmp_path):
    return install(tmp_path / "agents")


@pytest.fixture
def app_config(agents):
    return {"HA_FENCE_AGENT_DIRS": str(agents), "HA_MISSES": 2, "HA_INTERVAL": 0.01,
            "HA_FENCE_TIMEOUT": 30.0}  # fmt: skip


def ha_vm(api, method, node, **fields):
    made = api.post("vm", json=vm_body(method, node={"id": node["id"]}, **fields))
    assert made.status_code == 201, made.json
    return made.json["data"]


def die(faults, node, times=50):
    """The node's libvirt stops answering (``times`` calls of its capacity)."""
    for _ in range(times):
        faults.fail("host_info", "unavailable", uri=node["libvirt_uri"])


def rounds(runner, n):
    result = runner.invoke(args=["vmapi", "ha", "watch", "--rounds", str(n)])
    assert result.exit_code == 0, result.output
    return result.output


def state(api, node):
    return api.get(f"node/{node['id']}").json["data"]["ha_state"]


def node_of(api, vm):
    return api.get(f"vm/{vm['id']}").json["data"]["node"]["id"]


def metric(client, api, name: str) -> float:
    """A sample's value in /metrics (0 when it is not there)."""
    text = client.get("/metrics", headers={"Authorization": f"Bearer {api.token}"}).get_data(
        as_text=True)  # fmt: skip
    found = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(found[0]) if found else 0.0


def test_a_dead_node_is_fenced_and_its_ha_vms_restart_elsewhere_by_priority(
    api, runner, faults, agents, vm_host, test_method
):
    a = vm_host(fence_agent="fence_test", fence_address="a", fence_user="admin")
    b = vm_host()
    low = ha_vm(api, test_method, a, ha=True)
    high = ha_vm(api, test_method, a, ha=True, ha_priority=10)
    plain = ha_vm(api, test_method, a, ha=False)
    default = ha_vm(api, test_method, a)  # ha null: HA_DEFAULT (false)
    die(faults, a)
    output = rounds(runner, 1)
    assert state(api, a) == "suspect" and calls(agents) == []
    output = rounds(runner, 1)
    assert state(api, a) == "fenced"
    assert [(c["options"]["action"], c["options"]["ip"]) for c in calls(agents)] == [
        ("off", "a"), ("status", "a")]  # fmt: skip
    lines = output.splitlines()
    assert f"{a['fqdn']}: missed 2 checks in a row: fencing" in lines
    restarted = [line for line in lines if "restarted:" in line]
    assert [line.split(":")[0] for line in restarted] == [f"vm-{high['id']}", f"vm-{low['id']}"]
    assert node_of(api, high) == node_of(api, low) == b["id"]
    assert node_of(api, plain) == node_of(api, default) == a["id"]
    node = api.get(f"node/{a['id']}").json["data"]
    assert node["node_state"] == {"id": 3}  # offline: it takes no new VMs
    events = api.get(f"event?resource=node&object_id={a['id']}").json["data"].values()
    changes = [
        e["after"]["ha_state"]
        for e in events
        if e["action"] == "update" and "ha_state" in (e["after"] or {})
    ]
    assert changes == ["suspect", "fencing", "fenced"]
    # later rounds restart nothing twice and fence nothing again
    rounds(runner, 2)
    assert len(calls(agents)) == 2
    assert (
        api.get(f"node/{b['id']}").json["data"]["allocated_cores"] == high["cores"] + low["cores"]
    )


def test_a_node_whose_fencing_fails_keeps_its_vms_until_an_admin_confirms(
    api, runner, faults, agents, vm_host, test_method, client
):
    a = vm_host(fence_agent="fence_test_fail", fence_address="a", fence_user="admin")
    b = vm_host()
    vm = ha_vm(api, test_method, a, ha=True)
    die(faults, a)
    output = rounds(runner, 4)
    assert state(api, a) == "fence_failed"
    assert f"{a['fqdn']}: FENCE FAILED" in output
    assert len([c for c in calls(agents) if c["options"]["action"] == "off"]) == 1  # no retry
    assert node_of(api, vm) == a["id"]  # nothing restarted
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {api.token}"})
    assert f'vmapi_node_ha_state{{node="{a["fqdn"]}",state="fence_failed"}} 1.0' in (
        metrics.get_data(as_text=True))  # fmt: skip
    confirmed = runner.invoke(args=["vmapi", "node", "fenced", a["fqdn"]])
    assert confirmed.exit_code == 0, confirmed.output
    rounds(runner, 1)
    assert node_of(api, vm) == b["id"]


def test_a_suspect_node_that_answers_again_is_ok(api, runner, faults, vm_host, test_method):
    a = vm_host(fence_agent="fence_test", fence_address="a", fence_user="admin")
    vm = ha_vm(api, test_method, a, ha=True)
    die(faults, a, times=1)
    rounds(runner, 1)
    assert state(api, a) == "suspect"
    rounds(runner, 1)
    assert state(api, a) == "ok" and node_of(api, vm) == a["id"]
    assert api.get(f"node/{a['id']}").json["data"]["unreachable_since"] is None


def test_capacity_short_the_rest_wait_and_a_vm_with_local_data_stays(
    api, runner, faults, agents, vm_host, test_method
):
    a = vm_host(fence_agent="fence_test", fence_address="a", fence_user="admin")
    b = vm_host(cores=2)
    first = ha_vm(api, test_method, a, ha=True, ha_priority=2)
    second = ha_vm(api, test_method, a, ha=True, ha_priority=1)
    with_data = ha_vm(api, test_method, a, ha=True, cores=1)
    disk = {"size": GIB, "vm": {"id": with_data["id"]}, "storage_type": {"id": 1}}
    assert api.post("storage", json=disk).status_code == 201
    die(faults, a)
    output = rounds(runner, 3)
    assert node_of(api, first) == b["id"] and node_of(api, second) == a["id"]
    assert output.count(f"vm-{second['id']}: not restarted yet") == 1  # said once
    assert f"vm-{with_data['id']}: left down: its data volumes" in output
    c = vm_host()
    rounds(runner, 1)
    assert node_of(api, second) == c["id"] and node_of(api, with_data) == a["id"]


def test_a_watcher_that_died_while_fencing_fences_again(api, runner, app, agents, vm_host,
                                                        test_method, faults):  # fmt: skip
    a = vm_host(fence_agent="fence_test", fence_address="a", fence_user="admin")
    b = vm_host()
    vm = ha_vm(api, test_method, a, ha=True)
    die(faults, a)
    with app.app_context():
        db.session.get(Node, a["id"]).ha_state = "fencing"
        db.session.commit()
        db.session.remove()
    rounds(runner, 1)
    assert [c["options"]["action"] for c in calls(agents)] == ["off", "status"]
    assert state(api, a) == "fenced" and node_of(api, vm) == b["id"]


def test_a_restart_the_lock_manager_refuses_makes_the_node_fence_failed(
    api, runner, faults, agents, vm_host, test_method, client
):
    """The target refuses the VM's disk (another host holds its lease): the node's agent
    said off, but the node still runs the VM. The attempt is undone, the VM stays on the
    node, the node is fence_failed (no retry) until an admin confirms it off."""
    a = vm_host(fence_agent="fence_test", fence_address="a", fence_user="admin")
    b = vm_host()
    vm = ha_vm(api, test_method, a, ha=True)
    die(faults, a)
    faults.fail("start", "leased", uri=b["libvirt_uri"])
    refused = 'vmapi_migrations_total{kind="evacuate",outcome="vm/disk_leased"}'
    before = metric(client, api, refused)
    output = rounds(runner, 4)
    assert state(api, a) == "fence_failed"
    assert f"vm-{vm['id']}: not restarted yet: vm/disk_leased: " in output
    assert f"{a['fqdn']}: FENCE FAILED (its fence agent said off, but vm-{vm['id']}" in output
    assert len(calls(agents)) == 2 and output.count("vm/disk_leased") == 2  # tried once
    assert node_of(api, vm) == a["id"]
    assert api.get(f"node/{b['id']}").json["data"]["allocated_cores"] == 0
    with client.application.app_context():
        assert db.session.get(Vm, vm["id"]).migration_node_id is None
        assert vm["domain_name"] not in [d.name for d in hypervisor().domains(b["libvirt_uri"])]
    events = api.get(f"event?resource=vm&object_id={vm['id']}").json["data"].values()
    assert [(e["action"], e["outcome"]) for e in events if e["action"] == "evacuate"] == [
        ("evacuate", "vm/disk_leased")]  # fmt: skip
    assert metric(client, api, refused) == before + 1
    assert metric(client, api, f'vmapi_node_ha_state{{node="{a["fqdn"]}",state="fence_failed"}}'
                  ) == 1  # fmt: skip
    confirmed = runner.invoke(args=["vmapi", "node", "fenced", a["fqdn"]])
    assert confirmed.exit_code == 0, confirmed.output
    rounds(runner, 1)  # (the injected refusal was used up: the disk is free now)
    assert node_of(api, vm) == b["id"]


def test_a_restart_that_died_between_defining_and_starting_is_finished(
    api, runner, app, agents, vm_host, test_method, faults
):
    """The watcher died after the VM's domain was defined on the target, before it was
    started: the next watcher records the move there and starts the domain (the VM was
    running), rather than recording a shut-off VM that no round restarts any more."""
    a = vm_host(fence_agent="fence_test", fence_address="a", fence_user="admin")
    b = vm_host()
    vm = ha_vm(api, test_method, a, ha=True)
    die(faults, a)
    with app.app_context():
        node = db.session.get(Node, a["id"])
        node.ha_state, node.unreachable_since = "fenced", datetime.now(UTC)
        db.session.commit()
        # the restart's steps as the evacuation takes them, up to the domain defined on
        # the target (not started); then its process dies: nothing of it is undone
        row = db.session.get(Vm, vm["id"])
        claimed = claim_target(row, None)
        move = Move(row, Host.of(a["id"]), Host.of(claimed.id), EVACUATE,
                    moved_volumes(row.id), deadline=time.monotonic() + 60)  # fmt: skip
        prepare_target(move, Undo())
        assert rebuild(move, "shutoff", Undo()) == "shutoff"
        db.session.commit()
        db.session.remove()
    output = rounds(runner, 1)
    assert f"vm-{vm['id']}: an interrupted move to {b['fqdn']} was recorded (and started)" in (
        output), output  # fmt: skip
    assert "restarted" not in output  # (it is not made a second time)
    assert node_of(api, vm) == b["id"]
    with app.app_context():
        assert hypervisor().domain(b["libvirt_uri"], vm["domain_name"]).state == "running"
        row = db.session.get(Vm, vm["id"])
        assert db.session.get(VmState, row.vm_state_id).name == "running"
        assert row.migration_node_id is None
    assert api.get(f"node/{b['id']}").json["data"]["allocated_cores"] == vm["cores"]
    assert api.get(f"node/{a['id']}").json["data"]["allocated_cores"] == 0
    rounds(runner, 1)  # nothing more: it is not restarted twice
    assert len(calls(agents)) == 0 and node_of(api, vm) == b["id"]


def test_one_watcher_is_active_the_other_waits_and_takes_over(app, vm_host):
    vm_host()
    said: dict[str, list[str]] = {"first": [], "second": []}
    first_stop, second_stop = threading.Event(), threading.Event()

    def run(name: str, stop: threading.Event, n: int | None) -> None:
        with app.app_context():
            watch(stop, said[name].append, n)
            db.session.remove()

    first = threading.Thread(target=run, args=("first", first_stop, None))
    second = threading.Thread(target=run, args=("second", second_stop, 1))
    try:
        first.start()
        deadline = time.monotonic() + 30
        while not said["first"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert said["first"][0].startswith("active:"), said
        second.start()
        while not said["second"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert said["second"] == [
            "standby: another `ha watch` is active; taking over when it stops"
        ], said
        first_stop.set()  # the active one stops (or dies: its lock goes with its connection)
        first.join(30)
        second.join(30)
        assert not second.is_alive()
        assert said["second"][1].startswith("active:")
    finally:
        first_stop.set()
        second_stop.set()
        first.join(30)
        if second.ident is not None:
            second.join(30)
