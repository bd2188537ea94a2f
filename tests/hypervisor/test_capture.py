"""The namespace capture (tests/hypervisor/capture.py) on the test guests' network, with
no guest: a second namespace of the test's own stands in for one.

The stand-in's veth joins the bridge of ``guest_network`` as a guest's tap would; from it
the test sends frames (Python's AF_PACKET, inside that namespace only) and a UDP datagram
through its own IP stack. The capture in the gateways' namespace must see each one, and
none of what the gateways' namespace sends itself (its ICMP errors, its ARP).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.guest import frames
from tests.hypervisor import capture as cap
from tests.hypervisor.guest_net import GuestNetwork, guest_network, ip

pytestmark = [pytest.mark.hypervisor]

GATEWAYS = ("198.51.100.1/24", "2001:db8:100::1/64")
ADDRESS = "198.51.100.50"
MAC = "52:54:00:5e:00:50"

SEND_FRAMES = """
import socket, sys
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
    s.bind((sys.argv[1], 0))
    for frame in sys.argv[2:]:
        s.send(bytes.fromhex(frame))
"""
SEND_UDP = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.sendto(b"vmapi", (sys.argv[1], 9))
"""


@dataclass(frozen=True)
class StandIn:
    net: GuestNetwork
    namespace: str
    dev: str

    def run(self, *command: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.namespace, *command], check=True,
                       capture_output=True, timeout=60)  # fmt: skip

    def send(self, *raw: bytes) -> None:
        self.run(sys.executable, "-c", SEND_FRAMES, self.dev, *(r.hex() for r in raw))


@pytest.fixture(scope="module")
def lan() -> Iterator[StandIn]:
    tag = uuid.uuid4().hex[:6]
    namespace, outside, inside = f"vmapi-fg-{tag}", f"vmt{tag}g", f"vmt{tag}f"
    with guest_network(GATEWAYS) as net:
        try:
            ip("netns", "add", namespace)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{outside}.disable_ipv6=1"], check=True)
            ip("link", "set", inside, "netns", namespace)
            ip("link", "set", outside, "master", net.bridge)
            ip("link", "set", outside, "up")
            ip("-n", namespace, "link", "set", inside, "address", MAC)
            ip("-n", namespace, "addr", "add", f"{ADDRESS}/24", "dev", inside)
            ip("-n", namespace, "link", "set", inside, "up")
            yield StandIn(net, namespace, inside)
        finally:
            ip("link", "del", outside, check=False)
            ip("netns", "del", namespace, check=False)


def test_what_arrives_from_the_bridge_is_seen_and_told_apart(lan):
    own = [
        frames.neighbour_advert(MAC, "2001:db8:100::99"),
        frames.router_advert(MAC, frames.link_local(MAC)),
        frames.dhcp_offer(MAC, ADDRESS, "198.51.100.254"),
        # a gratuitous ARP for another address, from another MAC
        frames.ethernet(
            frames.BROADCAST_MAC,
            "52:54:00:5e:00:99",
            frames.ETH_ARP,
            bytes.fromhex("0001080006040002")
            + frames.mac_bytes("52:54:00:5e:00:99")
            + bytes([198, 51, 100, 99])
            + bytes(6)
            + bytes([198, 51, 100, 99]),
        ),
    ]
    with cap.capture(lan.net) as seen:
        assert seen.interface == cap.namespace_veth(lan.net.namespace)
        lan.send(*own)
        lan.run(sys.executable, "-c", SEND_UDP, "198.51.100.1")
        assert seen.arrived(cap.neighbour_advert("2001:db8:100::99", MAC)), seen.summary()
        assert seen.arrived(cap.router_advert(MAC)), seen.summary()
        assert seen.arrived(cap.dhcp_offer("198.51.100.254") & cap.from_mac(MAC)), seen.summary()
        assert seen.arrived(cap.udp_from_port(67))
        assert seen.arrived(cap.arp_claiming("198.51.100.99", "52:54:00:5e:00:99"))
        assert seen.arrived(cap.from_mac("52:54:00:5e:00:99"))
        # through the stand-in's IP stack: its ARP for the gateway, then the datagram
        assert seen.arrived(cap.ipv4_from(ADDRESS, frames.PROTO_UDP)), seen.summary()
        assert seen.arrived(cap.arp_claiming(ADDRESS, MAC))
        # what did not happen is not seen (this waits the whole time)
        assert not seen.arrived(cap.ipv4_from("198.51.100.99"), within=0.5)
        assert not seen.arrived(cap.neighbour_advert("2001:db8:100::98"), within=0.1)
        assert not seen.arrived(cap.ping_from(ADDRESS), within=0.1)
        assert not seen.arrived(cap.tcp_to_port(80), within=0.1)
    # only what came in: the gateways' answers (port unreachable, ARP) went out, unseen
    gateway_mac = subprocess.run(
        ["ip", "-n", lan.net.namespace, "-o", "link", "show", "dev", seen.interface],
        capture_output=True, text=True, check=True,
    ).stdout.split("link/ether ")[1].split()[0]  # fmt: skip
    kept = seen.frames()
    assert kept and all(frame.src_mac != gateway_mac for frame in kept), seen.summary()
    assert not seen.folder.exists()  # the capture's files went with it; the frames stay
    by_raw = {frame.raw for frame in kept}
    assert all(raw in by_raw for raw in own)  # each frame arrived exactly as sent


def test_a_capture_listens_only_inside_a_namespace(lan):
    with pytest.raises(ValueError):
        cap.capture("").__enter__()
    # an interface of the root namespace (the bridge) is not in the test's namespace
    with pytest.raises(subprocess.CalledProcessError), cap.capture(lan.net, lan.net.bridge):
        pass
