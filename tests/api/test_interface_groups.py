"""An interface's security groups given through the API (POST /vm for its first NIC, UPDATE
/interface), with the audit trail listening: the rows that say which groups an interface
uses have no id of their own, so they are written outside the ORM's unit of work, and
the change is recorded as the interface's (services/network/interfaces.py)."""

from __future__ import annotations

import pytest

from tests.conftest import vm_body


def made(response) -> dict:
    assert response.status_code == 201, response.json
    return response.json["data"]


def refs(*groups: dict) -> list[dict]:
    return [{"id": g["id"]} for g in sorted(groups, key=lambda g: g["id"])]


@pytest.mark.embedded
def test_groups_given_at_create_and_changed_on_the_interface(api, customer_api, vm_host,
                                                             test_method):  # fmt: skip
    vm_host()
    seven = customer_api(7)
    web = made(seven.post("security_group", json={"name": "web"}))
    ssh = made(seven.post("security_group", json={"name": "ssh"}))
    vm = made(seven.post("vm", json={**vm_body(test_method), "security_groups": refs(web)}))
    iface = f"interface/{vm['interfaces'][0]['id']}"
    assert seven.get(iface).json["data"]["security_groups"] == refs(web)
    changed = api.update(iface, json={"security_groups": refs(web, ssh)})
    assert changed.status_code == 200, changed.json
    assert changed.json["data"]["security_groups"] == refs(web, ssh)
    cleared = api.update(iface, json={"security_groups": []})
    assert cleared.status_code == 200, cleared.json
    assert seven.get(iface).json["data"]["security_groups"] == []
    found = api.get(f"event?limit=100&resource=interface&object_id={vm['interfaces'][0]['id']}")
    updates = [e for e in found.json["data"].values() if e["action"] == "update"]
    assert [(e["before"], e["after"]) for e in updates] == [
        ({"security_groups": [web["id"]]}, {"security_groups": sorted([web["id"], ssh["id"]])}),
        ({"security_groups": sorted([web["id"], ssh["id"]])}, {"security_groups": []}),
    ]
    assert seven.delete(f"security_group/{ssh['id']}").status_code == 200  # no longer used
