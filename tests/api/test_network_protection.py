"""Network protection as the database and the domain's definition see it, on libvirt's
test driver (it has no filter driver and carries no traffic: nothing is defined there, the
NIC only names its filter). What the real libvirtd makes of it: tests/hypervisor/
test_network_filters.py and test_network_guard.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.conftest import vm_body
from tests.errors import assert_error
from vmapi.extensions import db
from vmapi.models import Node
from vmapi.services.network.filters import link_local

pytestmark = pytest.mark.embedded

INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE


def nic_of(driver, node, vm) -> ET.Element:
    conn = driver.connections.get(node["libvirt_uri"], 5)
    xml = conn.lookupByName(vm["domain_name"]).XMLDesc(INACTIVE)
    return ET.fromstring(xml).find("devices/interface")


def params(nic: ET.Element) -> list[tuple[str, str]]:
    return [(p.get("name"), p.get("value")) for p in nic.findall("filterref/parameter")]


def address(api, family, ref) -> str:
    return api.get(f"{family}/{ref['id']}").json["data"]["address"]


@pytest.mark.parametrize("mode", ["bridge", "ethernet"])
def test_a_nic_names_its_filter_and_the_addresses_it_holds(
    api, vm_host, test_method, driver, installation, mode
):
    node = vm_host(interface_mode=mode)
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    assert iface["spoof_guard"] is True
    nic = nic_of(driver, node, vm)
    assert nic.find("filterref").get("filter") == f"{installation}-nic-{iface['id']}"
    assert params(nic) == [
        ("CTRL_IP_LEARNING", "none"),
        ("IP", address(api, "ipv4", iface["ipv4"][0])),
        ("IPV6", address(api, "ipv6", iface["ipv6"][0])),
        ("IPV6", link_local(iface["mac"])),
    ]


def test_user_mode_nics_are_not_filtered(api, vm_host, test_method, driver):
    node = vm_host(interface_mode="user")
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert nic_of(driver, node, vm).find("filterref") is None


def test_new_addresses_are_the_nics_new_filter_parameters(api, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    free = next(a for a in api.get("ipv4?limit=1000").json["data"].values()
                if a["interface"] is None)  # fmt: skip
    moved = api.update(f"interface/{iface['id']}", json={"ipv4": [{"id": free["id"]}]})
    assert moved.status_code == 200, moved.json
    assert ("IP", free["address"]) in params(nic_of(driver, node, vm))
    none = api.update(f"interface/{iface['id']}", json={"ipv4": []})
    assert none.status_code == 200, none.json
    assert [p for p in params(nic_of(driver, node, vm)) if p[0] == "IP"] == []


def test_only_admins_turn_the_guard_off(api, customer_api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method, customer_id=7)).json["data"]
    ident = vm["interfaces"][0]["id"]
    refused = customer_api(7).update(f"interface/{ident}", json={"spoof_guard": False})
    assert_error(refused, 403, "general/authorization/forbidden")
    assert api.get(f"interface/{ident}").json["data"]["spoof_guard"] is True
    off = api.update(f"interface/{ident}", json={"spoof_guard": False})
    assert off.status_code == 200, off.json
    assert api.get(f"interface/{ident}").json["data"]["spoof_guard"] is False


def without_filter_driver(app, node) -> None:
    with app.app_context():
        db.session.get(Node, node["id"]).network_filters = False
        db.session.commit()


def test_a_node_known_to_lack_a_filter_driver_takes_no_vm_it_would_guard(
    app, api, vm_host, test_method
):
    node = vm_host()
    without_filter_driver(app, node)
    error = assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/no_valid_host")
    assert error["data"]["removed_by_filter"]["can_guard"] == 1
    named = api.post("vm", json=vm_body(test_method, node={"id": node["id"]}))
    assert assert_error(named, 409, "vm/node_unsuitable")["data"]["reasons"] == ["can_guard"]
    # a node whose NICs need no guard (QEMU's user network) takes it
    assert api.update(f"node/{node['id']}", json={"interface_mode": "user"}).status_code == 200
    assert api.post("vm", json=vm_body(test_method)).status_code == 201


def test_customers_give_their_own_interfaces_their_groups(api, customer_api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method, customer_id=7)).json["data"]
    ident = vm["interfaces"][0]["id"]
    owner, other = customer_api(7), customer_api(8)
    mine = owner.post("security_group", json={"name": "web"}).json["data"]
    shared = api.post("security_group", json={"name": "ssh-from-office"}).json["data"]
    theirs = other.post("security_group", json={"name": "theirs"}).json["data"]
    body = {"security_groups": [{"id": mine["id"]}, {"id": shared["id"]}]}
    given = owner.update(f"interface/{ident}", json=body)
    assert given.status_code == 200, given.json
    groups = owner.get(f"interface/{ident}").json["data"]["security_groups"]
    assert sorted(g["id"] for g in groups) == sorted([mine["id"], shared["id"]])
    # another customer's group is not found; another customer's interface neither
    foreign = owner.update(f"interface/{ident}", json={"security_groups": [{"id": theirs["id"]}]})
    assert_error(foreign, 404, "security_group/not_found")
    assert_error(other.update(f"interface/{ident}", json={"security_groups": []}), 404,
                 "interface/not_found")  # fmt: skip
    # a group in use cannot go; taken off, it can
    assert_error(owner.delete(f"security_group/{mine['id']}"), 409, "security_group/in_use")
    assert owner.update(f"interface/{ident}", json={"security_groups": []}).status_code == 200
    assert owner.delete(f"security_group/{mine['id']}").status_code == 200
    # the change is in the audit trail, as the interface's
    events = api.get("event?resource=interface&action=update").json["data"].values()
    changes = [e["after"] for e in events if e["object_id"] == ident]
    assert {"security_groups": []} in changes


def test_post_vm_puts_its_first_nic_in_the_groups(api, customer_api, vm_host, test_method):
    vm_host()
    owner = customer_api(7)
    group = owner.post("security_group", json={"name": "web"}).json["data"]
    made = owner.post("vm", json=vm_body(test_method, security_groups=[{"id": group["id"]}]))
    assert made.status_code == 201, made.json
    iface = owner.get(f"interface/{made.json['data']['interfaces'][0]['id']}").json["data"]
    assert [g["id"] for g in iface["security_groups"]] == [group["id"]]
    other = customer_api(8).post(
        "vm", json=vm_body(test_method, security_groups=[{"id": group["id"]}])
    )
    assert_error(other, 404, "security_group/not_found")
    # the VM's deletion releases the group
    assert owner.delete(f"vm/{made.json['data']['id']}").status_code == 200
    assert owner.delete(f"security_group/{group['id']}").status_code == 200


def test_a_resize_keeps_the_nics_filter(api, vm_host, test_method, driver, installation):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    before = params(nic_of(driver, node, vm))
    assert api.update(f"vm/{vm['id']}", json={"cores": 1}).status_code == 200
    nic = nic_of(driver, node, vm)
    assert nic.find("filterref").get("filter") == f"{installation}-nic-{vm['interfaces'][0]['id']}"
    assert params(nic) == before
