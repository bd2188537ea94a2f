"""The frames the test guest sends raw, the decoding of captured frames, the questions
the capture answers and the probe's requests and answers (tests/guest/frames.py,
tests/hypervisor/capture.py, tests/hypervisor/probes.py), without a network.

The frames built here are also read by tcpdump from a pcap file (another decoder than
ours: it names each message and checks every checksum); tcpdump only reads a file here.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess

import pytest

from tests.conftest import unavailable
from tests.guest import console
from tests.guest import frames as f
from tests.hypervisor import capture as cap
from tests.hypervisor import probes

MAC = "52:54:00:12:34:56"
LINK_LOCAL = "fe80::5054:ff:fe12:3456"


def built() -> dict[str, bytes]:
    return {
        "na": f.neighbour_advert(MAC, "2001:db8:100::99"),
        "ra": f.router_advert(MAC, LINK_LOCAL),
        "offer": f.dhcp_offer(MAC, "198.51.100.2", "198.51.100.200"),
    }


def test_link_local_is_the_eui64_address_and_multicast_macs():
    assert f.link_local(MAC) == LINK_LOCAL
    assert f.link_local("02:00:00:00:00:01") == "fe80::ff:fe00:1"
    assert f.multicast_mac("ff02::1") == "33:33:00:00:00:01"
    assert f.multicast_mac("ff02::1:ff00:99") == "33:33:ff:00:00:99"
    with pytest.raises(ValueError):
        f.mac_bytes("52:54:00:12:34")


def test_checksum_is_rfc_1071():
    # RFC 1071's example: the one's complement sum 0xddf2, so the checksum 0x220d
    assert f.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert f.checksum(b"\x01") == ~0x0100 & 0xFFFF  # an odd byte is padded with zero


def _icmpv6_sum_ok(frame: bytes) -> bool:
    ipv6 = frame[14:]
    payload = ipv6[40:]
    pseudo = ipv6[8:40] + struct.pack("!I3xB", len(payload), f.PROTO_ICMPV6)
    return f.checksum(pseudo + payload) == 0


def test_a_neighbour_advertisement():
    frame = f.neighbour_advert(MAC, "2001:DB8:100::0099")
    seen = f.parse(frame)
    assert (seen.src_mac, seen.dst_mac, seen.ethertype) == (MAC, "33:33:00:00:00:01", f.ETH_IPV6)
    assert (seen.ip_src, seen.ip_dst, seen.hop_limit) == ("2001:db8:100::99", "ff02::1", 255)
    assert (seen.protocol, seen.icmp_type, seen.icmp_code) == (f.PROTO_ICMPV6, f.ICMPV6_NA, 0)
    assert seen.nd_target == "2001:db8:100::99" and seen.nd_ll == MAC
    assert seen.na_flags == 0x20  # override only: unsolicited, not a router
    assert _icmpv6_sum_ok(frame)
    assert len(frame) == 14 + 40 + 24 + 8
    assert f.parse(f.neighbour_advert(MAC, "2001:db8::1", override=False)).na_flags == 0
    other = f.neighbour_advert(MAC, "2001:db8:100::99", source=LINK_LOCAL)
    assert (f.parse(other).ip_src, f.parse(other).nd_target) == (LINK_LOCAL, "2001:db8:100::99")
    assert _icmpv6_sum_ok(other)


def test_a_router_advertisement():
    frame = f.router_advert(MAC, LINK_LOCAL)
    seen = f.parse(frame)
    assert (seen.ip_src, seen.ip_dst, seen.hop_limit) == (LINK_LOCAL, "ff02::1", 255)
    assert seen.icmp_type == f.ICMPV6_RA and seen.nd_ll == MAC and seen.src_mac == MAC
    assert _icmpv6_sum_ok(frame)
    icmp = frame[54:]
    assert struct.unpack("!H", icmp[6:8])[0] == 0  # router lifetime 0: no default route
    prefix = icmp[16 + 8 :]
    assert prefix[0] == 3 and prefix[2] == 64 and prefix[3] == 0  # no L, no A flag
    assert ipaddress.IPv6Address(prefix[16:32]) == ipaddress.IPv6Address("2001:db8:ffff::")
    live = f.router_advert(MAC, LINK_LOCAL, prefix="2001:db8:7::/64", router_lifetime=1800,
                           on_link=True, autonomous=True, valid=600, preferred=300)  # fmt: skip
    icmp = live[54:]
    assert struct.unpack("!H", icmp[6:8])[0] == 1800 and icmp[24 + 3] == 0xC0
    assert struct.unpack("!II", icmp[24 + 4 : 24 + 12]) == (600, 300)
    assert _icmpv6_sum_ok(live)


def test_a_dhcp_offer():
    frame = f.dhcp_offer(MAC, "198.51.100.2", "198.51.100.200", client="52:54:00:aa:bb:cc")
    seen = f.parse(frame)
    assert (seen.src_mac, seen.dst_mac) == (MAC, f.BROADCAST_MAC)
    assert (seen.ip_src, seen.ip_dst, seen.protocol) == ("198.51.100.2", "255.255.255.255", 17)
    assert (seen.sport, seen.dport) == (67, 68)
    assert (seen.dhcp_type, seen.dhcp_yiaddr) == (f.DHCPOFFER, "198.51.100.200")
    ip = frame[14:34]
    assert f.checksum(ip) == 0  # the header's checksum is right
    udp = frame[34:]
    pseudo = ip[12:20] + struct.pack("!xBH", 17, len(udp))
    assert f.checksum(pseudo + udp) == 0
    bootp = udp[8:]
    assert len(bootp) >= f.BOOTP_MIN and bootp[0] == 2  # a reply
    assert f.mac_text(bootp[28:34]) == "52:54:00:aa:bb:cc"
    assert struct.unpack("!H", bootp[10:12])[0] == 0x8000  # broadcast


def test_parse_arp_tagged_and_short_frames():
    arp = f.ethernet(f.BROADCAST_MAC, MAC, f.ETH_ARP,
                     bytes.fromhex("0001080006040001") + f.mac_bytes(MAC) + bytes([198, 51, 100, 9])
                     + bytes(6) + bytes([198, 51, 100, 1]))  # fmt: skip
    seen = f.parse(arp)
    assert (seen.arp_op, seen.arp_sender_mac, seen.arp_sender_ip, seen.arp_target_ip) == \
        (1, MAC, "198.51.100.9", "198.51.100.1")  # fmt: skip
    tagged = arp[:12] + b"\x81\x00\x00\x05" + arp[12:]
    assert f.parse(tagged).arp_sender_ip == "198.51.100.9"
    short = f.parse(arp[:20])
    assert short.ethertype == f.ETH_ARP and short.arp_op is None
    with pytest.raises(ValueError):
        f.parse(b"\0" * 13)
    tcp = f.ethernet(MAC, MAC, f.ETH_IPV4,
                     f.ipv4_packet("198.51.100.9", "198.51.100.1", f.PROTO_TCP,
                                   struct.pack("!HH", 40000, 8080) + bytes(16)))  # fmt: skip
    seen = f.parse(tcp)
    assert (seen.protocol, seen.sport, seen.dport) == (f.PROTO_TCP, 40000, 8080)
    assert "dport=8080" in seen.summary() and "198.51.100.9 > 198.51.100.1" in seen.summary()


def test_pcap_round_trip_and_a_record_half_written():
    raws = list(built().values())
    data = f.write_pcap(raws)
    assert f.read_pcap(data) == raws
    assert f.read_pcap(data[:-5]) == raws[:-1]  # tcpdump still writing the last one
    assert f.read_pcap(data[:24]) == [] and f.read_pcap(b"") == []
    big_endian = struct.pack(">IHHiIII", f.PCAP_MAGIC_NS, 2, 4, 0, 0, 65535, 1) + \
        struct.pack(">IIII", 1, 2, 3, 3) + b"abc"  # fmt: skip
    assert f.read_pcap(big_endian) == [b"abc"]
    with pytest.raises(ValueError):
        f.read_pcap(b"\0" * 24)


def test_tcpdump_reads_the_frames_as_what_they_claim_to_be(tmp_path):
    if shutil.which("tcpdump") is None:
        unavailable("tcpdump (Debian package tcpdump) checks the frames")
    path = tmp_path / "built.pcap"
    path.write_bytes(f.write_pcap(list(built().values())))
    result = subprocess.run(["tcpdump", "-r", str(path), "-n", "-e", "-vv"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "neighbor advertisement" in out and "tgt is 2001:db8:100::99, Flags [override]" in out
    assert "destination link-address option (2), length 8 (1): 52:54:00:12:34:56" in out
    assert "router advertisement" in out and "router lifetime 0s" in out
    assert "prefix info option (3), length 32 (4): 2001:db8:ffff::/64, Flags [none]" in out
    assert "198.51.100.2.67 > 255.255.255.255.68" in out and "BOOTP/DHCP, Reply" in out
    assert "DHCP-Message (53), length 1: Offer" in out and "Your-IP 198.51.100.200" in out
    assert out.count("sum ok") == 3 and "bad" not in out and "wrong" not in out, out


def test_the_capture_questions():
    frames = {name: f.parse(raw) for name, raw in built().items()}
    na, ra, offer = frames["na"], frames["ra"], frames["offer"]
    assert cap.neighbour_advert("2001:db8:100::0099")(na)
    assert cap.neighbour_advert("2001:db8:100::99", MAC.upper())(na)
    assert not cap.neighbour_advert("2001:db8:100::99", "52:54:00:00:00:01")(na)
    assert not cap.neighbour_advert("2001:db8:100::98")(na)
    assert cap.router_advert()(ra) and cap.router_advert(MAC)(ra) and not cap.router_advert()(na)
    assert cap.ipv6_from(LINK_LOCAL, f.PROTO_ICMPV6)(ra) and not cap.ipv6_from(LINK_LOCAL, 17)(ra)
    assert cap.dhcp_offer()(offer) and cap.dhcp_offer("198.51.100.200")(offer)
    assert not cap.dhcp_offer("198.51.100.201")(offer)
    assert cap.udp_from_port(67)(offer) and not cap.udp_from_port(68)(offer)
    assert cap.ipv4_from("198.51.100.2")(offer) and not cap.ipv4_from("198.51.100.2")(na)
    assert all(cap.from_mac(MAC)(x) for x in frames.values())
    both = cap.from_mac(MAC) & cap.router_advert()
    assert (
        both(ra) and not both(na) and str(both) == f"a frame from {MAC} and a router advertisement"
    )
    either = cap.router_advert() | cap.dhcp_offer()
    assert either(ra) and either(offer) and not either(na)
    assert str(either) == "(a router advertisement or a DHCPOFFER)"
    echo4 = f.parse(f.ethernet(MAC, MAC, f.ETH_IPV4, f.ipv4_packet(
        "198.51.100.99", "198.51.100.1", f.PROTO_ICMP, bytes([8, 0]) + bytes(6))))  # fmt: skip
    reply4 = f.parse(f.ethernet(MAC, MAC, f.ETH_IPV4, f.ipv4_packet(
        "198.51.100.99", "198.51.100.1", f.PROTO_ICMP, bytes([0, 0]) + bytes(6))))  # fmt: skip
    echo6 = f.parse(f.ethernet(MAC, MAC, f.ETH_IPV6, f.ipv6_packet(
        "2001:db8:77::99", "2001:db8:100::1", f.PROTO_ICMPV6, bytes([128, 0]) + bytes(6), 64)))  # fmt: skip
    assert cap.ping_from("198.51.100.99")(echo4) and not cap.ping_from("198.51.100.99")(reply4)
    assert cap.ping_from("198.51.100.99", "198.51.100.1")(echo4)
    assert not cap.ping_from("198.51.100.99", "198.51.100.2")(echo4)
    assert cap.ping_from("2001:db8:77:0::99")(echo6) and not cap.ping_from("198.51.100.99")(echo6)
    arp = f.parse(f.ethernet(f.BROADCAST_MAC, MAC, f.ETH_ARP, bytes.fromhex("0001080006040002")
                             + f.mac_bytes(MAC) + bytes([198, 51, 100, 99]) + bytes(6)
                             + bytes([198, 51, 100, 99])))  # fmt: skip
    assert cap.arp_claiming("198.51.100.99")(arp) and cap.arp_claiming("198.51.100.99", MAC)(arp)
    assert not cap.arp_claiming("198.51.100.98")(arp)
    assert not cap.arp_claiming("198.51.100.99", "52:54:00:00:00:01")(arp)


class FakeNet:
    """Stands for a GuestNetwork: the URL asked for, a canned page (a fault the real
    guest does not produce on demand: no answer, a refusal)."""

    def __init__(self, *pages: str | None):
        self.pages, self.urls = list(pages), []

    def get(self, url: str, timeout: int = 3) -> str | None:
        self.urls.append(url)
        return self.pages.pop(0)


INFO = "VMAPI-PROBE action=info dev=eth0 mac=52:54:00:12:34:56 addresses=198.51.100.2/24,2001:db8:100::2/64,fe80::5054:ff:fe12:3456/64 tentative=0 settled=yes\n"


def test_probe_requests_carry_canonical_values():
    url = probes.probe_url("2001:DB8:100::0002", "ping6", src="2001:db8:100:0::99", dst=None)
    assert url == "http://[2001:db8:100::2]/cgi-bin/probe?action=ping6&src=2001:db8:100::99"
    url = probes.probe_url("198.51.100.2", "mac", new="52:54:00:AB:CD:EF", dst="198.51.100.1",
                           count=3)  # fmt: skip
    assert url.endswith("?action=mac&new=52:54:00:ab:cd:ef&dst=198.51.100.1&count=3")
    net = FakeNet("Content-Type: x\n\nVMAPI-PROBE action=ping4 src=- rc=0 received=2\n")
    answer = probes.probe(net, "198.51.100.2", "ping4", dst="198.51.100.1")
    assert answer.ok and answer["received"] == "2" and answer.action == "ping4"
    assert net.urls == ["http://198.51.100.2/cgi-bin/probe?action=ping4&dst=198.51.100.1"]


def test_frame_probes_are_built_from_what_the_guest_says():
    net = FakeNet(INFO, "VMAPI-PROBE action=na bytes=86 sent=2 rc=0\n")
    answer = probes.probe(net, "198.51.100.2", "na", target="2001:db8:100::99")
    assert answer.ok
    frame = bytes.fromhex(net.urls[1].split("frame=")[1])
    assert frame == f.neighbour_advert(MAC, "2001:db8:100::99")
    net = FakeNet(
        INFO, "VMAPI-PROBE action=ra rc=0\n", INFO, "VMAPI-PROBE action=dhcp-offer rc=0\n"
    )
    probes.probe(net, "198.51.100.2", "ra", count=1)
    assert "&count=1&" in net.urls[1]
    assert bytes.fromhex(net.urls[1].split("frame=")[1]) == f.router_advert(MAC, LINK_LOCAL)
    probes.probe(net, "198.51.100.2", "dhcp-offer")
    offer = f.parse(bytes.fromhex(net.urls[3].split("frame=")[1]))
    assert (offer.ip_src, offer.dhcp_yiaddr, offer.src_mac) == (
        "198.51.100.2",
        "198.51.100.254",
        MAC,
    )
    about = probes.info(FakeNet(INFO), "198.51.100.2")
    assert (about.ipv4, about.ipv6, about.link_local) == (
        ["198.51.100.2"],
        ["2001:db8:100::2"],
        LINK_LOCAL,
    )
    assert probes.GuestInfo("eth0", MAC).link_local == LINK_LOCAL  # none listed: derived


def test_ready_means_settled(monkeypatch):
    monkeypatch.setattr(probes.time, "sleep", lambda _: None)
    early = INFO.replace("tentative=0 settled=yes", "tentative=1 settled=no")
    net = FakeNet(None, early, INFO)
    assert probes.wait_ready(net, "198.51.100.2").settled and len(net.urls) == 3
    with pytest.raises(probes.ProbeError, match="has not settled"):
        probes.wait_ready(FakeNet(early), "198.51.100.2", within=0)


def test_probe_failures_are_errors():
    with pytest.raises(probes.ProbeError, match="did not answer"):
        probes.probe(FakeNet(None), "198.51.100.2", "info")
    with pytest.raises(probes.ProbeError, match=r"refused .* bad-port"):
        probes.probe(FakeNet("VMAPI-PROBE action=tcp-listen result=refused reason=bad-port\n"),
                     "198.51.100.2", "tcp-listen", port=8080)  # fmt: skip
    with pytest.raises(probes.ProbeError, match="no VMAPI-PROBE line"):
        probes.probe(FakeNet("<html>404</html>"), "198.51.100.2", "info")
    with pytest.raises(ValueError, match="unknown probe action"):
        probes.probe(FakeNet(), "198.51.100.2", "reboot")
    assert not probes.parse_answer("VMAPI-PROBE action=ping4 rc=1 received=0").ok


def test_the_console_shows_each_probe():
    text = "\r\n".join([
        "VMAPI-GUEST root=vda sectors=2097152 boot_id=abc",
        "VMAPI-PROBES ready",
        "VMAPI-PROBE action=garp dev=eth0 ip=198.51.100.99 added=yes sent=2 rc=0",
        "VMAPI-PROBE action=tcp-listen port=8080 state=started listening=yes",
    ])  # fmt: skip
    [boot] = console.boots(text)
    assert boot.probes_ready
    assert [p["action"] for p in boot.probes] == ["garp", "tcp-listen"]
    assert boot.probes[0]["ip"] == "198.51.100.99"
