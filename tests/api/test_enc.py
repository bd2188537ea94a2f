"""The Puppet ENC answer of a node (issue 8): classes and parameters in YAML, with the
VMs, bridges (br-<tag>-<MAC's last 6 hex digits>), VLANs and addresses the host must
configure."""

import pytest
import yaml

from tests.conftest import Api, make_token, vm_body
from tests.errors import assert_error
from vmapi.services.network import allocation

pytestmark = pytest.mark.embedded

#: The installation and the MACs its interfaces get, in order, and the host devices they
#: must be named: worked out by hand from the rule (tests/unit/test_device_names.py:
#: "prod" -> tag "k63u"), not by vmapi's function. A changed rule renames every host device.
INSTALLATION = "prod"
MACS = ["52:54:00:0a:0b:0c", "52:54:00:ff:00:01"]
BRIDGES = ["br-k63u-0a0b0c", "br-k63u-ff0001"]
TAP = "vmk63u-0a0b0c"
assert all(len(name) <= 15 for name in [*BRIDGES, TAP])  # Linux's limit


@pytest.fixture
def app_config():
    return {"INSTALLATION_ID": INSTALLATION}


@pytest.fixture(autouse=True)
def macs(monkeypatch):
    """New interfaces get MACS in order (instead of random ones)."""
    given = iter(MACS)
    monkeypatch.setattr(allocation, "random_mac", lambda: next(given))


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
    assert list(hv["vms"]) == [a["domain_name"], b["domain_name"]]  # by libvirt's names
    first_vm = hv["vms"][a["domain_name"]]
    assert (first_vm["name"], first_vm["cores"], first_vm["state"]) == (a["name"], 2, "running")
    assert first_vm["customer_id"] == 3
    assert api.get(f"interface/{iface_a}").json["data"]["mac"] == MACS[0]
    bridge, other = BRIDGES
    assert set(hv["bridges"]) == {bridge, other}
    assert hv["bridges"][other]["vm"] == b["domain_name"]
    assert hv["bridges"][bridge]["vlan"] == 120
    assert hv["bridges"][bridge]["vm"] == a["domain_name"]
    iface = api.get(f"interface/{iface_a}").json["data"]
    v4 = api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]
    assert hv["bridges"][bridge]["ipv4"] == [f"{v4['address']}/{v4['prefix']}"]
    assert hv["bridges"][bridge]["ipv4_gateway"] == v4["gateway"]
    assert hv["bridges"][bridge]["mac"] == iface["mac"]
    assert hv["vlans"] == [120]
    assert len(hv["addresses"]["ipv4"]) == len(hv["addresses"]["ipv6"]) == 2
    assert hv["taps"] == {}


def test_ethernet_mode_names_taps(api, vm_host, test_method, driver):
    node = vm_host(interface_mode="ethernet")
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    hv = enc(api, node["fqdn"])["classes"]["vmapi::hypervisor"]
    assert hv["bridges"] == {}
    assert api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]["mac"] == MACS[0]
    tap = TAP
    assert list(hv["taps"]) == [tap]
    # the tap the domain is defined with (what libvirt makes on the host)
    conn = driver.connections.get(node["libvirt_uri"], 5)
    assert f"<target dev='{tap}'/>" in conn.lookupByName(vm["domain_name"]).XMLDesc(0)


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
