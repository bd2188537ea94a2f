"""A failure at every step of create, update and delete leaves nothing behind."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.models import Node
from vmapi.services.nodes.domains import end_cooloff
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded


@pytest.fixture
def faults(app):
    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    return app.extensions[DRIVER_KEY]


def state(api, node, faults):
    """Everything a failure could leave behind: rows, claims, domains."""
    data = api.get(f"node/{node['id']}").json["data"]
    domains = sorted(d.name for d in faults.real.domains(node["libvirt_uri"]))
    return {
        "vms": sorted(api.get("vm").json["data"]),
        "allocated": (data["allocated_cores"], data["allocated_ram"]),
        "domains": domains,
    }


EMPTY = {"vms": [], "allocated": (0, 0), "domains": []}


@pytest.mark.parametrize(
    ("method", "kind", "status", "error_id", "step"),
    [
        ("define", "error", 502, "vm/hypervisor_error", "defining the domain"),
        ("start", "error", 502, "vm/hypervisor_error", "starting the domain"),
        ("domain", "error", 502, "vm/hypervisor_error", "reading the domain's state"),
        ("define", "timeout", 504, "vm/hypervisor_timeout", "defining the domain"),
        ("start", "timeout", 504, "vm/hypervisor_timeout", "starting the domain"),
        ("start", "unavailable", 502, "vm/hypervisor_error", "starting the domain"),
    ],
)
def test_create_failure_leaves_nothing(
    api, vm_host, test_method, faults, method, kind, status, error_id, step
):
    node = vm_host()
    faults.fail(method, kind)
    error = assert_error(api.post("vm", json=vm_body(test_method)), status, error_id)
    assert error["data"]["step"] == step
    assert error["data"]["node"] == {"id": node["id"]}
    if kind == "error":
        assert "injected failure" in error["message"]
    assert state(api, node, faults) == EMPTY
    again = api.post("vm", json=vm_body(test_method))
    if kind == "error":  # libvirt answered (with an error): the node stays schedulable
        assert again.status_code == 201, again.json
    else:  # it did not answer: the node is in its cool-off and is the only one
        error = assert_error(again, 409, "vm/no_valid_host")
        assert error["data"]["removed_by_filter"]["libvirt_reachable"] == 1


def test_unreachable_node_is_skipped_after_a_failure(api, vm_host, test_method, faults):
    first = vm_host(ram=32 * GIB)
    second = vm_host()
    faults.fail("define", "unavailable")
    assert_error(api.post("vm", json=vm_body(test_method)), 502, "vm/hypervisor_error")
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert vm["node"] == {"id": second["id"]}  # first is in its cool-off
    assert api.get(f"node/{first['id']}").json["data"]["allocated_cores"] == 0


#: the one answer of a create whose libvirt call fails so
FAILED_CREATE = {"timeout": (504, "vm/hypervisor_timeout"),
                 "unavailable": (502, "vm/hypervisor_error")}  # fmt: skip


def shunned(api, faults, test_method, method, kind):
    """Make the next create fail with ``kind`` at ``method`` (the node's cool-off starts)
    and check that the node is skipped afterwards."""
    faults.fail(method, kind)
    assert_error(api.post("vm", json=vm_body(test_method)), *FAILED_CREATE[kind])
    error = assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/no_valid_host")
    assert error["data"]["removed_by_filter"]["libvirt_reachable"] == 1


@pytest.mark.parametrize(("method", "kind"), [("define", "timeout"), ("start", "unavailable")])
def test_a_check_that_reaches_the_node_ends_its_cooloff(
    api, runner, vm_host, test_method, faults, method, kind
):
    node = vm_host()
    shunned(api, faults, test_method, method, kind)
    result = runner.invoke(args=["vmapi", "node", "check"])
    assert result.exit_code == 0 and f"ok    {node['fqdn']}" in result.output, result.output
    vm = api.post("vm", json=vm_body(test_method))  # not 60 s later: now
    assert vm.status_code == 201, vm.json
    assert vm.json["data"]["node"] == {"id": node["id"]}


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (lambda api, vm: api.post(f"vm/{vm['id']}/reboot"), 200),
        (lambda api, vm: api.update(f"vm/{vm['id']}", json={"cores": 1}), 200),
        (lambda api, vm: api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 3}}), 200),
    ],
    ids=["reboot", "resize", "pause"],
)
def test_a_successful_call_on_the_node_ends_its_cooloff(
    api, vm_host, test_method, faults, action, expected
):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    shunned(api, faults, test_method, "define", "timeout")
    done = action(api, vm)  # libvirt on that node answers again
    assert done.status_code == expected, done.json
    again = api.post("vm", json=vm_body(test_method))
    assert again.status_code == 201, again.json
    assert again.json["data"]["node"] == {"id": node["id"]}


def test_ending_a_cooloff_keeps_a_failure_noted_since(app, vm_host):
    """Only the failure a request saw before its call succeeded is cleared: one that
    another request noted meanwhile still counts."""
    node = vm_host()
    seen, since = datetime.now(UTC) - timedelta(seconds=5), datetime.now(UTC)
    with app.app_context():
        failed_at = sa.select(Node.libvirt_failed_at).where(Node.id == node["id"])
        note = (
            sa.update(Node)
            .where(Node.id == node["id"])
            .execution_options(synchronize_session=False)
        )
        db.session.execute(note.values(libvirt_failed_at=seen))
        db.session.commit()
        row = db.session.get(Node, node["id"])  # what a request read before its call
        db.session.execute(note.values(libvirt_failed_at=since))  # another request's failure
        db.session.commit()
        end_cooloff(row)
        db.session.commit()
        assert db.session.scalar(failed_at) is not None
        db.session.refresh(row)
        end_cooloff(row)
        db.session.commit()
        assert db.session.scalar(failed_at) is None
        db.session.remove()


def test_array_create_failure_undoes_earlier_vms(api, vm_host, test_method, faults):
    node = vm_host()
    faults.fail("start", skip=2)  # the third VM fails to start
    body = [vm_body(test_method) for _ in range(3)]
    error = assert_error(api.post("vm", json=body), 502, "vm/hypervisor_error")
    assert error["data"]["index"] == 2
    assert state(api, node, faults) == EMPTY


def test_failed_undo_is_left_to_reconcile(api, vm_host, test_method, faults, runner, installation):
    node = vm_host()
    faults.fail("start")
    faults.fail("destroy")  # the undo cannot remove the domain it defined
    assert_error(api.post("vm", json=vm_body(test_method)), 502, "vm/hypervisor_error")
    left = state(api, node, faults)
    assert left["vms"] == [] and left["allocated"] == (0, 0)
    assert left["domains"] == [f"{installation}-vm-1"]  # listed as left by the undo step...
    result = runner.invoke(args=["vmapi", "reconcile", "--fix"])
    assert result.exit_code == 0, result.output
    assert "leftover" in result.output and "undo step failed: removing domain" in result.output
    assert state(api, node, faults) == EMPTY  # ...that reconcile removes


@pytest.mark.parametrize(
    ("method", "skip", "kind", "status"),
    [
        ("define", 0, "error", 502),  # the new persistent definition
        ("set_vcpus_live", 0, "timeout", 504),  # the live change
        ("domain", 1, "error", 502),  # reading the state afterwards
    ],
)
def test_resize_failure_restores_everything(
    api, vm_host, test_method, faults, method, skip, kind, status
):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    faults.fail(method, kind, skip=skip)
    response = api.update(f"vm/{vm['id']}", json={"cores": 4})
    assert response.status_code == status, response.json
    assert api.get(f"vm/{vm['id']}").json["data"]["cores"] == 2
    assert state(api, node, faults)["allocated"] == (2, GIB)
    info = faults.real.domain(node["libvirt_uri"], vm["domain_name"])
    assert info.vcpus == 2
    conn = faults.real.connections.get(node["libvirt_uri"], 5)
    assert "current='2'" in conn.lookupByName(vm["domain_name"]).XMLDesc(2)  # persistent too


def test_state_change_failure_undoes_earlier_elements(api, vm_host, test_method, faults):
    node = vm_host()
    a, b = api.post("vm", json=[vm_body(test_method), vm_body(test_method)]).json["data"].values()
    faults.fail("suspend", skip=1)  # pausing b fails after a was paused
    body = [{"id": a["id"], "vm_state": {"id": 3}}, {"id": b["id"], "vm_state": {"id": 3}}]
    error = assert_error(api.update("vm", json=body), 502, "vm/hypervisor_error")
    assert error["data"]["index"] == 1
    assert faults.real.domain(node["libvirt_uri"], a["domain_name"]).state == "running"
    assert api.get(f"vm/{a['id']}").json["data"]["vm_state"] == {"id": 2}


@pytest.mark.parametrize(
    ("method", "kind", "status"), [("destroy", "error", 502), ("undefine", "timeout", 504)]
)
def test_delete_failure_deletes_nothing(api, vm_host, test_method, faults, method, kind, status):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    faults.fail(method, kind)
    response = api.delete(f"vm/{vm['id']}")
    assert response.status_code == status
    assert api.get(f"vm/{vm['id']}").status_code == 200
    assert state(api, node, faults)["allocated"] == (2, GIB)


def test_delete_host_check_failure_deletes_nothing_of_an_array(api, vm_host, test_method, faults):
    node = vm_host()
    a, b = api.post("vm", json=[vm_body(test_method), vm_body(test_method)]).json["data"].values()
    faults.fail("domain", "timeout", skip=1)  # the check of the second VM's host
    error = assert_error(
        api.delete("vm", json=[{"id": a["id"]}, {"id": b["id"]}]), 504, "vm/hypervisor_timeout"
    )
    assert error["data"]["index"] == 1
    assert state(api, node, faults)["domains"] == sorted([a["domain_name"], b["domain_name"]])
    assert len(state(api, node, faults)["vms"]) == 2


def test_reboot_failure(api, vm_host, test_method, faults):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    faults.fail("reboot")
    assert_error(api.post(f"vm/{vm['id']}/reboot"), 502, "vm/hypervisor_error")


def test_refused_resize_undoes_quietly(api, vm_host, test_method, caplog):
    vm_host(cores=2)
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert_error(api.update(f"vm/{vm['id']}", json={"cores": 3}), 409, "vm/node_unsuitable")
    assert "undo step failed" not in caplog.text
