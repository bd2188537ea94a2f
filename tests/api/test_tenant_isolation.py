"""Tenant isolation: a matrix over every resource and verb with two customers.

Customer 8 acts on customer 7's objects (VM, interface, addresses, storage, image,
security group and rule, server group). It never
reads, changes or learns of them (404, exactly as for an id that does not exist), never
reaches admin-only resources (403), and lists never show them.
"""

import pytest

from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from vmapi.api.resource import RESOURCES
from vmapi.schemas.base import Bool, Int, Ref, Str

OWNED = ("vm", "interface", "ipv4", "ipv6", "storage", "image", "security_group",
         "security_group_rule", "server_group")  # fmt: skip


@pytest.fixture
def tenants(api, customer_api, vm_host, test_method):
    vm_host()
    seven, eight = customer_api(7), customer_api(8)
    vm = seven.post("vm", json=vm_body(test_method)).json["data"]
    iface = seven.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    storage = seven.post(
        "storage", json={"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    ).json["data"]
    image = seven.post("image", json={"name": "own"}).json["data"]
    group = seven.post("security_group", json={"name": "own"}).json["data"]
    rule = seven.post("security_group_rule", json={
        "security_group": {"id": group["id"]}, "direction": "ingress", "ethertype": "ipv4",
        "protocol": "any"}).json["data"]  # fmt: skip
    placing = seven.post("server_group", json={"name": "own", "policy": "affinity"}).json["data"]
    eight.post("vm", json=vm_body(test_method))  # the other tenant has objects of its own
    ids = {"vm": vm["id"], "interface": iface["id"], "ipv4": iface["ipv4"][0]["id"],
           "ipv6": iface["ipv6"][0]["id"], "storage": storage["id"], "image": image["id"],
           "security_group": group["id"], "security_group_rule": rule["id"],
           "server_group": placing["id"]}  # fmt: skip
    return seven, eight, ids


def expected(resource, verb_is_write):
    api = RESOURCES[resource]
    roles = api.write_roles if verb_is_write else api.read_roles
    return (
        (403, "general/authorization/forbidden")
        if "customer" not in roles
        else (404, f"{resource}/not_found")
    )


def required_body(how):
    """A body that passes an action's schema (its required fields, each a plain value of
    its type): the action then looks the object up (a body the schema refuses is 400 for
    any id alike)."""
    schema = getattr(how, "body", None)
    if schema is None:
        return None
    plain = {Ref: {"id": 1}, Str: "x", Int: 1, Bool: False}
    return {name: next(v for kind, v in plain.items() if isinstance(field, kind))
            for name, field in schema().fields.items() if field.required}  # fmt: skip


@pytest.mark.parametrize("resource", sorted(RESOURCES))
def test_matrix(api, tenants, resource):
    seven, eight, ids = tenants
    res = RESOURCES[resource]
    if "customer" not in res.read_roles:
        assert_error(eight.get(resource), 403, "general/authorization/forbidden")
        assert_error(eight.get(f"{resource}/1"), 403, "general/authorization/forbidden")
        assert_error(eight.post(resource, json={}), 403, "general/authorization/forbidden")
        assert_error(eight.delete(f"{resource}/1"), 403, "general/authorization/forbidden")
        return
    if resource not in OWNED:  # the public catalog: readable, not writable
        assert eight.get(resource).status_code == 200
        return
    ident = ids[resource]
    listed = eight.get(f"{resource}?limit=1000").json["data"]
    assert str(ident) not in listed
    assert seven.get(f"{resource}/{ident}").status_code == 200
    missing = 999_999
    for path in (f"{resource}/{ident}", f"{resource}/{missing}"):  # the same answer for both
        assert_error(eight.get(path), 404, f"{resource}/not_found")
        for verb in ("UPDATE", "PATCH", "DELETE"):
            if verb in res.item_methods:
                status, error_id = expected(resource, True)
                body = {} if verb != "DELETE" else None
                assert_error(eight.call(verb, path, json=body), status, error_id)
    for action, how in res.actions.items():
        roles = getattr(how, "roles", None)
        body = required_body(how)
        for path in (f"{resource}/{ident}/{action}", f"{resource}/{missing}/{action}"):
            if roles is not None and "customer" not in roles:  # admins only (migrate):
                # refused for any id alike, so the answer tells nothing of the VM
                assert_error(eight.post(path), 403, "general/authorization/forbidden")
            else:
                assert_error(eight.post(path, json=body), 404, f"{resource}/not_found")
    # filters and nest cannot reach it either
    assert eight.get(f"{resource}?id={ident}").json["data"] == {}
    assert seven.get(f"{resource}/{ident}").status_code == 200  # untouched


def test_collection_writes_by_id(api, tenants):
    _seven, eight, ids = tenants
    assert_error(eight.update("vm", json={"id": ids["vm"], "cores": 1}), 404, "vm/not_found")
    assert_error(eight.delete("vm", json={"id": ids["vm"]}), 404, "vm/not_found")
    assert_error(eight.delete("storage", json=[{"id": ids["storage"]}]), 404, "storage/not_found")
    assert api.get(f"vm/{ids['vm']}").json["data"]["cores"] == 2


def test_references_to_others_objects(api, tenants):
    _seven, eight, ids = tenants
    body = {"size": GIB, "vm": {"id": ids["vm"]}, "storage_type": {"id": 1}}
    error = assert_error(eight.post("storage", json=body), 400, "general/validation")
    assert error["data"] == {"vm": [f"No vm with id {ids['vm']}."]}  # as for any missing VM
    group = ids["security_group"]
    body = {"security_group": {"id": group}, "direction": "egress", "ethertype": "ipv6",
            "protocol": "any"}  # fmt: skip
    error = assert_error(eight.post("security_group_rule", json=body), 400, "general/validation")
    assert error["data"] == {"security_group": [f"No security_group with id {group}."]}
    placing = ids["server_group"]
    body = vm_body(1, server_group={"id": placing})  # method 1: the seeded KVM
    error = assert_error(eight.post("vm", json=body), 400, "general/validation")
    assert error["data"] == {"server_group": [f"No server_group with id {placing}."]}
