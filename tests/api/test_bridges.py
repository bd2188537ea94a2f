"""The node's bridge template (issue 14): which bridge a NIC in bridge mode joins, on
libvirt's test driver, and the ENC's bridges when NICs share one."""

import xml.etree.ElementTree as ET

import pytest
import yaml

from tests.conftest import node_body, vm_body
from tests.errors import assert_error
from vmapi.app import create_app
from vmapi.services.names import device_tag

pytestmark = pytest.mark.embedded

INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE


def bridges_of(driver, node, vm):
    conn = driver.connections.get(node["libvirt_uri"], 5)
    root = ET.fromstring(conn.lookupByName(vm["domain_name"]).XMLDesc(INACTIVE))
    return [i.find("source").get("bridge") for i in root.findall("devices/interface")]


def enc_bridges(api, node):
    text = api.get(f"node/{node['fqdn']}/enc").get_data(as_text=True)
    return yaml.safe_load(text)["classes"]["vmapi::hypervisor"]["bridges"]


def test_a_shared_bridge_takes_every_nic_and_is_listed_once(api, vm_host, test_method, driver):
    node = vm_host(interface_mode="bridge", bridge="br0")
    assert node["bridge"] == "br0"
    a, b = (api.post("vm", json=vm_body(test_method)).json["data"] for _ in range(2))
    assert bridges_of(driver, node, a) == bridges_of(driver, node, b) == ["br0"]
    bridges = enc_bridges(api, node)
    assert list(bridges) == ["br0"]
    assert bridges["br0"]["shared"] is True
    listed = bridges["br0"]["interfaces"]
    assert [(i["vm"], i["interface_id"]) for i in listed] == [
        (a["domain_name"], a["interfaces"][0]["id"]),
        (b["domain_name"], b["interfaces"][0]["id"]),
    ]
    assert all(i["device"] == "br0" and i["ipv4"] for i in listed)


def test_the_default_is_a_bridge_per_nic(api, vm_host, test_method, driver, installation):
    node = vm_host(interface_mode="bridge")
    assert node["bridge"] is None
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    mac = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]["mac"]
    expected = f"br-{device_tag(installation)}-{mac[-8:].replace(':', '')}"
    assert bridges_of(driver, node, vm) == [expected]
    assert enc_bridges(api, node)[expected]["vm"] == vm["domain_name"]  # one NIC, as before


def test_a_vlan_template_follows_the_interface(api, vm_host, test_method, driver):
    node = vm_host(interface_mode="bridge", bridge="vlan{vlan}")
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert bridges_of(driver, node, vm) == ["vlan"]  # on no VLAN
    vlan = api.post("vlan", json={"tag": 120}).json["data"]
    iface = vm["interfaces"][0]["id"]
    assert api.update(f"interface/{iface}", json={"vlan": {"id": vlan["id"]}}).status_code == 200
    assert bridges_of(driver, node, vm) == ["vlan120"]  # the domain is redefined on it
    assert list(enc_bridges(api, node)) == ["vlan120"]


def test_the_configured_template_applies_where_the_node_says_nothing(
    app, api, vm_host, test_method, driver
):
    app.config["BRIDGE_TEMPLATE"] = "vmbr0"
    node = vm_host(interface_mode="bridge")
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert bridges_of(driver, node, vm) == ["vmbr0"]
    # a node's own template wins; it applies as domains are next defined
    assert api.update(f"node/{node['id']}", json={"bridge": "br7"}).status_code == 200
    assert api.update(f"vm/{vm['id']}", json={"cores": 3}).status_code == 200
    assert bridges_of(driver, node, vm) == ["br7"]


@pytest.mark.parametrize(
    ("bridge", "message"),
    [
        ("br-{vm_id}", "The only placeholders are {suffix} and {vlan}."),
        ("bridge-{suffix}", "Linux allows 15"),
        ("br 0", "letters, digits"),
        ("", "Length must be between 1 and 64."),
    ],
)
def test_bad_templates_are_refused(api, make_node, bridge, message):
    error = assert_error(api.post("node", json=node_body(bridge=bridge)), 400, "general/validation")
    assert any(message in m for m in error["data"]["bridge"]), error["data"]
    node = make_node()
    error = assert_error(api.update(f"node/{node['id']}", json={"bridge": bridge}), 400,
                         "general/validation")  # fmt: skip
    assert api.get(f"node/{node['id']}").json["data"]["bridge"] is None


def test_a_bad_configured_template_stops_the_start(tmp_path, monkeypatch):
    monkeypatch.setenv("VMAPI_BRIDGE_TEMPLATE", "bridge-for-{suffix}")
    with pytest.raises(RuntimeError, match="BRIDGE_TEMPLATE"):
        create_app({"DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite3"})


@pytest.mark.parametrize("value", ['["192.0.2.1", "dns.example.com"]', '"192.0.2.1"'])
def test_bad_dns_servers_stop_the_start(tmp_path, monkeypatch, value):
    monkeypatch.setenv("VMAPI_DNS_SERVERS", value)
    with pytest.raises(RuntimeError, match="DNS_SERVERS"):
        create_app({"DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite3"})
