"""Per-customer quotas: /quota, and creates and resizes refused beyond a limit."""

import pytest

from tests.conftest import GIB, vm_body
from tests.errors import assert_error

pytestmark = pytest.mark.embedded


@pytest.fixture
def quota(api):
    body = {
        "customer_id": 7,
        "max_vms": 2,
        "max_cores": 3,
        "max_ram": 2 * GIB,
        "max_storage": 3 * GIB,
    }
    response = api.post("quota", json=body)
    assert response.status_code == 201
    return response.json["data"]


def test_quota_resource(api, customer_api, quota):
    assert_error(api.post("quota", json={"customer_id": 7}), 409, "quota/duplicate")
    seven, eight = customer_api(7), customer_api(8)
    assert seven.get(f"quota/{quota['id']}").json["data"] == quota
    assert list(seven.get("quota").json["data"]) == [str(quota["id"])]
    assert_error(eight.get(f"quota/{quota['id']}"), 404, "quota/not_found")
    assert eight.get("quota").json["data"] == {}
    assert_error(
        seven.update(f"quota/{quota['id']}", json={"max_vms": 100}),
        403,
        "general/authorization/forbidden",
    )
    assert_error(
        api.post("quota", json={"customer_id": 9, "max_vms": -1}), 400, "general/validation"
    )


def test_security_group_limits_are_shown_and_set(api, customer_api, quota):
    assert (quota["max_security_groups"], quota["max_security_rules"]) == (None, None)
    changed = api.update(f"quota/{quota['id']}",
                         json={"max_security_groups": 4, "max_security_rules": 0})  # fmt: skip
    assert changed.status_code == 200, changed.json
    shown = customer_api(7).get(f"quota/{quota['id']}").json["data"]
    assert (shown["max_security_groups"], shown["max_security_rules"]) == (4, 0)
    for field in ("max_security_groups", "max_security_rules"):
        assert_error(api.update(f"quota/{quota['id']}", json={field: -1}), 400,
                     "general/validation")  # fmt: skip
    # (what they limit: tests/api/test_security_groups.py)


def test_vm_limits(api, customer_api, vm_host, test_method, quota):
    vm_host()
    seven = customer_api(7)
    assert seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).status_code == 201
    error = assert_error(
        seven.post("vm", json=vm_body(test_method, cores=3, ram=GIB)), 403, "vm/quota_exceeded"
    )
    assert error["data"] == {"quota": "max_cores", "limit": 3, "usage": 1, "requested": 3}
    error = assert_error(
        seven.post("vm", json=vm_body(test_method, cores=1, ram=2 * GIB)), 403, "vm/quota_exceeded"
    )
    assert error["data"]["quota"] == "max_ram"
    assert seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).status_code == 201
    error = assert_error(
        seven.post("vm", json=vm_body(test_method, cores=1, ram=64 * 2**20)),
        403,
        "vm/quota_exceeded",
    )
    assert error["data"] == {"quota": "max_vms", "limit": 2, "usage": 2, "requested": 1}
    # the quota belongs to the customer, whoever creates: an admin too
    assert_error(
        api.post("vm", json=vm_body(test_method, cores=1, customer_id=7)), 403, "vm/quota_exceeded"
    )
    # others are not limited by it
    assert customer_api(8).post("vm", json=vm_body(test_method, cores=4)).status_code == 201


def test_array_create_under_quota_is_all_or_nothing(api, customer_api, vm_host, test_method, quota):
    vm_host()
    seven = customer_api(7)
    error = assert_error(
        seven.post("vm", json=[vm_body(test_method, cores=1, ram=GIB)] * 3),
        403,
        "vm/quota_exceeded",
    )
    assert error["data"]["index"] == 2
    assert seven.get("vm").json["data"] == {}


def test_resize_limits(api, customer_api, vm_host, test_method, quota):
    node = vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    error = assert_error(
        seven.update(f"vm/{vm['id']}", json={"cores": 4}), 403, "vm/quota_exceeded"
    )
    assert error["data"] == {"quota": "max_cores", "limit": 3, "usage": 1, "requested": 3}
    assert seven.get(f"vm/{vm['id']}").json["data"]["cores"] == 1
    assert api.get(f"node/{node['id']}").json["data"]["allocated_cores"] == 1
    assert seven.update(f"vm/{vm['id']}", json={"cores": 3}).status_code == 200
    assert (
        seven.update(f"vm/{vm['id']}", json={"cores": 2}).status_code == 200
    )  # shrinking always may
    # moving a VM to a customer takes that customer's quota
    other = api.post("vm", json=vm_body(test_method, cores=2, ram=GIB)).json["data"]
    assert_error(api.update(f"vm/{other['id']}", json={"customer_id": 7}), 403, "vm/quota_exceeded")


def test_storage_limits(api, customer_api, vm_host, test_method, quota):
    vm_host()
    seven = customer_api(7)
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    body = {"size": 2 * GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    storage = seven.post("storage", json=body).json["data"]
    error = assert_error(
        seven.post("storage", json={**body, "size": 2 * GIB}), 403, "storage/quota_exceeded"
    )
    assert error["data"] == {
        "quota": "max_storage",
        "limit": 3 * GIB,
        "usage": 2 * GIB,
        "requested": 2 * GIB,
    }
    assert_error(
        seven.update(f"storage/{storage['id']}", json={"size": 4 * GIB}),
        403,
        "storage/quota_exceeded",
    )
    assert seven.get(f"storage/{storage['id']}").json["data"]["size"] == 2 * GIB
    assert len(seven.get("storage").json["data"]) == 1
