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
    assert_error(refused, 403, "general/forbidden")
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
