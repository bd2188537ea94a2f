"""The guard holds on a live move's target, with a booted guest (issue 23): the traffic
test_migrate_filters.py does not look at.

Both private hosts of ``host_pair`` (tests/hypervisor/migrate_env.py) put their NICs on
one test bridge in ``bridge`` mode, as test_migrate_filters.py does; a test guest
(tests/guest/) boots on ``a`` and moves live to ``b`` through the API. On ``b`` a spoofed
source is dropped while the guest's real ping arrives (tests/hypervisor/capture.py), and
its security group still lets in TCP 80 and nothing else, probed from the test's
namespace (tests/hypervisor/probes.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hypervisor import capture as cap
from tests.hypervisor import probes
from tests.hypervisor.guest_net import GuestNetwork, guest_network
from tests.hypervisor.migrate_env import INSTALLATION, MigrateEnv, migrate_env
from tests.hypervisor.probes import ProbeGuest

pytestmark = [pytest.mark.hypervisor]

GATEWAYS = ("198.51.100.1/24", "2001:db8:100::1/64")  # (the ranges migrate_env registers)
GW4, GW6 = (g.split("/")[0] for g in GATEWAYS)
SPOOF4, SPOOF6 = "198.51.100.99", "2001:db8:100::99"
QUIET = 1.0  # as test_network_guard.py: after the control arrived


@pytest.fixture(scope="module")
def net(host_pair) -> Iterator[GuestNetwork]:
    with guest_network(GATEWAYS) as made:
        yield made


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory, net) -> Iterator[MigrateEnv]:
    store = tmp_path_factory.mktemp("images")
    with migrate_env(pg_server, host_pair, guest_image.path, store) as made:
        for node in made.nodes.values():  # both hosts' NICs on the test's bridge
            body = {"interface_mode": "bridge", "bridge": net.bridge}
            assert made.api.update(f"node/{node['id']}", json=body).status_code == 200
        yield made
        for vm in made.api.get("vm").json["data"]:
            assert made.api.delete(f"vm/{vm}").status_code == 200


@pytest.fixture(scope="module")
def web(env: MigrateEnv) -> int:
    """A group letting in TCP 80 only, both families (the probes' channel)."""
    made = env.api.post("security_group", json={"name": "web"})
    assert made.status_code == 201, made.json
    group = made.json["data"]["id"]
    for family in ("ipv4", "ipv6"):
        rule = {"security_group": {"id": group}, "direction": "ingress", "ethertype": family,
                "protocol": "tcp", "port_min": 80, "port_max": 80}  # fmt: skip
        added = env.api.post("security_group_rule", json=rule)
        assert added.status_code == 201, added.json
    return group


@pytest.fixture(scope="module")
def guest(env: MigrateEnv, net: GuestNetwork, web: int) -> ProbeGuest:
    vm = env.create("a", hostname="guard-moving", security_groups=[{"id": web}])
    return probes.guest_ready(env.api, env.console(vm["id"]), net, vm)


def where(env: MigrateEnv, guest: ProbeGuest) -> str:
    name = f"{INSTALLATION}-vm-{guest.vm['id']}"
    [host] = [h for h in ("a", "b") if env.domains(h).get(name) == "running"]
    return host


def test_the_guard_and_a_group_hold_on_the_target_of_a_live_move(env, net, guest, web):
    port80 = [f"http://{guest.ipv4}/", f"http://[{guest.ipv6}]/"]
    port8080 = [f"http://{guest.ipv4}:8080/", f"http://[{guest.ipv6}]:8080/"]
    iface = f"interface/{guest.vm['interfaces'][0]['id']}"
    assert env.api.get(iface).json["data"]["security_groups"] == [{"id": web}]
    listen = probes.probe(net, guest.ipv4, "tcp-listen", port=8080)
    assert listen["listening"] == "yes", listen
    try:
        target = "b" if where(env, guest) == "a" else "a"
        moved = env.api.post(f"vm/{guest.vm['id']}/migrate",
                             json={"node": {"id": env.nodes[target]["id"]}})  # fmt: skip
        assert moved.status_code == 200, moved.json
        assert where(env, guest) == target
        with cap.capture(net) as seen:
            four = probes.probe(net, guest.ipv4, "ping4", src=SPOOF4, dst=GW4, count=1)
            six = probes.probe(net, guest.ipv4, "ping6", src=SPOOF6, dst=GW6, count=1)
            assert four["added"] == six["added"] == "yes", (four, six)
            real = probes.probe(net, guest.ipv4, "ping4", dst=GW4, count=1)
            assert real["received"] == "1", real
            control = cap.ping_from(guest.ipv4, GW4) & cap.from_mac(guest.mac)
            assert seen.arrived(control), seen.summary()
            spoofed = cap.ipv4_from(SPOOF4) | cap.arp_claiming(SPOOF4) | cap.ipv6_from(SPOOF6)
            assert not seen.arrived(spoofed, within=QUIET), seen.summary()
        assert all("VMAPI-PAGE" in (net.get(url) or "") for url in port80)
        assert [net.get(url) for url in port8080] == [None, None]
        # the group off the interface (on the target), 8080 answers: the group held it
        assert env.api.update(iface, json={"security_groups": []}).status_code == 200
        assert [net.get(url) for url in port8080] == ["VMAPI-PORT 8080\n"] * 2
    finally:
        assert env.api.update(iface, json={"security_groups": [{"id": web}]}).status_code == 200
        closed = probes.probe(net, guest.ipv4, "tcp-close", port=8080)
        assert closed["listening"] == "no", closed
