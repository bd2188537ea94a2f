"""A VM's high-availability fields (ha, ha_priority, ha_local_disks): admins set them on
POST and UPDATE, customers read them; every read path shows them; an update undone puts
them back; the audit trail records them."""

import pytest

from tests.conftest import vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded

HA = {"ha": True, "ha_priority": 500, "ha_local_disks": "rebuild"}
DEFAULTS = {"ha": None, "ha_priority": 0, "ha_local_disks": "leave"}


def ha_of(answer):
    return {key: answer[key] for key in HA}


def test_admins_set_them_and_every_read_shows_them(api, vm_host, test_method):
    vm_host(cores=16)
    vm = api.post("vm", json=vm_body(test_method, customer_id=7, **HA)).json["data"]
    assert ha_of(vm) == HA
    for path in (f"vm/{vm['id']}", f"vm/{vm['id']}?nest=node"):
        assert ha_of(api.get(path).json["data"]) == HA
    assert ha_of(api.get("vm").json["data"][str(vm["id"])]) == HA
    assert ha_of(api.get("vm?customer_id=7").json["data"][str(vm["id"])]) == HA
    plain = api.post("vm", json=vm_body(test_method)).json["data"]
    assert ha_of(plain) == DEFAULTS
    changed = api.patch(f"vm/{plain['id']}", json={"ha": False, "ha_priority": -1000})
    assert ha_of(changed.json["data"]) == {**DEFAULTS, "ha": False, "ha_priority": -1000}
    back = api.patch(f"vm/{plain['id']}", json={"ha": None, "ha_local_disks": "rebuild"})
    assert ha_of(back.json["data"]) == {**DEFAULTS, "ha_priority": -1000,
                                        "ha_local_disks": "rebuild"}  # fmt: skip
    # recorded in the audit trail
    events = api.get(f"event?resource=vm&object_id={plain['id']}&action=update").json["data"]
    changes = [(e["before"]["ha"], e["after"]["ha"]) for e in events.values()
               if "ha" in (e["after"] or {})]  # fmt: skip
    assert changes == [(None, False), (False, None)]


@pytest.mark.parametrize(
    "bad",
    [{"ha": "yes"}, {"ha": 1}, {"ha_priority": 1001}, {"ha_priority": -1001},
     {"ha_priority": None}, {"ha_priority": True}, {"ha_local_disks": "keep"},
     {"ha_local_disks": None}],
)  # fmt: skip
def test_values_out_of_range_are_refused(api, vm_host, test_method, bad):
    vm_host()
    (field,) = bad
    error = assert_error(api.post("vm", json=vm_body(test_method, **bad)), 400,
                         "general/validation")  # fmt: skip
    assert field in error["data"]
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    error = assert_error(api.patch(f"vm/{vm['id']}", json=bad), 400, "general/validation")
    assert field in error["data"]


def test_customers_read_them_and_may_not_set_them(api, customer_api, vm_host, test_method):
    vm_host(cores=16)
    seven = customer_api(7)
    vm = api.post("vm", json=vm_body(test_method, customer_id=7, **HA)).json["data"]
    assert ha_of(seven.get(f"vm/{vm['id']}").json["data"]) == HA
    assert ha_of(seven.get("vm").json["data"][str(vm["id"])]) == HA
    for field, value in [("ha", False), ("ha", None), ("ha_priority", 1),
                         ("ha_local_disks", "leave")]:  # fmt: skip
        error = assert_error(seven.patch(f"vm/{vm['id']}", json={field: value}), 403,
                             "general/authorization/forbidden")  # fmt: skip
        assert field in error["message"]
    # the values it has are no change
    assert seven.patch(f"vm/{vm['id']}", json={**HA, "cores": 1}).status_code == 200
    for field, value in HA.items():
        assert_error(seven.post("vm", json=vm_body(test_method, **{field: value})), 403,
                     "general/authorization/forbidden")  # fmt: skip
    # the defaults are what a VM gets anyway
    made = seven.post("vm", json=vm_body(test_method, **DEFAULTS))
    assert made.status_code == 201, made.json
    assert ha_of(made.json["data"]) == DEFAULTS


def test_an_update_undone_puts_them_back(api, vm_host, test_method):
    vm_host(cores=6)
    a, b = api.post("vm", json=[vm_body(test_method, **HA),
                                vm_body(test_method)]).json["data"].values()  # fmt: skip
    body = [{"id": a["id"], "ha": False, "ha_priority": 3, "ha_local_disks": "leave"},
            {"id": b["id"], "cores": 5}]  # b does not fit  # fmt: skip
    error = assert_error(api.update("vm", json=body), 409, "vm/node_unsuitable")
    assert error["data"]["index"] == 1
    assert ha_of(api.get(f"vm/{a['id']}").json["data"]) == HA


def test_the_document_describes_them(api):
    document = api.get("openapi.json").json
    answer = document["components"]["schemas"]["Vm"]["properties"]
    assert answer["ha"]["nullable"] is True and answer["ha"]["type"] == "boolean"
    assert (answer["ha_priority"]["minimum"], answer["ha_priority"]["maximum"]) == (-1000, 1000)
    assert answer["ha_local_disks"]["enum"] == ["leave", "rebuild"]


def test_a_vm_of_a_node_that_does_not_answer_can_be_made_ha(app, api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    faults = app.extensions[DRIVER_KEY] = FaultyDriver(app.extensions[DRIVER_KEY])
    for method in ("domain", "define", "host_info"):
        faults.fail(method, "unavailable")
    changed = api.patch(f"vm/{vm['id']}", json={**HA, "backup_keep": 2})
    assert changed.status_code == 200, changed.json
    assert ha_of(changed.json["data"]) == HA and faults.calls == []  # the node not asked
    # a change the node must make still asks it
    assert_error(api.patch(f"vm/{vm['id']}", json={"ha": False, "cores": 1}), 502,
                 "vm/hypervisor_error")  # fmt: skip
    assert ha_of(api.get(f"vm/{vm['id']}").json["data"]) == HA
