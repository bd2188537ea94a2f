"""A node that cannot reach an rbd type's cluster (issue 25): ``flask vmapi node check``
says so, records it in ``node_storage_access`` and exits 1, and the scheduler keeps a VM
with volumes of the type off that node (``reaches_ceph``). libvirt's test driver has no
secrets, so a node here never reaches a cluster; a reachable one, and a closed monitor
port, are in tests/hypervisor/test_rbd_access.py."""

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.api.test_storage_rbd import KEY, add_row, rbd_body
from tests.conftest import node_body, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.models import NodeStorageAccess
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded


@pytest.fixture
def key_dir(tmp_path):
    folder = tmp_path / "ceph-keys"
    folder.mkdir()
    (folder / "client.libvirt.key").write_text(KEY + "\n")
    return folder


@pytest.fixture
def app_config(key_dir):
    return {"CEPH_KEY_DIR": str(key_dir)}


@pytest.fixture
def faults(app):
    app.extensions[DRIVER_KEY] = FaultyDriver(app.extensions[DRIVER_KEY])
    return app.extensions[DRIVER_KEY]


@pytest.fixture
def rbd_type(api):
    response = api.post("storage_type", json=rbd_body())
    assert response.status_code == 201, response.json
    return response.json["data"]


@pytest.fixture
def trio(app, api, vm_host, test_method, installation, rbd_type):
    """Nodes a, b, c; a VM on a with a volume of the rbd type."""
    a, b, c = vm_host(), vm_host(), vm_host()
    vm = api.post("vm", json=vm_body(test_method, node={"id": a["id"]})).json["data"]
    vm = {**vm, "node_id": a["id"], "installation": installation}
    add_row(app, vm, rbd_type)
    return {"a": a, "b": b, "c": c, "vm": vm}


def record(app, node, storage_type, reachable):
    """A row as node check leaves it."""
    with app.app_context():
        db.session.merge(NodeStorageAccess(node_id=node["id"], storage_type_id=storage_type["id"],
                                           reachable=reachable, checked_at=datetime.now(UTC)))  # fmt: skip
        db.session.commit()
        db.session.remove()


def accesses(app):
    with app.app_context():
        rows = db.session.execute(sa.select(
            NodeStorageAccess.node_id, NodeStorageAccess.storage_type_id,
            NodeStorageAccess.reachable,
        ).order_by(NodeStorageAccess.node_id)).all()  # fmt: skip
        db.session.remove()
    return [tuple(row) for row in rows]


# ---------------------------------------------------------------------- the scheduler
def test_a_named_target_recorded_unable_is_unsuitable(app, api, trio, rbd_type):
    vm, b = trio["vm"], trio["b"]
    record(app, b, rbd_type, False)
    error = assert_error(api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": b["id"]}}),
                         409, "vm/node_unsuitable")  # fmt: skip
    assert error["data"]["reasons"] == ["reaches_ceph"]
    assert api.get(f"vm/{vm['id']}").json["data"]["node"] == {"id": trio["a"]["id"]}
    # reachable at the next check: the claim passes (the move fails later: the test
    # driver has no secrets)
    record(app, b, rbd_type, True)
    response = api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": b["id"]}})
    assert response.json.get("error_id") == "vm/hypervisor_error", response.json
    assert response.json["data"]["node"] == {"id": b["id"]}


def test_a_target_never_checked_counts_as_reachable(app, api, trio):
    vm, b = trio["vm"], trio["b"]
    response = api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": b["id"]}})
    assert response.json.get("error_id") == "vm/hypervisor_error", response.json
    assert response.json["data"]["node"] == {"id": b["id"]}


def test_the_scheduler_counts_the_nodes_it_removes(app, api, trio, rbd_type):
    vm = trio["vm"]
    record(app, trio["b"], rbd_type, False)
    record(app, trio["c"], rbd_type, False)
    error = assert_error(api.post(f"vm/{vm['id']}/migrate"), 409, "vm/no_valid_host")
    removed = error["data"]["removed_by_filter"]
    assert (removed["reaches_ceph"], removed["uuid_free"]) == (2, 1)
    # one that reaches it again is where the scheduler goes (the move fails after)
    record(app, trio["c"], rbd_type, True)
    response = api.post(f"vm/{vm['id']}/migrate")
    assert response.json.get("error_id") == "vm/hypervisor_error", response.json
    assert response.json["data"]["node"] == {"id": trio["c"]["id"]}


def test_a_vm_without_rbd_volumes_is_not_kept_off(app, api, vm_host, test_method, rbd_type):
    a, b = vm_host(), vm_host()
    vm = api.post("vm", json=vm_body(test_method, node={"id": a["id"]})).json["data"]
    record(app, b, rbd_type, False)
    response = api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": b["id"]}})
    # past the claim: the test driver cannot move a domain
    assert response.json.get("error_id") == "vm/hypervisor_error", response.json


def test_what_node_check_recorded_goes_with_the_node_and_the_type(app, api, rbd_type):
    bare = api.post("node", json=node_body()).json["data"]
    other = api.post("node", json=node_body()).json["data"]
    record(app, bare, rbd_type, False)
    record(app, other, rbd_type, True)
    assert api.delete(f"node/{bare['id']}").status_code == 200
    assert accesses(app) == [(other["id"], rbd_type["id"], True)]
    assert api.delete(f"storage_type/{rbd_type['id']}").status_code == 200
    assert accesses(app) == []


# ---------------------------------------------------------------------- node check
def test_node_check_reports_a_node_that_cannot_reach_the_cluster(
    app, api, runner, vm_host, rbd_type, faults
):
    a, b = vm_host(), vm_host()
    bare = api.post("node", json=node_body()).json["data"]  # no virt_node: serves no VM
    faults.fail("ensure_ceph_secret", uri=a["libvirt_uri"])
    result = runner.invoke(args=["vmapi", "node", "check"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert f"CEPH  {a['fqdn']}: storage type ceph: injected failure" in lines
    # b's libvirt (the test driver) has no secrets: no cluster for it either
    assert any(line.startswith(f"CEPH  {b['fqdn']}: storage type ceph: ") for line in lines)
    assert not any(bare["fqdn"] in line and "ceph" in line.lower() for line in lines)
    assert lines[-1].endswith(", 2 not reaching a Ceph cluster")
    assert accesses(app) == [(a["id"], rbd_type["id"], False), (b["id"], rbd_type["id"], False)]


def test_a_host_that_stops_answering_says_nothing_about_the_cluster(
    app, runner, vm_host, rbd_type, faults
):
    a = vm_host()
    record(app, a, rbd_type, True)
    faults.fail("ensure_ceph_secret", "unavailable")
    result = runner.invoke(args=["vmapi", "node", "check"])
    assert result.exit_code == 1, result.output
    assert f"CEPH  {a['fqdn']}: storage type ceph: injected: connection refused" in (
        result.output.splitlines()
    )
    assert accesses(app) == [(a["id"], rbd_type["id"], True)]  # as it was


def test_a_key_the_api_host_cannot_read_is_reported_not_recorded(
    app, runner, vm_host, rbd_type, key_dir
):
    a = vm_host()
    (key_dir / "client.libvirt.key").unlink()
    result = runner.invoke(args=["vmapi", "node", "check"])
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("CEPH"))
    assert line.startswith(f"CEPH  {a['fqdn']}: storage type ceph: the key file ")
    assert accesses(app) == []


def test_without_rbd_types_node_check_says_nothing_of_ceph(runner, vm_host):
    vm_host()
    result = runner.invoke(args=["vmapi", "node", "check"])
    assert result.exit_code == 0, result.output
    assert "ceph" not in result.output.lower()
