"""Ethernet frames: the few the test guest sends raw, and reading any frame back.

Building (what busybox in the guest cannot send; the guest's /bin/vmapi-sendframe writes
the bytes as they are, see tests/hypervisor/probes.py):

- ``neighbour_advert(mac, target)``: an unsolicited neighbour advertisement (ICMPv6 136)
  from ``target`` to ff02::1, override flag set, the target link-layer option ``mac``;
- ``router_advert(mac, source, prefix=...)``: a router advertisement (ICMPv6 134) from the
  link-local ``source`` to ff02::1 with a source link-layer and a prefix option. By
  default harmless to whoever receives it: router lifetime 0 (no default route), prefix
  flags clear (no address, no on-link route);
- ``dhcp_offer(mac, server, offered, client)``: a DHCPOFFER broadcast from UDP port 67 to
  68, as a rogue DHCP server would send it.

Reading: ``parse(frame)`` decodes Ethernet, ARP, IPv4 and IPv6 with ICMP, ICMPv6 (the
neighbour discovery target), UDP and TCP ports into a ``Frame``; ``read_pcap(data)`` reads
the records of a pcap file (tcpdump -w), a trailing half-written record left out;
``write_pcap(frames)`` writes one (the unit tests hand it to tcpdump to check the frames
built here with another decoder).

Addresses are strings as ``ipaddress`` writes them (IPv6 compressed, lower case) and MACs
as ``aa:bb:cc:dd:ee:ff``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_IPV4, ETH_ARP, ETH_IPV6 = 0x0800, 0x0806, 0x86DD
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6 = 1, 6, 17, 58
ICMPV6_RS, ICMPV6_RA, ICMPV6_NS, ICMPV6_NA = 133, 134, 135, 136
ALL_NODES = "ff02::1"
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
DHCP_SERVER_PORT, DHCP_CLIENT_PORT = 67, 68
DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCPOFFER = 2
#: a BOOTP message is at least this long (RFC 951; many clients drop shorter ones)
BOOTP_MIN = 300
PCAP_MAGIC_US, PCAP_MAGIC_NS = 0xA1B2C3D4, 0xA1B23C4D
LINKTYPE_ETHERNET = 1


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def multicast_mac(ipv6: str) -> str:
    """The Ethernet address of an IPv6 multicast group: 33:33 and its last 32 bits."""
    return mac_text(b"\x33\x33" + ipaddress.IPv6Address(ipv6).packed[-4:])


def link_local(mac: str) -> str:
    """The EUI-64 link-local address a Linux NIC with ``mac`` gets by default."""
    raw = bytearray(mac_bytes(mac))
    raw[0] ^= 0x02
    iid = bytes(raw[:3]) + b"\xff\xfe" + bytes(raw[3:])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + iid))


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


def ipv6_packet(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit) + \
        ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload  # fmt: skip


def icmpv6(src: str, dst: str, body: bytes) -> bytes:
    """``body`` (type, code, a zero checksum, the rest) with its checksum over the IPv6
    pseudo-header filled in."""
    pseudo = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + \
        struct.pack("!I3xB", len(body), PROTO_ICMPV6)  # fmt: skip
    total = checksum(pseudo + body)
    return body[:2] + struct.pack("!H", total) + body[4:]


def neighbour_advert(
    mac: str, target: str, override: bool = True, solicited: bool = False,
    source: str | None = None,
) -> bytes:  # fmt: skip
    """An unsolicited neighbour advertisement: "``target`` is at ``mac``", from ``target``
    (or ``source``) to all nodes, hop limit 255 (RFC 4861 7.2.6)."""
    flags = (0x20000000 if override else 0) | (0x40000000 if solicited else 0)
    option = struct.pack("!BB", 2, 1) + mac_bytes(mac)  # target link-layer address
    body = struct.pack("!BBHI", ICMPV6_NA, 0, 0, flags) + ipaddress.IPv6Address(target).packed
    source = source or target
    message = icmpv6(source, ALL_NODES, body + option)
    packet = ipv6_packet(source, ALL_NODES, PROTO_ICMPV6, message, hop_limit=255)
    return ethernet(multicast_mac(ALL_NODES), mac, ETH_IPV6, packet)


def router_advert(mac: str, source: str, prefix: str = "2001:db8:ffff::/64",
                  router_lifetime: int = 0, on_link: bool = False, autonomous: bool = False,
                  valid: int = 0, preferred: int = 0) -> bytes:  # fmt: skip
    """A router advertisement from ``source`` (the sender's link-local address) to all
    nodes: a source link-layer option (``mac``) and one prefix option. The defaults make
    it change nothing on a receiver."""
    network = ipaddress.IPv6Network(prefix)
    body = struct.pack("!BBHBBHII", ICMPV6_RA, 0, 0, 64, 0, router_lifetime, 0, 0)
    source_ll = struct.pack("!BB", 1, 1) + mac_bytes(mac)
    flags = (0x80 if on_link else 0) | (0x40 if autonomous else 0)
    prefix_info = struct.pack("!BBBBII4x", 3, 4, network.prefixlen, flags, valid, preferred) + \
        network.network_address.packed  # fmt: skip
    message = icmpv6(source, ALL_NODES, body + source_ll + prefix_info)
    packet = ipv6_packet(source, ALL_NODES, PROTO_ICMPV6, message, hop_limit=255)
    return ethernet(multicast_mac(ALL_NODES), mac, ETH_IPV6, packet)


def ipv4_packet(src: str, dst: str, protocol: int, payload: bytes, ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, ttl, protocol, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)  # fmt: skip
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def udp4(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    """A UDP datagram with its checksum over the IPv4 pseudo-header."""
    length = 8 + len(data)
    pseudo = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + \
        struct.pack("!xBH", PROTO_UDP, length)  # fmt: skip
    total = checksum(pseudo + struct.pack("!HHHH", sport, dport, length, 0) + data) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, total) + data


def dhcp_offer(mac: str, server: str, offered: str, client: str = "52:54:00:00:00:99",
               netmask: str = "255.255.255.0", router: str | None = None,
               lease: int = 3600, xid: int = 0x766D6170) -> bytes:  # fmt: skip
    """A DHCPOFFER of ``offered`` to the client ``client``, from a server at ``server``
    (its IPv4 address) and ``mac``: broadcast, UDP 67 -> 68 (RFC 2131)."""
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0x8000,
                        bytes(4), ipaddress.IPv4Address(offered).packed,
                        ipaddress.IPv4Address(server).packed, bytes(4),
                        mac_bytes(client), b"", b"")  # fmt: skip
    options = bytes([53, 1, DHCPOFFER]) + bytes([54, 4]) + ipaddress.IPv4Address(server).packed
    options += bytes([51, 4]) + struct.pack("!I", lease)
    options += bytes([1, 4]) + ipaddress.IPv4Address(netmask).packed
    options += bytes([3, 4]) + ipaddress.IPv4Address(router or server).packed + b"\xff"
    message = bootp + DHCP_MAGIC + options
    message += bytes(max(0, BOOTP_MIN - len(message)))
    datagram = udp4(server, "255.255.255.255", DHCP_SERVER_PORT, DHCP_CLIENT_PORT, message)
    packet = ipv4_packet(server, "255.255.255.255", PROTO_UDP, datagram)
    return ethernet(BROADCAST_MAC, mac, ETH_IPV4, packet)


@dataclass(frozen=True)
class Frame:
    """One Ethernet frame, decoded as far as the tests need. Fields a frame does not have
    are None."""

    raw: bytes
    src_mac: str
    dst_mac: str
    ethertype: int
    ip_src: str | None = None  # IPv4 or IPv6
    ip_dst: str | None = None
    protocol: int | None = None  # IP protocol / IPv6 next header
    hop_limit: int | None = None  # TTL / hop limit
    sport: int | None = None  # UDP, TCP
    dport: int | None = None
    icmp_type: int | None = None  # ICMP or ICMPv6
    icmp_code: int | None = None
    nd_target: str | None = None  # ICMPv6 NS/NA
    na_flags: int | None = None  # NA: 0x80 router, 0x40 solicited, 0x20 override
    nd_ll: str | None = None  # the NA's target / the RA's or NS's source link-layer option
    arp_op: int | None = None  # 1 request, 2 reply
    arp_sender_mac: str | None = None
    arp_sender_ip: str | None = None
    arp_target_ip: str | None = None
    dhcp_type: int | None = None  # the DHCP message type option (2: offer)
    dhcp_yiaddr: str | None = None

    def summary(self) -> str:
        what = {ETH_ARP: "arp", ETH_IPV4: "ipv4", ETH_IPV6: "ipv6"}.get(self.ethertype,
                                                                        f"0x{self.ethertype:04x}")  # fmt: skip
        parts = [f"{self.src_mac} > {self.dst_mac} {what}"]
        if self.arp_op is not None:
            parts.append(f"op={self.arp_op} sender={self.arp_sender_ip}/{self.arp_sender_mac}"
                         f" target={self.arp_target_ip}")  # fmt: skip
        if self.ip_src is not None:
            parts.append(f"{self.ip_src} > {self.ip_dst} proto={self.protocol}")
        for name in ("sport", "dport", "icmp_type", "nd_target", "nd_ll", "dhcp_type"):
            if (value := getattr(self, name)) is not None:
                parts.append(f"{name}={value}")
        return " ".join(parts)


def _nd_options(data: bytes, wanted: int) -> str | None:
    """The link-layer address of the first option of type ``wanted`` in ``data``."""
    while len(data) >= 8 and data[1]:
        if data[0] == wanted and data[1] == 1:
            return mac_text(data[2:8])
        data = data[data[1] * 8 :]
    return None


def _transport(fields: dict, protocol: int, data: bytes) -> None:
    if protocol in (PROTO_UDP, PROTO_TCP) and len(data) >= 4:
        fields["sport"], fields["dport"] = struct.unpack("!HH", data[:4])
        if protocol == PROTO_UDP and fields["sport"] in (DHCP_SERVER_PORT, DHCP_CLIENT_PORT):
            bootp = data[8:]
            if len(bootp) >= 240 and bootp[236:240] == DHCP_MAGIC:
                fields["dhcp_yiaddr"] = str(ipaddress.IPv4Address(bootp[16:20]))
                options = bootp[240:]
                while len(options) >= 2 and options[0] != 0xFF:
                    if options[0] == 0:
                        options = options[1:]
                        continue
                    if options[0] == 53 and options[1] == 1 and len(options) >= 3:
                        fields["dhcp_type"] = options[2]
                    options = options[2 + options[1] :]
    elif protocol in (PROTO_ICMP, PROTO_ICMPV6) and len(data) >= 4:
        fields["icmp_type"], fields["icmp_code"] = data[0], data[1]
        if protocol == PROTO_ICMPV6 and data[0] in (ICMPV6_NS, ICMPV6_NA) and len(data) >= 24:
            fields["nd_target"] = str(ipaddress.IPv6Address(data[8:24]))
            if data[0] == ICMPV6_NA:
                fields["na_flags"] = data[4]
            fields["nd_ll"] = _nd_options(data[24:], 2 if data[0] == ICMPV6_NA else 1)
        elif protocol == PROTO_ICMPV6 and data[0] in (ICMPV6_RS, ICMPV6_RA):
            fields["nd_ll"] = _nd_options(data[16:] if data[0] == ICMPV6_RA else data[8:], 1)


def parse(raw: bytes) -> Frame:
    """Decode one Ethernet frame (one 802.1Q tag is stepped over); a frame too short for
    a part keeps that part's fields None."""
    if len(raw) < 14:
        raise ValueError(f"a frame of {len(raw)} bytes")
    fields: dict = {"raw": raw, "dst_mac": mac_text(raw[0:6]), "src_mac": mac_text(raw[6:12])}
    ethertype, data = struct.unpack("!H", raw[12:14])[0], raw[14:]
    if ethertype == 0x8100 and len(data) >= 4:
        ethertype, data = struct.unpack("!H", data[2:4])[0], data[4:]
    fields["ethertype"] = ethertype
    if ethertype == ETH_ARP and len(data) >= 28:
        fields["arp_op"] = struct.unpack("!H", data[6:8])[0]
        fields["arp_sender_mac"] = mac_text(data[8:14])
        fields["arp_sender_ip"] = str(ipaddress.IPv4Address(data[14:18]))
        fields["arp_target_ip"] = str(ipaddress.IPv4Address(data[24:28]))
    elif ethertype == ETH_IPV4 and len(data) >= 20:
        header = (data[0] & 0x0F) * 4
        fields["ip_src"] = str(ipaddress.IPv4Address(data[12:16]))
        fields["ip_dst"] = str(ipaddress.IPv4Address(data[16:20]))
        fields["protocol"], fields["hop_limit"] = data[9], data[8]
        _transport(fields, data[9], data[header:])
    elif ethertype == ETH_IPV6 and len(data) >= 40:
        fields["ip_src"] = str(ipaddress.IPv6Address(data[8:24]))
        fields["ip_dst"] = str(ipaddress.IPv6Address(data[24:40]))
        fields["protocol"], fields["hop_limit"] = data[6], data[7]
        _transport(fields, data[6], data[40:])  # (no extension headers: none are sent here)
    return Frame(**fields)


def read_pcap(data: bytes) -> list[bytes]:
    """The frames of a pcap file (Ethernet link type), in order; a record not yet fully
    written (a capture still running) is left out."""
    if len(data) < 24:
        return []
    for order in ("<", ">"):
        magic, _, _, _, _, _, linktype = struct.unpack(f"{order}IHHiIII", data[:24])
        if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            break
    else:
        raise ValueError("not a pcap file")
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"pcap link type {linktype}, not Ethernet")
    frames, offset = [], 24
    while offset + 16 <= len(data):
        _, _, caplen, _ = struct.unpack(f"{order}IIII", data[offset : offset + 16])
        if offset + 16 + caplen > len(data):
            break
        frames.append(data[offset + 16 : offset + 16 + caplen])
        offset += 16 + caplen
    return frames


def write_pcap(frames: list[bytes]) -> bytes:
    out = struct.pack("<IHHiIII", PCAP_MAGIC_US, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET)
    for i, frame in enumerate(frames):
        out += struct.pack("<IIII", 1_700_000_000 + i, 0, len(frame), len(frame)) + frame
    return out
