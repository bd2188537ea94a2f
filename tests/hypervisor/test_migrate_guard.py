"""The guard holds on a live move's target, with a booted guest (issue 23): the traffic
test_migrate_filters.py does not look at.

Both private hosts of ``host_pair`` (tests/hypervisor/migrate_env.py) put their NICs on
one test bridge in ``bridge`` mode, as test_migrate_filters.py does; a test guest
(tests/guest/) boots on ``a`` and moves live to ``b`` through the API. On ``b`` a spoofed
source is dropped while the guest's real ping arrives (tests/hypervisor/capture.py),
probed from the test's namespace (tests/hypervisor/probes.py).
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
def guest(env: MigrateEnv, net: GuestNetwork) -> ProbeGuest:
    vm = env.create("a", hostname="guard-moving")
    return probes.guest_ready(env.api, env.console(vm["id"]), net, vm)


def where(env: MigrateEnv, guest: ProbeGuest) -> str:
    name = f"{INSTALLATION}-vm-{guest.vm['id']}"
    [host] = [h for h in ("a", "b") if env.domains(h).get(name) == "running"]
    return host


def test_the_guard_holds_on_the_target_of_a_live_move(env, net, guest):
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
