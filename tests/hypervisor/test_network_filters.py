"""Network filters on the real libvirtd: what vmapi defines, what libvirt binds to each
running NIC, and what lands in the kernel's ruleset (issue 23). Traffic itself is proven
with booted guests in test_network_guard.py; these guests are disk-less (SeaBIOS only),
which is all a filter binding needs.

The module's node is in ``bridge`` mode on a bridge of the test's own (no address, its
gateway end in a namespace of the test's own: tests/hypervisor/guest_net.py). Each test
makes its own VMs and deletes them; the module ends with no filter of the installation
left on the host (``env``'s check).
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest
from click.testing import Result

from tests.conftest import MIB
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.hypervisor.boot_env import BootEnv
from tests.hypervisor.guest_net import guest_network
from tests.hypervisor.qemu_host import INSTALLATION
from vmapi.extensions import db
from vmapi.models import Node
from vmapi.services.network.filters import link_local
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]

GATEWAYS = ("198.51.100.1/24", "2001:db8:100::1/64")
GUARD = sorted(f"{INSTALLATION}-guard-{part}"
               for part in ("mac", "ipv4", "noipv4", "ipv6", "arp", "noarp", "l2"))  # fmt: skip


@pytest.fixture(scope="module")
def net(env: BootEnv) -> Iterator[str]:
    with guest_network(GATEWAYS) as made:
        body = {"interface_mode": "bridge", "bridge": made.bridge}
        assert env.api.update(f"node/{env.node['id']}", json=body).status_code == 200
        yield made.bridge
        for vm in env.api.get("vm").json["data"]:
            assert env.api.delete(f"vm/{vm}").status_code == 200


@pytest.fixture(autouse=True)
def no_vms(env: BootEnv, net: str) -> Iterator[None]:
    """Each test starts with no VM (a failed one may have left its own)."""
    yield
    for vm in env.api.get("vm").json["data"]:
        assert env.api.delete(f"vm/{vm}").status_code == 200


def new_vm(env: BootEnv, **fields) -> dict:
    body = {"cores": 1, "ram": 128 * MIB, "virt_method": {"id": env.method}, **fields}
    made = env.api.post("vm", json=body)
    assert made.status_code == 201, made.json
    return made.json["data"]


def interface_of(env: BootEnv, vm: dict) -> dict:
    ident = vm["interfaces"][0]["id"]
    return env.api.get(f"interface/{ident}").json["data"]


def binding(conn: libvirt.virConnect, filter_name: str) -> tuple[str, dict[str, list[str]]]:
    """The tap a filter is bound to (one running NIC) and the parameters it was given."""
    found = [b for b in conn.listAllNWFilterBindings() if b.filterName() == filter_name]
    assert len(found) == 1, [b.filterName() for b in conn.listAllNWFilterBindings()]
    root = ET.fromstring(found[0].XMLDesc())
    params: dict[str, list[str]] = {}
    for param in root.findall("filterref/parameter"):
        params.setdefault(param.get("name"), []).append(param.get("value"))
    return found[0].portDev(), params


def rules(*command: str) -> str:
    """The kernel's ruleset as the tool lists it (read only)."""
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout


def addresses(env: BootEnv, iface: dict) -> tuple[str, str]:
    v4 = env.api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]["address"]
    v6 = env.api.get(f"ipv6/{iface['ipv6'][0]['id']}").json["data"]["address"]
    return v4, v6


def test_a_guarded_nic_is_bound_to_its_filter_with_its_addresses(env, net):
    vm = new_vm(env)
    iface = interface_of(env, vm)
    v4, v6 = addresses(env, iface)
    port = f"{INSTALLATION}-nic-{iface['id']}"
    assert env.filters() == sorted([*GUARD, port])
    tap, params = binding(env.conn, port)
    assert params == {"CTRL_IP_LEARNING": ["none"], "IP": [v4], "MAC": [iface["mac"]],
                      "IPV6": [v6, link_local(iface["mac"])]}  # fmt: skip
    # in the kernel: the tap's bridge-layer chains hold the guest to its MAC and addresses
    bridge = rules("ebtables", "-t", "nat", "-L")
    assert f"-s ! {iface['mac']} -j DROP" in bridge
    assert f"--ip-src {v4} -j RETURN" in bridge
    assert f"--ip6-src {v6} -j RETURN" in bridge
    assert f"--arp-ip-src {v4} -j RETURN" in bridge
    assert f"-i {tap} -j libvirt-I-{tap}" in bridge
    # and the persistent definition says the same (what a restart or a migration uses)
    dom = env.conn.lookupByName(f"{INSTALLATION}-vm-{vm['id']}")
    defined = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert defined.find("devices/interface/filterref").get("filter") == port
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200
    assert env.filters() == [], "the last VM takes the guard with it"
    assert f"libvirt-I-{tap}" not in rules("ebtables", "-t", "nat", "-L")


def free_addresses(env: BootEnv) -> tuple[dict, dict]:
    """A free IPv4 address of the range, and an IPv6 address of the pool that a VM took
    and gave back."""
    v4 = next(a for a in env.api.get("ipv4?limit=1000").json["data"].values()
              if a["interface"] is None)  # fmt: skip
    other = new_vm(env)
    v6 = env.api.get(f"ipv6/{interface_of(env, other)['ipv6'][0]['id']}").json["data"]
    assert env.api.delete(f"vm/{other['id']}").status_code == 200
    return v4, v6


def test_new_addresses_move_the_guard_live(env, net):
    vm = new_vm(env)
    iface = interface_of(env, vm)
    old4, old6 = addresses(env, iface)
    port = f"{INSTALLATION}-nic-{iface['id']}"
    tap, _params = binding(env.conn, port)
    v4, v6 = free_addresses(env)
    body = {"ipv4": [{"id": v4["id"]}], "ipv6": [{"id": v6["id"]}]}
    moved = env.api.update(f"interface/{iface['id']}", json=body)
    assert moved.status_code == 200, moved.json
    # the same running NIC (no restart: the same tap), bound with the new addresses
    same_tap, params = binding(env.conn, port)
    assert same_tap == tap
    assert params["IP"] == [v4["address"]]
    assert params["IPV6"] == [v6["address"], link_local(iface["mac"])]
    bridge = rules("ebtables", "-t", "nat", "-L")
    assert f"--ip-src {v4['address']} -j RETURN" in bridge
    assert f"--ip-src {old4} -j RETURN" not in bridge
    assert f"--ip6-src {old6} -j RETURN" not in bridge
    # the persistent definition too
    dom = env.conn.lookupByName(f"{INSTALLATION}-vm-{vm['id']}")
    defined = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    ips = [p.get("value") for p in defined.findall("devices/interface/filterref/parameter")
           if p.get("name") == "IP"]  # fmt: skip
    assert ips == [v4["address"]]
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200


def test_an_interface_without_ipv4_may_send_no_ipv4_and_no_arp(env, net):
    vm = new_vm(env)
    iface = interface_of(env, vm)
    port = f"{INSTALLATION}-nic-{iface['id']}"
    tap, _params = binding(env.conn, port)
    gone = env.api.update(f"interface/{iface['id']}", json={"ipv4": []})
    assert gone.status_code == 200, gone.json
    _tap, params = binding(env.conn, port)
    assert "IP" not in params
    held = ET.fromstring(env.conn.nwfilterLookupByName(port).XMLDesc())
    assert [r.get("filter") for r in held.findall("filterref")] == [
        f"{INSTALLATION}-guard-{part}" for part in ("mac", "noipv4", "ipv6", "noarp", "l2")
    ]
    chain = rules("ebtables", "-t", "nat", "-L", f"I-{tap}-ipv4")
    assert chain.strip().endswith("-j DROP") and "--ip-src" not in chain
    # and back: the filter finds its IP
    back = env.api.update(f"interface/{iface['id']}", json={"ipv4": iface["ipv4"]})
    assert back.status_code == 200, back.json
    assert binding(env.conn, port)[1]["IP"] == [addresses(env, iface)[0]]
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200


def test_admins_turn_the_guard_off_for_one_interface(env, net):
    vm, other = new_vm(env), new_vm(env)
    iface = interface_of(env, vm)
    port = f"{INSTALLATION}-nic-{iface['id']}"
    tap, _params = binding(env.conn, port)
    off = env.api.update(f"interface/{iface['id']}", json={"spoof_guard": False})
    assert off.status_code == 200, off.json
    assert off.json["data"]["spoof_guard"] is False
    held = ET.fromstring(env.conn.nwfilterLookupByName(port).XMLDesc())
    assert held.findall("filterref") == []
    assert f"libvirt-I-{tap}" not in rules("ebtables", "-t", "nat", "-L")
    # the other VM's NIC is guarded as before
    other_tap, _ = binding(env.conn, f"{INSTALLATION}-nic-{interface_of(env, other)['id']}")
    assert f"-i {other_tap} -j libvirt-I-{other_tap}" in rules("ebtables", "-t", "nat", "-L")
    on = env.api.update(f"interface/{iface['id']}", json={"spoof_guard": True})
    assert on.status_code == 200, on.json
    assert f"-i {tap} -j libvirt-I-{tap}" in rules("ebtables", "-t", "nat", "-L")
    for one in (vm, other):
        assert env.api.delete(f"vm/{one['id']}").status_code == 200


@pytest.fixture
def faulty(env: BootEnv) -> Iterator[FaultyDriver]:
    real = env.app.extensions[DRIVER_KEY]
    env.app.extensions[DRIVER_KEY] = wrapped = FaultyDriver(real)
    yield wrapped
    env.app.extensions[DRIVER_KEY] = real
    with env.app.app_context():  # as a check that reaches it would find it
        db.session.get(Node, env.node["id"]).network_filters = True
        db.session.commit()


def node_row(env: BootEnv) -> Node:
    with env.app.app_context():
        node = db.session.get(Node, env.node["id"])
        db.session.expunge(node)
        return node


def cli(env: BootEnv, *args: str) -> Result:
    return env.app.test_cli_runner().invoke(args=["vmapi", *args])


def test_a_node_without_a_filter_driver_gets_no_guest_to_guard(env, net, faulty):
    faulty.fail("define_filter", kind="no_nwfilter")
    body = {"cores": 1, "ram": 128 * MIB, "virt_method": {"id": env.method}}
    error = assert_error(env.api.post("vm", json=body), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "defining the network filters"
    assert env.api.get("vm").json["data"] == {}  # nothing half-made: no row ...
    assert env.ours() == []  # ... no domain, no volume, no filter
    assert node_row(env).network_filters is False
    # the scheduler gives it no VM it would have to guard
    error = assert_error(env.api.post("vm", json=body), 409, "vm/no_valid_host")
    assert error["data"]["removed_by_filter"]["can_guard"] == 1
    # a check asks the node again (here it has the driver: it takes VMs again)
    result = cli(env, "node", "check")
    assert result.exit_code == 0, result.output
    assert node_row(env).network_filters is True
    vm = new_vm(env)
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200


def test_a_create_failing_after_its_filters_leaves_none(env, net, faulty):
    faulty.fail("define")  # the domain's definition, after the filters were defined
    body = {"cores": 1, "ram": 128 * MIB, "virt_method": {"id": env.method}}
    error = assert_error(env.api.post("vm", json=body), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "defining the domain"
    assert "define_filter" in faulty.calls
    assert env.ours() == []


def test_a_nic_change_the_host_refuses_is_undone_everywhere(env, net, faulty):
    vm = new_vm(env)
    iface = interface_of(env, vm)
    port = f"{INSTALLATION}-nic-{iface['id']}"
    _tap, before = binding(env.conn, port)
    v4, _v6 = free_addresses(env)
    faulty.fail("define")  # the persistent definition, after the live change
    body = {"ipv4": [{"id": v4["id"]}]}
    error = assert_error(env.api.update(f"interface/{iface['id']}", json=body), 502,
                         "vm/hypervisor_error")  # fmt: skip
    assert error["data"]["step"] == "recording the new addresses in the domain"
    assert binding(env.conn, port)[1] == before  # the running NIC has its addresses back
    assert interface_of(env, vm)["ipv4"] == iface["ipv4"]


def test_a_power_cycle_and_a_resize_keep_the_guard(env, net):
    vm = new_vm(env)
    port = f"{INSTALLATION}-nic-{interface_of(env, vm)['id']}"
    _tap, before = binding(env.conn, port)
    path = f"vm/{vm['id']}"
    assert env.api.update(f"{path}?force=true", json={"vm_state": {"id": 4}}).status_code == 200
    assert port not in [b.filterName() for b in env.conn.listAllNWFilterBindings()]
    assert env.api.update(path, json={"cores": 2}).status_code == 200
    assert env.api.update(path, json={"vm_state": {"id": 2}}).status_code == 200
    assert binding(env.conn, port)[1] == before


def reconcile(env: BootEnv, *args: str) -> Result:
    return cli(env, "reconcile", *args)


def test_node_check_and_reconcile_find_a_filter_changed_by_hand_and_reconcile_repairs_it(env, net):
    vm = new_vm(env)
    port = f"{INSTALLATION}-nic-{interface_of(env, vm)['id']}"
    assert cli(env, "node", "check").exit_code == 0
    assert "filter" not in reconcile(env).output
    # someone opens the NIC's filter by hand: no guard any more
    opened = ET.fromstring(env.conn.nwfilterLookupByName(port).XMLDesc())
    for ref in opened.findall("filterref"):
        opened.remove(ref)
    env.conn.nwfilterDefineXML(ET.tostring(opened, encoding="unicode"))
    checked = cli(env, "node", "check")
    assert checked.exit_code == 1 and port in checked.output, checked.output
    found = reconcile(env)
    assert f"filter_differs  {port}" in found.output, found.output
    fixed = reconcile(env, "--fix")
    assert f"fixed  filter_differs  {port}" in fixed.output, fixed.output
    assert "filter" not in reconcile(env).output
    held = ET.fromstring(env.conn.nwfilterLookupByName(port).XMLDesc())
    assert len(held.findall("filterref")) == 5  # the guard is back


def group_with(env: BootEnv, *ports: int) -> dict:
    group = env.api.post("security_group", json={"name": f"web-{'-'.join(map(str, ports))}"})
    assert group.status_code == 201, group.json
    for port in ports:
        rule = {"security_group": {"id": group.json["data"]["id"]}, "direction": "ingress",
                "ethertype": "ipv4", "protocol": "tcp", "port_min": port}  # fmt: skip
        assert env.api.post("security_group_rule", json=rule).status_code == 201
    return group.json["data"]


def forward_rules(tap: str) -> str:
    """What reaches the guest behind ``tap`` in the IP layer (iptables' chain for it)."""
    return rules("iptables", "-S", f"FO-{tap}")


def test_a_rule_change_reaches_the_running_guest_before_the_answer(env, net):
    group = group_with(env, 80)
    vm = new_vm(env, security_groups=[{"id": group["id"]}])
    port = f"{INSTALLATION}-nic-{vm['interfaces'][0]['id']}"
    tap, _params = binding(env.conn, port)
    assert f"{INSTALLATION}-sg-{group['id']}" in env.filters()
    chain = forward_rules(tap)
    assert "--dport 80 " in chain and "--dport 8080 " not in chain and "-j DROP" in chain
    rule = {"security_group": {"id": group["id"]}, "direction": "ingress", "ethertype": "ipv4",
            "protocol": "tcp", "port_min": 8080}  # fmt: skip
    made = env.api.post("security_group_rule", json=rule)
    assert made.status_code == 201, made.json
    assert "--dport 8080 " in forward_rules(tap)  # by the time the answer came
    gone = env.api.delete(f"security_group_rule/{made.json['data']['id']}")
    assert gone.status_code == 200, gone.json
    assert "--dport 8080 " not in forward_rules(tap)
    # the group taken off the interface: ingress unfiltered, the group's filter gone
    off = env.api.update(f"interface/{vm['interfaces'][0]['id']}", json={"security_groups": []})
    assert off.status_code == 200, off.json
    assert f"FO-{tap}" not in rules("iptables", "-S")  # nothing of the guest's in the IP layer
    assert f"{INSTALLATION}-sg-{group['id']}" not in env.filters()
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200
    assert env.api.delete(f"security_group/{group['id']}").status_code == 200


def test_a_node_a_rule_change_missed_gets_it_from_the_next_check(env, net, faulty):
    group = group_with(env, 80)
    vm = new_vm(env, security_groups=[{"id": group["id"]}])
    tap, _params = binding(env.conn, f"{INSTALLATION}-nic-{vm['interfaces'][0]['id']}")
    faulty.fail("stale_filters", kind="unavailable")  # the node does not answer the change
    rule = {"security_group": {"id": group["id"]}, "direction": "ingress", "ethertype": "ipv4",
            "protocol": "tcp", "port_min": 8080}  # fmt: skip
    made = env.api.post("security_group_rule", json=rule)
    assert made.status_code == 201, made.json  # the database is the truth
    assert "brought in line when it answers" in made.json["message"]
    assert node_row(env).filters_pending is True
    assert "--dport 8080 " not in forward_rules(tap)
    checked = cli(env, "node", "check")
    assert checked.exit_code == 0, checked.output
    assert "network filters brought in line (1 defined" in checked.output
    assert "--dport 8080 " in forward_rules(tap)
    assert node_row(env).filters_pending is False
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200
    assert env.api.delete(f"security_group/{group['id']}").status_code == 200
