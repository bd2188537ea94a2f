"""Networking: interfaces, address pools and allocation, VLANs, on libvirt's test driver."""

import xml.etree.ElementTree as ET

import pytest

from tests.conftest import vm_body
from tests.errors import assert_error
from vmapi.services.names import device_tag

pytestmark = pytest.mark.embedded

INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE


def domain_xml(driver, node, vm):
    conn = driver.connections.get(node["libvirt_uri"], 5)
    return ET.fromstring(conn.lookupByName(vm["domain_name"]).XMLDesc(INACTIVE))


def keep_ipv4(api, count):
    """Delete all but the lowest ``count`` free IPv4 addresses (arrays hold at most 100)."""
    ids = [int(i) for i in api.get("ipv4?limit=1000").json["data"]][count:]
    for start in range(0, len(ids), 100):
        assert (
            api.delete("ipv4", json=[{"id": i} for i in ids[start : start + 100]]).status_code
            == 200
        )


def held(api, resource):
    return {
        o["address"]: o["interface"]
        for o in api.get(f"{resource}?limit=1000").json["data"].values()
        if o["interface"]
    }


# ---------------------------------------------------------------------- allocation


def device_suffix(installation, iface):
    """``<installation's tag>-<the MAC's last 6 hex digits>``: host device names fit
    Linux's 15 characters whatever the ids, and differ between installations."""
    return f"{device_tag(installation)}-{iface['mac'][-8:].replace(':', '')}"


def test_vm_gets_one_interface_with_one_address_of_each_family(
    api, vm_host, test_method, driver, installation
):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert len(vm["interfaces"]) == 1
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    assert iface["vm"] == {"id": vm["id"]}
    assert iface["mac"].startswith("52:54:00:") and len(iface["mac"]) == 17
    assert len(iface["ipv4"]) == len(iface["ipv6"]) == 1 and iface["vlan"] is None
    v4 = api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]
    v6 = api.get(f"ipv6/{iface['ipv6'][0]['id']}").json["data"]
    assert (v4["address"], v4["prefix"], v4["gateway"]) == ("198.51.100.2", 24, "198.51.100.1")
    assert (v6["address"], v6["prefix"], v6["gateway"]) == (
        "2001:db8:100::2",
        64,
        "2001:db8:100::1",
    )
    assert v4["interface"] == v6["interface"] == {"id": iface["id"]}
    # the domain has the NIC with that MAC, wired by the node's mode (bridge by default)
    nic = domain_xml(driver, node, vm).find("devices/interface")
    assert nic.get("type") == "bridge"
    assert nic.find("mac").get("address") == iface["mac"]
    bridge = f"br-{device_suffix(installation, iface)}"
    assert nic.find("source").get("bridge") == bridge and len(bridge) == 14
    assert nic.find("model").get("type") == "virtio"
    # and the addresses are where provisioning can read them
    meta = domain_xml(driver, node, vm).find(
        "metadata/{urn:vmapi:domain:1}instance/{urn:vmapi:domain:1}interface"
    )
    assert meta.attrib == {"mac": iface["mac"], "mode": "bridge", "device": bridge,
                           "ipv4": "198.51.100.2/24", "ipv4_gateway": "198.51.100.1",
                           "ipv6": "2001:db8:100::2/64", "ipv6_gateway": "2001:db8:100::1"}  # fmt: skip


@pytest.mark.parametrize(("mode", "device"), [("ethernet", "vm{suffix}"), ("user", None)])
def test_interface_modes(api, vm_host, test_method, driver, mode, device, installation):
    node = vm_host(interface_mode=mode)
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    nic = domain_xml(driver, node, vm).find("devices/interface")
    assert nic.get("type") == mode
    target = nic.find("target")
    assert nic.find("source") is None  # no bridge
    if device:
        iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
        assert target.get("dev") == device.format(suffix=device_suffix(installation, iface))
    else:  # QEMU's user network; libvirt may name a device of its own, never ours
        assert target is None or not target.get("dev", "").startswith("vm")


@pytest.mark.parametrize("app_config", [{"INTERFACE_MODE": "user"}])
def test_interface_mode_default_from_configuration(api, vm_host, test_method, driver, app_config):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert domain_xml(driver, node, vm).find("devices/interface").get("type") == "user"


def test_macs_are_unique(api, vm_host, test_method):
    vm_host()
    made = api.post(
        "vm", json=[vm_body(test_method, cores=1, ram=256 * 2**20) for _ in range(8)]
    ).json["data"]
    macs = {
        api.get(f"interface/{v['interfaces'][0]['id']}").json["data"]["mac"] for v in made.values()
    }
    assert len(macs) == 8


def test_no_free_ipv4_leaves_nothing(api, host_uri, vm_host, test_method, driver):
    node = vm_host()
    keep_ipv4(api, 1)
    assert api.post("vm", json=vm_body(test_method)).status_code == 201  # takes the last one
    pool = api.get("ipv6_pool").json["data"]
    error = assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/no_free_ipv4")
    assert "ipv4" in error["message"].lower()
    assert len(api.get("vm").json["data"]) == 1
    assert len(driver.domains(node["libvirt_uri"])) == 1
    assert api.get(f"node/{node['id']}").json["data"]["allocated_cores"] == 2
    assert api.get("ipv6_pool").json["data"] == pool  # no IPv6 address was used up
    assert len(held(api, "ipv6")) == 1


def test_no_free_ipv6(api, vm_host, test_method):
    vm_host()
    pool = next(iter(api.get("ipv6_pool").json["data"]))
    api.delete(f"ipv6_pool/{pool}")
    assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/no_free_ipv6")
    assert held(api, "ipv4") == {}
    assert api.get("interface").json["data"] == {}


def test_array_create_stops_cleanly_at_exhaustion(api, vm_host, test_method, driver):
    node = vm_host()
    keep_ipv4(api, 2)
    error = assert_error(api.post("vm", json=[vm_body(test_method)] * 3), 409, "vm/no_free_ipv4")
    assert error["data"]["index"] == 2
    assert api.get("vm").json["data"] == {} and driver.domains(node["libvirt_uri"]) == []
    assert held(api, "ipv4") == {} and held(api, "ipv6") == {}


def test_release_on_delete_and_reuse(api, vm_host, test_method):
    vm_host()
    first = api.post("vm", json=vm_body(test_method)).json["data"]
    second = api.post("vm", json=vm_body(test_method)).json["data"]
    first_v4 = api.get(f"interface/{first['interfaces'][0]['id']}").json["data"]["ipv4"][0]["id"]
    api.delete(f"vm/{first['id']}")
    assert api.get(f"ipv4/{first_v4}").json["data"]["interface"] is None
    assert_error(api.get(f"interface/{first['interfaces'][0]['id']}"), 404, "interface/not_found")
    third = api.post("vm", json=vm_body(test_method)).json["data"]
    assert api.get(f"interface/{third['interfaces'][0]['id']}").json["data"]["ipv4"] == [
        {"id": first_v4}
    ]
    assert len(held(api, "ipv4")) == 2 and second["id"]


# ---------------------------------------------------------------------- pools


def test_ipv4_network_adds_every_host_but_the_gateway(api):
    response = api.post("ipv4", json={"network": "192.0.2.0/29", "gateway": "192.0.2.1"})
    assert response.status_code == 201
    addresses = [o["address"] for o in response.json["data"].values()]
    assert addresses == ["192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5", "192.0.2.6"]
    assert all(
        o["prefix"] == 29 and o["gateway"] == "192.0.2.1" for o in response.json["data"].values()
    )


def test_ipv4_single_address(api):
    data = api.post(
        "ipv4", json={"address": "192.0.2.7", "prefix": 24, "gateway": "192.0.2.1"}
    ).json["data"]
    assert (data["address"], data["interface"]) == ("192.0.2.7", None)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": "192.0.2.7", "prefix": 24, "gateway": "198.51.100.1"}, "gateway"),  # outside
        ({"address": "192.0.2.7", "prefix": 24, "gateway": "192.0.2.7"}, "gateway"),  # itself
        ({"address": "192.0.2.0", "prefix": 24, "gateway": "192.0.2.1"}, "address"),  # network
        ({"address": "192.0.2.255", "prefix": 24, "gateway": "192.0.2.1"}, "address"),  # broadcast
        ({"address": "2001:db8::1", "prefix": 24, "gateway": "192.0.2.1"}, "address"),  # family
        ({"address": "192.0.2.7", "prefix": 33, "gateway": "192.0.2.1"}, "prefix"),
        ({"address": "192.0.2.7", "gateway": "192.0.2.1"}, "prefix"),
        ({"address": "192.000.002.007", "prefix": 24, "gateway": "192.0.2.1"}, "address"),
        ({"network": "192.0.2.5/24", "gateway": "192.0.2.1"}, "network"),  # host bits
        ({"network": "192.0.2.0/24", "gateway": "192.0.3.1"}, "gateway"),
        ({"network": "192.0.2.0/24"}, "network"),
        ({"network": "192.0.2.0/24", "address": "192.0.2.9", "gateway": "192.0.2.1"}, "network"),
        ({"network": "10.0.0.0/16", "gateway": "10.0.0.1"}, "network"),  # too many at once
        ({"network": "192.0.2.7", "gateway": "192.0.2.7"}, "network"),  # no prefix (was a /32)
        ({"network": "192.0.2.0/255.255.255.0", "gateway": "192.0.2.1"}, "network"),  # mask
    ],
)
def test_ipv4_validation(api, body, field):
    error = assert_error(api.post("ipv4", json=body), 400, "general/validation")
    assert field in error["data"], error
    assert api.get("ipv4").json["data"] == {}


def test_ipv4_overlap_and_duplicate(api):
    api.post("ipv4", json={"address": "192.0.2.9", "prefix": 24, "gateway": "192.0.2.1"})
    error = assert_error(
        api.post("ipv4", json={"network": "192.0.2.0/28", "gateway": "192.0.2.1"}),
        409,
        "ipv4/overlap",
    )
    assert error["data"]["addresses"] == ["192.0.2.9"]
    assert_error(
        api.post("ipv4", json={"address": "192.0.2.9", "prefix": 24, "gateway": "192.0.2.1"}),
        409,
        "ipv4/duplicate",
    )
    assert len(api.get("ipv4").json["data"]) == 1


def test_held_addresses_cannot_be_deleted_or_renumbered(api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    v4, v6 = iface["ipv4"][0]["id"], iface["ipv6"][0]["id"]
    error = assert_error(api.delete(f"ipv4/{v4}"), 409, "ipv4/in_use")
    assert error["data"] == {"interface": [iface["id"]]}
    assert_error(api.update(f"ipv4/{v4}", json={"address": "198.51.100.200"}), 409, "ipv4/in_use")
    assert_error(api.delete(f"ipv6/{v6}"), 409, "ipv6/in_use")
    pool = next(iter(api.get("ipv6_pool").json["data"]))
    assert_error(api.delete(f"ipv6_pool/{pool}"), 409, "ipv6_pool/in_use")
    free = next(
        k for k, o in api.get("ipv4?limit=5").json["data"].items() if o["interface"] is None
    )
    assert api.delete(f"ipv4/{free}").status_code == 200


def test_ipv6_pool_hands_out_addresses_and_skips_the_gateway(api):
    pool = api.post("ipv6", json={"network": "2001:db8:7::/126", "gateway": "2001:db8:7::2"}).json[
        "data"
    ]
    assert (pool["network"], pool["prefix"], pool["size"], pool["next_host"]) == (
        "2001:db8:7::/126",
        126,
        4,
        1,
    )
    assert api.get("ipv6").json["data"] == {}  # a pool is not enumerated
    assert api.get(f"ipv6_pool/{pool['id']}").json["data"]["gateway"] == "2001:db8:7::2"


def test_ipv6_pool_exhaustion(api, vm_host, test_method):
    vm_host()
    big = next(iter(api.get("ipv6_pool").json["data"]))
    api.delete(f"ipv6_pool/{big}")
    api.post("ipv6", json={"network": "2001:db8:7::/126", "gateway": "2001:db8:7::1"})
    made = [api.post("vm", json=vm_body(test_method, cores=1)).json for _ in range(3)]
    assert [m.get("error_id") for m in made] == [None, None, "vm/no_free_ipv6"]
    assert sorted(held(api, "ipv6")) == ["2001:db8:7::2", "2001:db8:7::3"]


def test_ipv6_single_address_and_overlaps(api):
    assert (
        api.post(
            "ipv6", json={"address": "2001:db8:9::5", "prefix": 64, "gateway": "2001:db8:9::1"}
        ).status_code
        == 201
    )
    error = assert_error(
        api.post("ipv6", json={"network": "2001:db8:9::/64", "gateway": "2001:db8:9::1"}),
        409,
        "ipv6_pool/overlap",
    )
    assert error["data"]["addresses"] == ["2001:db8:9::5"]
    api.post("ipv6_pool", json={"network": "2001:db8:a::/64", "gateway": "2001:db8:a::1"})
    assert_error(
        api.post("ipv6_pool", json={"network": "2001:db8:a::/48", "gateway": "2001:db8:a::1"}),
        409,
        "ipv6_pool/overlap",
    )
    assert_error(
        api.post(
            "ipv6", json={"address": "2001:db8:a::9", "prefix": 64, "gateway": "2001:db8:a::1"}
        ),
        409,
        "ipv6/overlap",
    )
    assert_error(api.post("ipv6", json=[{"network": "2001:db8:b::/64", "gateway": "2001:db8:b::1"},
                                         {"address": "2001:db8:c::9", "prefix": 64, "gateway": "2001:db8:c::1"}]), 400, "general/validation")  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {"network": "2001:db8::/127", "gateway": "2001:db8::1"},  # too small
        {"network": "2001:db8::1/64", "gateway": "2001:db8::1"},  # host bits
        {"network": "2001:db8::/64", "gateway": "2001:db9::1"},  # outside
        {"network": "192.0.2.0/24", "gateway": "192.0.2.1"},  # family
    ],
)
def test_ipv6_pool_validation(api, body):
    assert_error(api.post("ipv6_pool", json=body), 400, "general/validation")


# ---------------------------------------------------------------------- VLANs


@pytest.mark.parametrize("tag", [0, 4095, -1, "7", True])
def test_vlan_tag_range(api, tag):
    assert_error(api.post("vlan", json={"tag": tag}), 400, "general/validation")


def test_vlan_on_an_interface(api, vm_host, test_method, driver):
    node = vm_host()
    vlan = api.post("vlan", json={"tag": 100}).json["data"]
    assert_error(api.post("vlan", json={"tag": 100}), 409, "vlan/duplicate")
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    iface_id = vm["interfaces"][0]["id"]
    response = api.update(f"interface/{iface_id}", json={"vlan": {"id": vlan["id"]}})
    assert response.status_code == 200
    assert response.json["data"]["vlan"] == {"id": vlan["id"]}
    assert (
        "VLAN 100" in response.json["message"]
        and "configuration management" in response.json["message"]
    )
    meta = domain_xml(driver, node, vm).find(
        "metadata/{urn:vmapi:domain:1}instance/{urn:vmapi:domain:1}interface"
    )
    assert meta.get("vlan") == "100"
    assert_error(api.delete(f"vlan/{vlan['id']}"), 409, "vlan/in_use")
    off = api.patch("interface", json={"id": iface_id, "vlan": None})
    assert off.json["data"]["vlan"] is None
    assert (
        domain_xml(driver, node, vm)
        .find("metadata/{urn:vmapi:domain:1}instance/{urn:vmapi:domain:1}interface")
        .get("vlan")
        is None
    )
    assert api.delete(f"vlan/{vlan['id']}").status_code == 200


def test_interface_fields_are_read_only(api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    iface = vm["interfaces"][0]["id"]
    assert_error(
        api.update(f"interface/{iface}", json={"mac": "52:54:00:00:00:01"}),
        400,
        "general/validation",
    )
    assert_error(
        api.update(f"interface/{iface}", json={"vlan": {"id": 99}}), 400, "general/validation"
    )
    assert_error(
        api.post("interface", json={"vm": {"id": vm["id"]}}), 405, "general/method_not_allowed"
    )
    assert_error(api.delete(f"interface/{iface}"), 405, "general/method_not_allowed")


# ---------------------------------------------------------------------- customers


def test_customers_read_only_their_own_interfaces_and_addresses(
    api, customer_api, vm_host, test_method
):
    vm_host()
    seven, eight = customer_api(7), customer_api(8)
    mine = seven.post("vm", json=vm_body(test_method)).json["data"]
    theirs = eight.post("vm", json=vm_body(test_method)).json["data"]
    my_iface = seven.get(f"interface/{mine['interfaces'][0]['id']}").json["data"]
    assert list(seven.get("interface").json["data"]) == [str(my_iface["id"])]
    assert_error(
        seven.get(f"interface/{theirs['interfaces'][0]['id']}"), 404, "interface/not_found"
    )
    assert list(seven.get("ipv4").json["data"]) == [str(my_iface["ipv4"][0]["id"])]
    assert list(seven.get("ipv6").json["data"]) == [str(my_iface["ipv6"][0]["id"])]
    assert seven.get(f"ipv4/{my_iface['ipv4'][0]['id']}").status_code == 200
    their_v4 = api.get(f"interface/{theirs['interfaces'][0]['id']}").json["data"]["ipv4"][0]["id"]
    assert_error(seven.get(f"ipv4/{their_v4}"), 404, "ipv4/not_found")
    for path, body in [("ipv4", {"address": "192.0.2.7", "prefix": 24, "gateway": "192.0.2.1"}),
                       ("ipv6", {"address": "2001:db8::7", "prefix": 64, "gateway": "2001:db8::1"}),
                       ("vlan", {"tag": 5}), ("ipv6_pool", {"network": "2001:db8:5::/64", "gateway": "2001:db8:5::1"})]:  # fmt: skip
        assert_error(seven.post(path, json=body), 403, "general/authorization/forbidden")
    assert_error(seven.get("vlan"), 403, "general/authorization/forbidden")
    assert_error(seven.get("ipv6_pool"), 403, "general/authorization/forbidden")
    assert_error(
        seven.update(f"interface/{my_iface['id']}", json={"vlan": None}),
        403,
        "general/authorization/forbidden",
    )
    assert_error(
        seven.delete(f"ipv4/{my_iface['ipv4'][0]['id']}"), 403, "general/authorization/forbidden"
    )
    assert_error(
        seven.get(f"interface/{my_iface['id']}?nest=vlan"), 403, "general/authorization/forbidden"
    )
    assert seven.get(f"interface/{my_iface['id']}?nest=vm").json["data"]["vm"]["id"] == mine["id"]


def test_vlan_change_that_the_host_refuses_changes_nothing(app, api, vm_host, test_method, driver):
    from tests.faults import FaultyDriver
    from vmapi.services.nodes.hosts import DRIVER_KEY

    node = vm_host()
    vlan = api.post("vlan", json={"tag": 100}).json["data"]
    a, b = api.post("vm", json=[vm_body(test_method), vm_body(test_method)]).json["data"].values()
    ifaces = [a["interfaces"][0]["id"], b["interfaces"][0]["id"]]
    faults = FaultyDriver(driver)
    app.extensions[DRIVER_KEY] = faults
    faults.fail("define", skip=1)  # the first interface's domain is redefined, the second fails
    body = [{"id": i, "vlan": {"id": vlan["id"]}} for i in ifaces]
    error = assert_error(api.update("interface", json=body), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "recording the VLAN in the domain"
    assert [api.get(f"interface/{i}").json["data"]["vlan"] for i in ifaces] == [None, None]
    meta = domain_xml(driver, node, a).find(
        "metadata/{urn:vmapi:domain:1}instance/{urn:vmapi:domain:1}interface"
    )
    assert meta.get("vlan") is None  # the first domain's definition was put back too


def test_a_taken_mac_is_skipped_and_eight_taken_refuse(api, vm_host, test_method, monkeypatch):
    """A new interface's INSERT skips a MAC another interface has (its unique index) and
    tries another; after eight taken ones the create is refused and leaves nothing. The
    random MACs are chosen here: a collision in 2^24 cannot be had on demand."""
    from vmapi.services.network import allocation as network

    vm_host()
    first = api.post("vm", json=vm_body(test_method)).json["data"]
    taken = api.get(f"interface/{first['interfaces'][0]['id']}").json["data"]["mac"]
    offered = iter([taken, taken, "52:54:00:aa:bb:cc"])
    monkeypatch.setattr(network, "random_mac", lambda: next(offered))
    second = api.post("vm", json=vm_body(test_method))
    assert second.status_code == 201, second.json
    mac = api.get(f"interface/{second.json['data']['interfaces'][0]['id']}").json["data"]["mac"]
    assert mac == "52:54:00:aa:bb:cc"

    monkeypatch.setattr(network, "random_mac", lambda: taken)
    assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/no_free_mac")
    assert set(api.get("vm").json["data"]) == {str(first["id"]), str(second.json["data"]["id"])}
    assert len(api.get("interface").json["data"]) == 2


def test_an_array_makes_its_ipv6_addresses_at_once_and_refuses_past_its_pools(
    api, vm_host, test_method, backend
):
    """An array counts the pools up once for all its VMs (issue 17); past the pools'
    end the element without an address is refused as one by one, the array leaves no
    VM, and the addresses it made stay free for the next create."""
    vm_host()
    big = next(iter(api.get("ipv6_pool").json["data"]))
    api.delete(f"ipv6_pool/{big}")
    api.post("ipv6", json={"network": "2001:db8:7::/125", "gateway": "2001:db8:7::1"})
    pool = next(iter(api.get("ipv6_pool").json["data"].values()))
    error = assert_error(
        api.post("vm", json=[vm_body(test_method, cores=1)] * 7), 409, "vm/no_free_ipv6"
    )
    assert error["data"]["index"] == 6
    assert api.get("vm").json["data"] == {}
    # counted up once, in a transaction of its own (SQLite: all one transaction, undone)
    counted = api.get(f"ipv6_pool/{pool['id']}").json["data"]["next_host"]
    assert counted == (8 if backend == "postgresql" else 1)
    made = api.post("vm", json=[vm_body(test_method, cores=1)] * 6)
    assert made.status_code == 201, made.json
    assert sorted(held(api, "ipv6")) == [f"2001:db8:7::{n}" for n in range(2, 8)]
