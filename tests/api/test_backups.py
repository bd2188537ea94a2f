"""Backups on libvirt's test driver: ``backup_keep`` on /vm (admins only, undone with its
update, audited)."""

from __future__ import annotations

from tests.conftest import vm_body
from tests.errors import assert_error


# ---------------------------------------------------------------------- backup_keep on /vm
def test_admins_set_backup_keep_and_answers_show_it(api, customer_api, vm_host, test_method):
    vm_host()
    made = api.post("vm", json=vm_body(test_method, backup_keep=3, customer_id=7))
    assert made.status_code == 201, made.json
    vm = made.json["data"]
    assert vm["backup_keep"] == 3
    assert api.get(f"vm/{vm['id']}").json["data"]["backup_keep"] == 3
    assert api.get("vm").json["data"][str(vm["id"])]["backup_keep"] == 3
    assert api.get(f"vm/{vm['id']}?nest=node").json["data"]["backup_keep"] == 3
    assert api.patch(f"vm/{vm['id']}", json={"backup_keep": 5}).json["data"]["backup_keep"] == 5
    cleared = api.patch(f"vm/{vm['id']}", json={"backup_keep": None}).json["data"]
    assert cleared["backup_keep"] is None
    plain = api.post("vm", json=vm_body(test_method)).json["data"]
    assert plain["backup_keep"] is None
    for bad in (0, -1, 2**31, "two"):
        assert_error(api.patch(f"vm/{vm['id']}", json={"backup_keep": bad}), 400,
                     "general/validation")  # fmt: skip
    # the customer sees it on its VM, and may not set it
    seven = customer_api(7)
    api.patch(f"vm/{vm['id']}", json={"backup_keep": 2})
    assert seven.get(f"vm/{vm['id']}").json["data"]["backup_keep"] == 2
    assert_error(seven.patch(f"vm/{vm['id']}", json={"backup_keep": 9}), 403,
                 "general/authorization/forbidden")  # fmt: skip
    assert_error(seven.patch(f"vm/{vm['id']}", json={"backup_keep": None}), 403,
                 "general/authorization/forbidden")  # fmt: skip
    assert seven.patch(f"vm/{vm['id']}", json={"backup_keep": 2, "cores": 1}).status_code == 200
    assert_error(seven.post("vm", json=vm_body(test_method, backup_keep=1)), 403,
                 "general/authorization/forbidden")  # fmt: skip
    assert seven.post("vm", json=vm_body(test_method, backup_keep=None)).status_code == 201
    # recorded in the audit trail, before and after
    events = api.get(f"event?resource=vm&object_id={vm['id']}&action=update").json["data"]
    changes = [(e["before"]["backup_keep"], e["after"]["backup_keep"]) for e in events.values()
               if "backup_keep" in (e["after"] or {})]  # fmt: skip
    assert changes == [(3, 5), (5, None), (None, 2)]


def test_an_update_undone_puts_backup_keep_back(api, vm_host, test_method):
    vm_host(cores=6)
    a, b = api.post("vm", json=[vm_body(test_method, backup_keep=1),
                                vm_body(test_method)]).json["data"].values()  # fmt: skip
    body = [{"id": a["id"], "backup_keep": 7}, {"id": b["id"], "cores": 5}]  # b does not fit
    error = assert_error(api.update("vm", json=body), 409, "vm/node_unsuitable")
    assert error["data"]["index"] == 1
    assert api.get(f"vm/{a['id']}").json["data"]["backup_keep"] == 1
