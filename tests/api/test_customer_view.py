"""What a customer sees of the node side: nothing. Its audit trail shows the fields its
answers show (no node, pool, path, seed); its hypervisor errors a generic message and
the request id, without the node's name, URI or libvirt's text. Admins see it all."""

import logging

import pytest

from tests.api.test_envelope import assert_error
from tests.conftest import GIB, vm_body
from tests.faults import FaultyDriver
from vmapi.services.hosts import DRIVER_KEY

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
