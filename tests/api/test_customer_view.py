"""What a customer sees of the node side: nothing. Its audit trail shows the fields its
answers show (no node, pool, path, seed); its hypervisor errors a generic message and
the request id, without the node's name, URI or libvirt's text. Admins see it all."""

import logging
from dataclasses import replace

import pytest
import sqlalchemy as sa

from tests.api.test_names import foreign_domain
from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from tests.faults import KINDS, FaultyDriver
from vmapi.extensions import db
from vmapi.hypervisor import OperationInvalid
from vmapi.models import Node, Vm
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded

NODE_SIDE = {"node_id", "pool", "path", "volume_name", "target", "seed_path", "seed_pool",
             "seed_volume", "migration_node_id"}  # fmt: skip


def keys(events: dict) -> set[str]:
    found = set()
    for event in events.values():
        for side in ("before", "after"):
            found |= set(event[side] or {})
    return found


def test_a_customers_audit_trail_has_no_node_side_fields(api, customer_api, vm_host, test_method):
    vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    assert seven.post("storage", json=body).status_code == 201
    for resource in ("vm", "storage"):
        theirs = seven.get(f"event?resource={resource}").json["data"]
        admins = api.get(f"event?resource={resource}").json["data"]
        assert theirs and set(theirs) == set(admins)
        assert not keys(theirs) & NODE_SIDE, keys(theirs)
        assert keys(admins) & NODE_SIDE  # the admin's trail keeps them
    storage_keys = keys(seven.get("event?resource=storage").json["data"])
    assert {"size", "vm_id", "storage_type_id"} <= storage_keys
    assert {"cores", "ram", "customer_id"} <= keys(seven.get("event?resource=vm").json["data"])


@pytest.mark.parametrize(("kind", "status", "error_id"), [("error", 502, "vm/hypervisor_error"),
                                                          ("timeout", 504, "vm/hypervisor_timeout")])  # fmt: skip
def test_a_customers_hypervisor_error_names_no_node(
    app, api, customer_api, vm_host, test_method, driver, caplog, kind, status, error_id
):
    node = vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    faults = FaultyDriver(driver)
    app.extensions[DRIVER_KEY] = faults
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    faults.fail("create_volume", kind)
    with caplog.at_level(logging.WARNING, logger="vmapi.api.errors"):
        error = assert_error(seven.post("storage", json=body), status, error_id)
    text = repr(error)
    for secret in (node["fqdn"], "injected", "test://", "node"):
        assert secret not in text, text
    assert error["data"]["request_id"] and error["data"]["step"] == "creating the volume"
    assert node["fqdn"] in caplog.text  # the server's log has it all
    faults.fail("create_volume", kind)
    admins = assert_error(api.post("storage", json=body), status, error_id)
    assert node["fqdn"] in admins["message"] and admins["data"]["node"] == {"id": node["id"]}


OTHER_UUID = "0a1b2c3d-0000-4000-8000-000000000002"


def next_vm_id(app) -> int:
    with app.app_context():
        return (db.session.scalar(sa.select(sa.func.max(Vm.id))) or 0) + 1


def test_a_customers_name_taken_names_no_node(
    app, api, customer_api, vm_host, test_method, driver, installation, caplog
):
    node = vm_host()
    ident = next_vm_id(app)
    taken = f"{installation}-vm-{ident}"
    driver.define(node["libvirt_uri"], foreign_domain(taken))
    # the admin's try below: the same id again (SQLite) or the next (PostgreSQL's sequence)
    after = replace(foreign_domain(f"{installation}-vm-{ident + 1}"), uuid=OTHER_UUID)
    driver.define(node["libvirt_uri"], after)
    with caplog.at_level(logging.WARNING, logger="vmapi.api.errors"):
        error = assert_error(customer_api(7).post("vm", json=vm_body(test_method)), 409,
                             "vm/name_taken")  # fmt: skip
    text = repr(error)
    for secret in (node["fqdn"], "test://", "already exists", "uuid"):
        assert secret not in text, text
    assert taken in error["message"] and "node_detail" not in error["data"]
    assert node["fqdn"] in caplog.text  # the server's log has it
    admins = assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/name_taken")
    assert node["fqdn"] not in admins["message"]  # one message for all
    assert admins["data"]["node_detail"].startswith(f"node {node['fqdn']}: ")
    assert len(admins["data"]["node_detail"]) > len(f"node {node['fqdn']}: ")  # libvirt's text


def test_a_customers_no_console_carries_no_libvirt_text(api, customer_api, vm_host, test_method):
    """The test driver has no display passwords: 409 vm/no_console, libvirt's words for
    admins only."""
    node = vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    mine = assert_error(seven.post(f"vm/{vm['id']}/console"), 409, "vm/no_console")
    admins = assert_error(api.post(f"vm/{vm['id']}/console"), 409, "vm/no_console")
    libvirt_text = admins["data"]["node_detail"].removeprefix(f"node {node['fqdn']}: ")
    assert "not supported by the connection driver" in libvirt_text
    assert libvirt_text not in admins["message"] and mine["message"] == admins["message"]
    assert "node_detail" not in mine["data"] and mine["data"]["reason"] == admins["data"]["reason"]
    for secret in (node["fqdn"], "connection driver", "virDomain"):
        assert secret not in repr(mine)


@pytest.mark.parametrize(("method", "ask"), [
    ("suspend", lambda api, ident: api.update(f"vm/{ident}", json={"vm_state": {"id": 3}})),
    ("reboot", lambda api, ident: api.post(f"vm/{ident}/reboot")),
])  # fmt: skip
def test_a_customers_state_conflict_carries_no_libvirt_text(
    app, api, customer_api, vm_host, test_method, driver, monkeypatch, method, ask
):
    """libvirt refusing an operation in the domain's state (injected: the test driver's
    own checks come after vmapi's): 409 vm/state_conflict, libvirt's words for admins."""
    monkeypatch.setitem(KINDS, "invalid", lambda uri: OperationInvalid(uri, "LIBVIRT-WORDS"))
    node = vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    faults = FaultyDriver(driver)
    app.extensions[DRIVER_KEY] = faults
    faults.fail(method, "invalid")
    mine = assert_error(ask(seven, vm["id"]), 409, "vm/state_conflict")
    faults.fail(method, "invalid")
    admins = assert_error(ask(api, vm["id"]), 409, "vm/state_conflict")
    assert admins["data"]["node_detail"] == f"node {node['fqdn']}: LIBVIRT-WORDS"
    assert mine["message"] == admins["message"] and "LIBVIRT-WORDS" not in mine["message"]
    for secret in (node["fqdn"], "LIBVIRT-WORDS"):
        assert secret not in repr(mine)


def test_a_customers_notes_name_no_node_path_or_libvirt_text(
    api, customer_api, vm_host, test_method
):
    """A new volume's notes: the pool made (where, on which node) and why the disk waits
    for the next start (libvirt's text) are an admin's to read."""
    node = vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    mine = seven.post("storage", json=body)
    assert mine.status_code == 201, mine.json
    assert "next start" in mine.json["message"]
    admins = api.post("storage", json=body).json["message"]
    assert "Node side:" in admins and "next start" in admins
    assert "Node side:" not in mine.json["message"]
    for secret in (node["fqdn"], "/", "not supported"):
        assert secret not in mine.json["message"], mine.json["message"]


def test_a_customers_part_way_delete_keeps_what_went_and_what_is_left(
    app, customer_api, vm_host, test_method, driver
):
    vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    ids = [seven.post("storage", json=body).json["data"]["id"] for _ in range(3)]
    faults = FaultyDriver(driver)
    app.extensions[DRIVER_KEY] = faults
    faults.fail("delete_volume", skip=1)  # the second volume cannot be deleted
    error = assert_error(seven.delete(f"vm/{vm['id']}?cascade=storage"), 502,
                         "vm/hypervisor_error")  # fmt: skip
    assert error["data"]["deleted_storage"] == ids[:1] and error["data"]["storage"] == ids[1:]
    assert "node" not in error["data"] and "injected" not in repr(error)
    assert seven.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200  # a retry finishes


def test_a_customers_error_under_an_idempotency_key_names_no_node(
    app, customer_api, vm_host, test_method, driver
):
    """A POST with Idempotency-Key is answered by its own view, not the error handler."""
    node = vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    faults = FaultyDriver(driver)
    app.extensions[DRIVER_KEY] = faults
    faults.fail("create_volume")
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    response = seven.post("storage", json=body, headers={"Idempotency-Key": "k-1"})
    error = assert_error(response, 502, "vm/hypervisor_error")
    for secret in (node["fqdn"], "injected"):
        assert secret not in repr(error)


def test_a_template_that_fails_at_run_time_is_no_customers_400(
    app, api, customer_api, vm_host, test_method
):
    """A node built from LIBVIRT_URI_TEMPLATE, and a template that (for this node, or
    changed since the start) fails the rules: 409 node/unsafe_uri, the URI for admins."""
    node = vm_host()
    with app.app_context():
        db.session.execute(sa.update(Node).where(Node.id == node["id"]).values(libvirt_uri=None))
        db.session.commit()
        db.session.remove()
    app.config["LIBVIRT_URI_TEMPLATE"] = "qemu+ext:///system?command=/bin/{fqdn}"
    mine = assert_error(customer_api(7).post("vm", json=vm_body(test_method)), 409,
                        "node/unsafe_uri")  # fmt: skip
    for secret in ("qemu+ext", "/bin/", node["fqdn"]):
        assert secret not in repr(mine)
    admins = assert_error(api.post("vm", json=vm_body(test_method)), 409, "node/unsafe_uri")
    assert (
        node["fqdn"] in admins["data"]["node_detail"]
        and "qemu+ext" in admins["data"]["node_detail"]
    )
