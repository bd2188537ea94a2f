"""The Puppet ENC answer of a node (issue 8): classes and parameters in YAML, with the
VMs, bridges (br-<vm_id>-<interface_id>), VLANs and addresses the host must configure."""

import pytest
import yaml

from tests.api.test_envelope import assert_error
from tests.conftest import Api, make_token, vm_body

pytestmark = pytest.mark.embedded


def enc(api, fqdn):
    response = api.get(f"node/{fqdn}/enc")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/yaml"
    return yaml.safe_load(response.get_data(as_text=True))


def test_a_node_with_vms_bridges_vlans_and_addresses(api, vm_host, test_method, backend):
    node = vm_host(interface_mode="bridge")
    vm_host()  # another node: none of its VMs may show up
    first = api.post("vm", json=vm_body(test_method, node={"id": node["id"]}, customer_id=3))
    second = api.post("vm", json=vm_body(test_method, node={"id": node["id"]}))
    assert first.status_code == second.status_code == 201
    a, b = first.json["data"], second.json["data"]
    vlan = api.post("vlan", json={"tag": 120}).json["data"]
    iface_a = a["interfaces"][0]["id"]
    assert api.update(f"interface/{iface_a}", json={"vlan": {"id": vlan["id"]}}).status_code == 200
    answer = enc(api, node["fqdn"])
    assert set(answer) == {"classes", "parameters"}
    assert answer["parameters"]["vmapi_node_id"] == node["id"]
    assert answer["parameters"]["vmapi_node_state"] == "running"
    hv = answer["classes"]["vmapi::hypervisor"]
    assert hv["interface_mode"] == "bridge"
    assert list(hv["vms"]) == [a["name"], b["name"]]
    assert hv["vms"][a["name"]]["cores"] == 2 and hv["vms"][a["name"]]["state"] == "running"
    assert hv["vms"][a["name"]]["customer_id"] == 3
    bridge = f"br-{a['id']}-{iface_a}"
    assert set(hv["bridges"]) == {bridge, f"br-{b['id']}-{b['interfaces'][0]['id']}"}
    assert hv["bridges"][bridge]["vlan"] == 120 and hv["bridges"][bridge]["vm"] == a["name"]
    iface = api.get(f"interface/{iface_a}").json["data"]
    v4 = api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]
    assert hv["bridges"][bridge]["ipv4"] == [f"{v4['address']}/{v4['prefix']}"]
    assert hv["bridges"][bridge]["ipv4_gateway"] == v4["gateway"]
    assert hv["bridges"][bridge]["mac"] == iface["mac"]
    assert hv["vlans"] == [120]
    assert len(hv["addresses"]["ipv4"]) == len(hv["addresses"]["ipv6"]) == 2
    assert hv["taps"] == {}


def test_ethernet_mode_names_taps(api, vm_host, test_method):
    node = vm_host(interface_mode="ethernet")
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    hv = enc(api, node["fqdn"])["classes"]["vmapi::hypervisor"]
    assert hv["bridges"] == {}
    assert list(hv["taps"]) == [f"vm{vm['id']}-{vm['interfaces'][0]['id']}"]


def test_an_empty_node_and_errors(app, client, api, vm_host):
    node = vm_host()
    hv = enc(api, node["fqdn"])["classes"]["vmapi::hypervisor"]
    assert hv["vms"] == {} and hv["vlans"] == [] and hv["addresses"] == {"ipv4": [], "ipv6": []}
    error = assert_error(api.get("node/nowhere.example.com/enc"), 404, "node/not_found")
    assert error["data"] == {"fqdn": "nowhere.example.com"}
    customer = Api(client, make_token(app, "customer", 3))
    assert_error(customer.get(f"node/{node['fqdn']}/enc"), 403, "general/authorization/forbidden")
    assert_error(Api(client, None).get(f"node/{node['fqdn']}/enc"), 401,
                 "general/authentication/required")  # fmt: skip
