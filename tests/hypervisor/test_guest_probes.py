"""The guest probes and the namespace capture, proved on a real guest with no filter.

One VM of the test guest (tests/guest/) booted through the API on the test's bridge
(tests/hypervisor/guest_net.py), as in test_guest_network.py. From the test's namespace
each test asks the guest to try one thing (tests/hypervisor/probes.py) while a capture on
the namespace's veth (tests/hypervisor/capture.py) records what arrives, then asks the
capture whether the guest's frames came. vmapi guards every NIC in ``bridge`` mode; this
guest's guard is off (an admin's ``spoof_guard: false``) and it has no security group, so
nothing filters what it sends and everything arrives: a ping from its real addresses and
from spoofed ones, a gratuitous ARP for an address not its own, a ping after changing its
MAC, an unsolicited neighbour advertisement, a router advertisement, a DHCP server's
offer; and a port it was told to open answers. This is the baseline the network-filter
tests invert (test_network_guard.py): with the guard on, the spoofs must not arrive,
with the same calls.

The module's tests share one guest (a boot costs about 10 s under TCG); each one leaves
the guest as it found it (addresses, MAC, listeners), so they pass in any order and alone.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.guest import console
from tests.guest import frames as f
from tests.hypervisor import capture as cap
from tests.hypervisor import probes
from tests.hypervisor.boot_env import BootEnv
from tests.hypervisor.capture import Capture
from tests.hypervisor.guest_net import GuestNetwork, guest_network
from tests.hypervisor.probes import ProbeGuest

pytestmark = [pytest.mark.hypervisor]

#: the gateways of the address ranges boot_env registers through the API
GATEWAYS = ("198.51.100.1/24", "2001:db8:100::1/64")
GW4, GW6 = (g.split("/")[0] for g in GATEWAYS)
#: addresses of the guest's networks that are not its own, and a MAC not its own
SPOOF4, SPOOF6 = "198.51.100.99", "2001:db8:100::99"
SPOOF_MAC = "52:54:00:de:ad:01"


@pytest.fixture(scope="module")
def net(env: BootEnv) -> Iterator[GuestNetwork]:
    with guest_network(GATEWAYS) as made, probes.node_on_bridge(env, made):
        yield made


@pytest.fixture(scope="module")
def guest(env: BootEnv, net: GuestNetwork, guest_image) -> ProbeGuest:
    made = probes.boot_guest(env, net, env.upload(guest_image.path)["id"], hostname="probe-guest")
    assert made.ipv4 != SPOOF4 and made.ipv6 != SPOOF6  # (the API hands out the lowest free)
    off = env.api.update(f"interface/{made.vm['interfaces'][0]['id']}", json={"spoof_guard": False})
    assert off.status_code == 200, off.json
    return made


def console_tail(env: BootEnv, vm: dict) -> str:
    return "\n".join(console.lines(env.console(vm["id"])())[-40:])


@pytest.fixture
def seen(net: GuestNetwork) -> Iterator[Capture]:
    with cap.capture(net) as running:
        yield running


def addresses_now(net: GuestNetwork, guest: ProbeGuest) -> set[str]:
    """The guest's addresses but its link-local one (which its kernel adds a while after
    the boot, whatever the probes do)."""
    return {a for a in probes.info(net, guest.ipv4).addresses if not a.startswith("fe80:")}


def test_pings_from_the_guests_own_addresses_arrive(net, guest, seen):
    before = addresses_now(net, guest)
    four = probes.probe(net, guest.ipv4, "ping4", dst=GW4)
    assert four.ok and four["added"] == "no" and int(four["received"]) >= 1, four
    six = probes.probe(net, guest.ipv4, "ping6", dst=GW6)
    # (rc 1 when one of the two got no answer: right after the boot the first may not)
    assert int(six["received"]) >= 1, six
    assert seen.arrived(cap.ping_from(guest.ipv4, GW4) & cap.from_mac(guest.mac)), seen.summary()
    assert seen.arrived(cap.ping_from(guest.ipv6, GW6) & cap.from_mac(guest.mac)), seen.summary()
    # the capture tells them apart: nothing came from an address the guest did not use
    assert not seen.arrived(cap.ipv4_from(SPOOF4), within=0.5), seen.summary()
    assert addresses_now(net, guest) == before


@pytest.mark.parametrize(
    ("action", "spoofed", "gateway"), [("ping4", SPOOF4, GW4), ("ping6", SPOOF6, GW6)]
)
def test_a_ping_from_a_spoofed_source_arrives(net, guest, seen, action, spoofed, gateway):
    before = addresses_now(net, guest)
    assert not any(a.startswith(f"{spoofed}/") for a in before)
    answer = probes.probe(net, guest.ipv4, action, src=spoofed, dst=gateway)
    assert answer["added"] == "yes" and answer["src"] == spoofed, answer
    # (the gateway answers too: nothing filters, and the guest held the address a while)
    assert seen.arrived(cap.ping_from(spoofed, gateway) & cap.from_mac(guest.mac)), seen.summary()
    assert addresses_now(net, guest) == before  # the spoofed address is gone again


def test_a_gratuitous_arp_for_another_address_arrives(env, net, guest, seen):
    before = addresses_now(net, guest)
    answer = probes.probe(net, guest.ipv4, "garp", ip=SPOOF4)
    assert answer.ok and answer["added"] == "yes", answer
    claim = cap.arp_claiming(SPOOF4, guest.mac) & cap.from_mac(guest.mac)
    assert seen.arrived(claim), seen.summary()
    assert addresses_now(net, guest) == before
    # the guest said so on its console as well
    said = [p for p in console.boots(env.console(guest.vm["id"])())[-1].probes
            if p.get("action") == "garp" and p.get("ip") == SPOOF4]  # fmt: skip
    assert said and said[-1]["rc"] == "0", console_tail(env, guest.vm)


def test_a_ping_after_a_mac_change_arrives_from_the_new_mac(net, guest, seen):
    answer = probes.probe(net, guest.ipv4, "mac", new=SPOOF_MAC, dst=GW4)
    assert answer["old"] == guest.mac and answer["restored"] == "yes", answer
    assert seen.arrived(cap.ping_from(guest.ipv4, GW4) & cap.from_mac(SPOOF_MAC)), seen.summary()
    assert probes.info(net, guest.ipv4).mac == guest.mac


def test_an_unsolicited_neighbour_advertisement_arrives(net, guest, seen):
    answer = probes.probe(net, guest.ipv4, "na", target=SPOOF6)
    assert answer.ok and answer["sent"] == "2", answer
    advert = cap.neighbour_advert(SPOOF6, guest.mac) & cap.from_mac(guest.mac)
    assert seen.arrived(advert), seen.summary()
    [first, *_] = seen.matching(advert)
    assert (first.ip_src, first.ip_dst, first.hop_limit) == (SPOOF6, f.ALL_NODES, 255)
    assert first.na_flags == 0x20  # override, unsolicited


def test_a_router_advertisement_arrives(net, guest, seen):
    answer = probes.probe(net, guest.ipv4, "ra", count=1)
    assert answer.ok and answer["sent"] == "1", answer
    assert seen.arrived(cap.router_advert(guest.mac)), seen.summary()
    [advert] = seen.matching(cap.router_advert(guest.mac))
    assert (advert.ip_src, advert.ip_dst, advert.nd_ll) == (
        guest.link_local,
        f.ALL_NODES,
        guest.mac,
    )


def test_a_dhcp_servers_offer_arrives(net, guest, seen):
    offered = str(ipaddress.ip_network(GATEWAYS[0], strict=False)[200])
    answer = probes.probe(net, guest.ipv4, "dhcp-offer", offered=offered)
    assert answer.ok, answer
    offer = cap.dhcp_offer(offered) & cap.from_mac(guest.mac) & cap.ipv4_from(guest.ipv4)
    assert seen.arrived(offer), seen.summary()
    assert seen.arrived(cap.udp_from_port(f.DHCP_SERVER_PORT))


def test_a_port_the_guest_opens_answers_until_it_closes_it(net, guest):
    urls = [f"http://{guest.ipv4}:8080/", f"http://[{guest.ipv6}]:8080/"]
    probes.probe(net, guest.ipv4, "tcp-close", port=8080)  # whatever an earlier run left
    assert [net.get(url) for url in urls] == [None, None]
    try:
        opened = probes.probe(net, guest.ipv4, "tcp-listen", port=8080)
        assert opened["state"] == "started" and opened["listening"] == "yes", opened
        assert [net.get(url) for url in urls] == ["VMAPI-PORT 8080\n"] * 2
        again = probes.probe(net, guest.ipv4, "tcp-listen", port=8080)
        assert again["state"] == "already", again
    finally:
        closed = probes.probe(net, guest.ipv4, "tcp-close", port=8080)
    assert closed["state"] == "stopped" and closed["listening"] == "no", closed
    assert [net.get(url) for url in urls] == [None, None]
    assert "VMAPI-PAGE" in (net.get(f"http://{guest.ipv4}/") or "")  # port 80 stays


def test_the_guest_refuses_what_it_cannot_check(net, guest):
    with pytest.raises(probes.ProbeError, match="bad-src"):
        probes.probe(net, guest.ipv4, "ping4", src="198.51.100.999x", dst=GW4)
    with pytest.raises(probes.ProbeError, match="port-taken"):
        probes.probe(net, guest.ipv4, "tcp-listen", port=80)


#: a TCP server inside the test's namespace, tcp-connect's other end: accepts one
#: connection, reads until the guest's EOF, answers and closes
LISTENER = (
    "import socket, sys\n"
    "s = socket.create_server(('::', int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)\n"
    "print('ready', flush=True)\n"
    "c, _ = s.accept()\n"
    "while c.recv(100): pass\n"
    "c.sendall(b'VMAPI-NS-ANSWER')\n"
    "c.close()\n"
)


def test_a_connection_the_guest_opens_arrives(net, guest, seen):
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.namespace, sys.executable, "-c", LISTENER, "7000"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "ready"
        answer = probes.probe(net, guest.ipv4, "tcp-connect", dst=GW4, port=7000)
        assert answer["connected"] == "yes" and answer["got"] == "VMAPI-NS-ANSWER", answer
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()
        server.wait()
    assert seen.arrived(cap.tcp_to_port(7000, src=guest.ipv4)), seen.summary()
    # nothing listens on 7001: refused, yet the guest's SYN came (IPv6 this time)
    answer = probes.probe(net, guest.ipv4, "tcp-connect", dst=GW6, port=7001)
    assert answer["connected"] == "no", answer
    assert seen.arrived(cap.tcp_to_port(7001, src=guest.ipv6)), seen.summary()
