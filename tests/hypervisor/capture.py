"""What arrives in a test's network namespace: a capture on its veth end, and questions
about it.

The capture runs ``tcpdump -i IF -Q in`` inside the namespace only (``ip netns exec NS``;
the interface is checked to be in that namespace first), so it sees the frames that
reach the namespace from the bridge (the guests' traffic, whatever filters let through)
and none that the namespace sends itself. tcpdump writes a pcap file, packet by packet
(``-U --immediate-mode``), which ``tests/guest/frames.py`` reads and decodes.

Use, with ``net`` a ``GuestNetwork`` (tests/hypervisor/guest_net.py)::

    with capture(net) as seen:
        probe(net, guest_ip, "ping4", src="198.51.100.99", dst="198.51.100.1")
        assert seen.arrived(ping_from("198.51.100.99"))      # within 3 s
        assert not seen.arrived(ipv4_from("198.51.100.98"), within=1.0)

``arrived(match, within)`` waits until a frame matches (True) or ``within`` seconds have
passed (False): a test expecting nothing waits the whole time, so keep ``within`` short
there and call it after the probe answered (the guest had sent everything by then).
``matching(match)`` lists the frames that match, ``seen.summary()`` lists them all (for
assertion messages). Matches, each a ``Match`` (a description and a test of a
``Frame``; ``a & b`` is both, ``a | b`` either):

- ``from_mac(mac)``: any frame with that Ethernet source;
- ``ipv4_from(src, protocol=None)``, ``ipv6_from(src, protocol=None)``: any IP packet
  from ``src`` (of ``protocol``: ``PROTO_ICMP``, ``PROTO_UDP``, ...);
- ``ping_from(src, dst=None)``: an ICMP or ICMPv6 echo request from ``src``;
- ``arp_claiming(ip, mac=None)``: an ARP whose sender is ``ip`` (at ``mac``);
- ``neighbour_advert(target, mac=None)``: an NA for ``target`` (its link-layer option
  ``mac``);
- ``router_advert(mac=None)``: an RA (from the Ethernet source ``mac``);
- ``udp_from_port(port)``, ``dhcp_offer(yiaddr=None)``: UDP from ``port``; a DHCPOFFER
  (from port 67 to 68, of ``yiaddr``);
- ``tcp_to_port(port, src=None)``: a TCP segment to ``port``.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import unavailable
from tests.guest import frames as f
from tests.guest.frames import Frame

#: how long ``arrived`` waits by default (a frame the guest sent is there in far less)
WITHIN = 3.0
#: how long tcpdump may take to start listening
START = 15.0


def _ip(address: str) -> str:
    return str(ipaddress.ip_address(address))


@dataclass(frozen=True)
class Match:
    """A question about one frame: ``match(frame)``; its description names it in
    messages."""

    description: str
    test: Callable[[Frame], bool]

    def __call__(self, frame: Frame) -> bool:
        return self.test(frame)

    def __and__(self, other: Match) -> Match:
        return Match(f"{self.description} and {other.description}",
                     lambda frame: self.test(frame) and other.test(frame))  # fmt: skip

    def __or__(self, other: Match) -> Match:
        return Match(f"({self.description} or {other.description})",
                     lambda frame: self.test(frame) or other.test(frame))  # fmt: skip

    def __str__(self) -> str:
        return self.description


def from_mac(mac: str) -> Match:
    mac = mac.lower()
    return Match(f"a frame from {mac}", lambda fr: fr.src_mac == mac)


def ipv4_from(src: str, protocol: int | None = None) -> Match:
    src = _ip(src)
    return Match(f"an IPv4 packet from {src}" + (f" (protocol {protocol})" if protocol else ""),
                 lambda fr: fr.ethertype == f.ETH_IPV4 and fr.ip_src == src
                 and protocol in (None, fr.protocol))  # fmt: skip


def ipv6_from(src: str, protocol: int | None = None) -> Match:
    src = _ip(src)
    return Match(f"an IPv6 packet from {src}" + (f" (next header {protocol})" if protocol else ""),
                 lambda fr: fr.ethertype == f.ETH_IPV6 and fr.ip_src == src
                 and protocol in (None, fr.protocol))  # fmt: skip


def ping_from(src: str, dst: str | None = None) -> Match:
    """An echo request (ICMP 8, ICMPv6 128) from ``src`` (to ``dst``)."""
    src, dst = _ip(src), dst and _ip(dst)

    def test(fr: Frame) -> bool:
        echo = (fr.protocol, fr.icmp_type) in ((f.PROTO_ICMP, 8), (f.PROTO_ICMPV6, 128))
        return echo and fr.ip_src == src and dst in (None, fr.ip_dst)

    return Match(f"a ping from {src}" + (f" to {dst}" if dst else ""), test)


def arp_claiming(ip: str, mac: str | None = None) -> Match:
    """An ARP (request or reply) whose sender is ``ip``, at ``mac`` if given."""
    ip, mac = _ip(ip), mac and mac.lower()
    return Match(f"an ARP claiming {ip}" + (f" at {mac}" if mac else ""),
                 lambda fr: fr.ethertype == f.ETH_ARP and fr.arp_sender_ip == ip
                 and mac in (None, fr.arp_sender_mac))  # fmt: skip


def neighbour_advert(target: str, mac: str | None = None) -> Match:
    target, mac = _ip(target), mac and mac.lower()
    return Match(f"a neighbour advertisement for {target}" + (f" at {mac}" if mac else ""),
                 lambda fr: fr.icmp_type == f.ICMPV6_NA and fr.protocol == f.PROTO_ICMPV6
                 and fr.nd_target == target and mac in (None, fr.nd_ll))  # fmt: skip


def router_advert(mac: str | None = None) -> Match:
    mac = mac and mac.lower()
    return Match("a router advertisement" + (f" from {mac}" if mac else ""),
                 lambda fr: fr.protocol == f.PROTO_ICMPV6 and fr.icmp_type == f.ICMPV6_RA
                 and mac in (None, fr.src_mac))  # fmt: skip


def udp_from_port(port: int) -> Match:
    return Match(f"a UDP datagram from port {port}",
                 lambda fr: fr.protocol == f.PROTO_UDP and fr.sport == port)  # fmt: skip


def dhcp_offer(yiaddr: str | None = None) -> Match:
    yiaddr = yiaddr and _ip(yiaddr)
    return Match("a DHCPOFFER" + (f" of {yiaddr}" if yiaddr else ""),
                 lambda fr: fr.protocol == f.PROTO_UDP and fr.sport == f.DHCP_SERVER_PORT
                 and fr.dport == f.DHCP_CLIENT_PORT and fr.dhcp_type == f.DHCPOFFER
                 and yiaddr in (None, fr.dhcp_yiaddr))  # fmt: skip


def tcp_to_port(port: int, src: str | None = None) -> Match:
    src = src and _ip(src)
    return Match(f"a TCP segment to port {port}" + (f" from {src}" if src else ""),
                 lambda fr: fr.protocol == f.PROTO_TCP and fr.dport == port
                 and src in (None, fr.ip_src))  # fmt: skip


def namespace_veth(namespace: str) -> str:
    """The one veth interface inside ``namespace`` (guest_net.py puts one there)."""
    listed = subprocess.run(["ip", "-n", namespace, "-o", "link", "show", "type", "veth"],
                            capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    names = [line.split(":")[1].strip().split("@")[0] for line in listed.stdout.splitlines()]
    if len(names) != 1:
        raise RuntimeError(f"namespace {namespace} holds veths {names}, not one")
    return names[0]


class Capture:
    """A running tcpdump inside one namespace, and the frames it has written so far."""

    def __init__(self, namespace: str, interface: str, folder: Path):
        self.namespace, self.interface, self.folder = namespace, interface, folder
        self._final: list[Frame] | None = None  # once stopped: every frame, kept
        self.pcap, self.log = folder / "capture.pcap", folder / "tcpdump.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 (closed by stop)
        command = ["ip", "netns", "exec", namespace,
                   "tcpdump", "-i", interface, "-Q", "in", "-n", "-U", "--immediate-mode",
                   "-s", "2048", "-Z", "root", "-w", str(self.pcap)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + START
        while b"listening on" not in self.log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                said = self.log.read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"tcpdump did not start in {namespace}: {said}")
            time.sleep(0.05)

    def frames(self) -> list[Frame]:
        """Every frame that arrived so far (until stopped), decoded."""
        if self._final is not None:
            return list(self._final)
        if not self.pcap.exists():
            return []
        return [f.parse(raw) for raw in f.read_pcap(self.pcap.read_bytes())]

    def matching(self, match: Match) -> list[Frame]:
        return [frame for frame in self.frames() if match(frame)]

    def arrived(self, match: Match, within: float = WITHIN) -> bool:
        """Whether a frame matching ``match`` arrived, waiting up to ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            if self.matching(match):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def summary(self, limit: int = 60) -> str:
        found = self.frames()
        lines = [frame.summary() for frame in found[-limit:]]
        return f"{len(found)} frame(s) arrived in {self.namespace}, the last {len(lines)}:\n" + \
            "\n".join(lines)  # fmt: skip

    def stop(self) -> None:
        """Ends tcpdump, keeps the frames and removes its files (again: nothing)."""
        if self._final is not None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # tcpdump flushes and closes its file
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        self._final = self.frames()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def capture(net, interface: str | None = None) -> Iterator[Capture]:
    """A capture of what arrives on ``interface`` (default: the namespace's one veth) in
    the namespace of ``net`` (a GuestNetwork, or a namespace's name), for the ``with``
    block; the frames stay readable after it."""
    namespace = net if isinstance(net, str) else net.namespace
    if not namespace:
        raise ValueError("a capture runs inside a test's namespace only")
    if shutil.which("tcpdump") is None:
        unavailable("a capture needs tcpdump (Debian package tcpdump, in TEST_PACKAGES)")
    interface = interface or namespace_veth(namespace)
    subprocess.run(["ip", "-n", namespace, "link", "show", "dev", interface],
                   capture_output=True, check=True, timeout=30)  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="vmapi-capture-"))
    running = Capture(namespace, interface, folder)
    try:
        yield running
    finally:
        running.stop()
