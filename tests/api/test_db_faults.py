"""Database faults (a commit that fails, as when the connection drops) at each step.

The real database cannot be made to fail the second commit of a request on demand, so
``db.session.commit`` is wrapped to fail once; everything else is real.
"""

import pytest
from sqlalchemy.exc import OperationalError

from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from vmapi.extensions import db


@pytest.fixture
def failing_commit(monkeypatch):
    """``failing_commit(n)``: the n-th commit from now raises, after rolling back."""

    def arm(n: int) -> None:
        real = db.session.commit
        calls = {"count": 0}

        def commit() -> None:
            calls["count"] += 1
            if calls["count"] == n:
                db.session.rollback()
                raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
            real()

        monkeypatch.setattr(db.session, "commit", commit)

    return arm


def leftovers(api, driver, node):
    data = api.get(f"node/{node['id']}").json["data"]
    held = [a for a in api.get("ipv4?limit=1000").json["data"].values() if a["interface"]]
    return {"vms": api.get("vm").json["data"], "allocated": (data["allocated_cores"], data["allocated_ram"]),
            "domains": driver.domains(node["libvirt_uri"]), "held": held}  # fmt: skip


@pytest.mark.parametrize("n", [1, 2])  # 1: the claim's commit; 2: recording the state
def test_create(api, app, vm_host, test_method, driver, failing_commit, n):
    node = vm_host()
    with app.app_context():
        failing_commit(n)
        response = api.post("vm", json=vm_body(test_method))
    error = assert_error(response, 503, "general/unavailable")
    assert error["data"]["request_id"] == response.headers["X-Request-Id"]
    assert leftovers(api, driver, node) == {
        "vms": {},
        "allocated": (0, 0),
        "domains": [],
        "held": [],
    }


def test_resize(api, app, vm_host, test_method, driver, failing_commit):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    with app.app_context():
        failing_commit(1)
        assert_error(api.update(f"vm/{vm['id']}", json={"cores": 4}), 503, "general/unavailable")
    assert api.get(f"vm/{vm['id']}").json["data"]["cores"] == 2
    assert leftovers(api, driver, node)["allocated"] == (2, GIB)
    assert driver.domain(node["libvirt_uri"], vm["domain_name"]).vcpus == 2


def test_delete_then_retry(api, app, vm_host, test_method, driver, failing_commit):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    with app.app_context():
        failing_commit(1)  # the domain is gone, the row could not be deleted
        assert_error(api.delete(f"vm/{vm['id']}"), 503, "general/unavailable")
    assert api.get(f"vm/{vm['id']}").status_code == 200  # still accounted for
    retry = api.delete(f"vm/{vm['id']}")
    assert retry.status_code == 200 and "no domain" in retry.json["message"]
    assert leftovers(api, driver, node) == {
        "vms": {},
        "allocated": (0, 0),
        "domains": [],
        "held": [],
    }


@pytest.mark.parametrize("n", [1, 2])  # 1: the storage row; 2: its volume's path (then attach)
def test_storage_attach(api, app, vm_host, test_method, driver, failing_commit, n):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    with app.app_context():
        failing_commit(n)
        assert_error(api.post("storage", json=body), 503, "general/unavailable")
    assert api.get("storage").json["data"] == {}
    conn = driver.connections.get(node["libvirt_uri"], 5)
    assert "<disk" not in conn.lookupByName(vm["domain_name"]).XMLDesc(2)
    pool = conn.storagePoolLookupByName("vmapi") if n > 1 else None
    if pool is not None:
        assert [v.name() for v in pool.listAllVolumes()] == []


def test_storage_detach_then_retry(api, app, vm_host, test_method, driver, failing_commit):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    storage = api.post(
        "storage", json={"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    ).json["data"]
    with app.app_context():
        failing_commit(1)  # disk detached and volume deleted, the row could not go
        assert_error(api.delete(f"storage/{storage['id']}"), 503, "general/unavailable")
    assert api.get(f"storage/{storage['id']}").status_code == 200
    retry = api.delete(f"storage/{storage['id']}")
    assert retry.status_code == 200 and "already gone" in retry.json["message"]
    assert api.get("storage").json["data"] == {}
    conn = driver.connections.get(node["libvirt_uri"], 5)
    assert "<disk" not in conn.lookupByName(vm["domain_name"]).XMLDesc(2)
