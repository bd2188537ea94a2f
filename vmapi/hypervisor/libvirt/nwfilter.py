"""Network filters (libvirt's nwfilter): the guard and the security groups as filter XML.

What the filters are is decided here, for libvirt 9.0 as measured on these machines
(../shared/recipes/network-filters.md): the stock ``clean-traffic`` is IPv4-only and comes
with a separate package, so vmapi defines filters of its own on every node, all named
after the installation:

- ``<prefix>-guard-*``: anti-spoofing in the bridge layer (ebtables). The guest may send
  only from its MAC (``mac``), from its IPv4 addresses (``ipv4``; ``noipv4`` when it has
  none), from its IPv6 addresses and its link-local one (``ipv6``), ARP only for its own
  IPv4 (``arp``/``noarp``); no DHCP server replies (UDP from port 67 or 547), no router
  advertisements or redirects, and no other layer-2 protocol (``l2``).
- ``<prefix>-sg-<id>``: a security group's allow rules in the IP layer (iptables,
  stateful: connection tracking lets the answers back).
- ``<prefix>-nic-<id>``: one per interface, what its NIC references: the guard's parts
  that fit it, its groups, and the policy around them (with groups, ingress dropped
  unless allowed; egress dropped unless allowed when a group has egress rules). ICMPv6
  neighbour discovery passes outside connection tracking, which does not follow it.

Parameters come from the NIC's ``<filterref>``: ``IP`` and ``IPV6`` (repeated for several
addresses), ``MAC`` from its ``<mac>``, and ``CTRL_IP_LEARNING=none`` so that libvirt never
learns an address from the guest's own traffic. A filter's UUID is derived from its name,
so redefining it replaces it (libvirt refuses another UUID under an existing name).

Known limit (libvirt's filters cannot read inside ICMPv6 payloads): a neighbour
advertisement is checked by its source address, not by the target address it announces.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field

import libvirt

from vmapi.hypervisor.errors import NoNetworkFilters, NotSupported
from vmapi.hypervisor.libvirt.calls import LibvirtCalls
from vmapi.hypervisor.libvirt.config import filterref
from vmapi.hypervisor.specs import (
    IN,
    FilterRule,
    GroupFilter,
    GuardFilters,
    NetworkFilter,
    NicSpec,
    PortFilter,
)

#: UUIDs of vmapi's filters: uuid5 of this namespace and the filter's name.
UUID_NAMESPACE = uuid.UUID("4f6c7a2e-3b1d-5e8a-9c0f-2a7d6b5e4c31")
#: libvirt's default rule priority (what it writes for a rule given without one).
DEFAULT_PRIORITY = 500
#: ICMPv6 neighbour discovery, per direction: router solicitation out, advertisement in,
#: neighbour solicitation and advertisement both ways. Connection tracking does not
#: follow them, so they pass statelessly. (libvirt 9.0 silently drops a typed ICMPv6
#: rule without state matching in direction ``inout``: one rule per direction.)
NEIGHBOUR_DISCOVERY = {"in": (134, 135, 136), "out": (133, 135, 136)}
#: ICMPv6 types a guest never sends: router advertisement, redirect.
ROUTER_ONLY = (134, 137)
#: the IP-layer protocol elements, per family
IP_PROTOCOLS = {
    "ipv4": {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "any": "all"},
    "ipv6": {"tcp": "tcp-ipv6", "udp": "udp-ipv6", "icmpv6": "icmpv6", "any": "all-ipv6"},
}


@dataclass
class Rule:
    """``<rule>``: an action on frames or packets in a direction, matched by one protocol
    element (none: every frame of the chain)."""

    action: str  # accept, drop, return
    direction: str  # in, out, inout
    priority: int
    protocol: str | None = None
    attrs: dict[str, str] = field(default_factory=dict)
    statematch: bool = True

    def element(self) -> ET.Element:
        el = ET.Element(
            "rule", action=self.action, direction=self.direction, priority=str(self.priority)
        )
        if not self.statematch:
            el.set("statematch", "false")
        if self.protocol is not None:
            ET.SubElement(el, self.protocol, self.attrs)
        return el


@dataclass
class Ref:
    """``<filterref>`` to another filter."""

    filter: str

    def element(self) -> ET.Element:
        return ET.Element("filterref", filter=self.filter)


@dataclass
class Filter:
    name: str
    chain: str
    entries: list[Rule | Ref] = field(default_factory=list)

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(UUID_NAMESPACE, self.name))

    def element(self) -> ET.Element:
        el = ET.Element("filter", name=self.name, chain=self.chain)
        ET.SubElement(el, "uuid").text = self.uuid
        for entry in self.entries:
            el.append(entry.element())
        return el

    def to_xml(self) -> str:
        return ET.tostring(self.element(), encoding="unicode")


# ---------------------------------------------------------------------- the guard
def guard_filters(guard: GuardFilters) -> list[Filter]:
    """The guard's parts (each a chain of the bridge layer), in the order to define them."""
    name = guard.name
    udp_from = lambda port: {"protocol": "udp", "srcportstart": str(port), "srcportend": str(port)}  # noqa: E731
    # Every part ends with its verdict for the frames it did not decide: a frame that
    # runs off the end of a part's chain is ACCEPTED there (an ebtables chain's default
    # policy), and the parts after it never see it.
    mac = Filter(name("mac"), "mac", [
        Rule("drop", "out", 100, "mac", {"match": "no", "srcmacaddr": "$MAC"}),
        Rule("return", "out", 1000),  # its own MAC: on to its protocol's part
    ])  # fmt: skip
    ipv4 = Filter(name("ipv4"), "ipv4", [
        Rule("drop", "out", 100, "ip", udp_from(67)),  # a DHCP server's replies
        Rule("return", "out", 500, "ip", {"srcipaddr": "$IP"}),
        Rule("drop", "out", 1000),
    ])  # fmt: skip
    noipv4 = Filter(name("noipv4"), "ipv4", [Rule("drop", "out", 1000)])
    ipv6 = Filter(name("ipv6"), "ipv6", [
        *(Rule("drop", "out", 100, "ipv6", {"protocol": "icmpv6", "type": str(kind)})
          for kind in ROUTER_ONLY),
        Rule("drop", "out", 100, "ipv6", udp_from(547)),  # a DHCPv6 server's replies
        Rule("return", "out", 500, "ipv6", {"srcipaddr": "$IPV6"}),
        # duplicate address detection (and its multicast listener report) come from ::
        Rule("return", "out", 500, "ipv6",
             {"srcipaddr": "::", "protocol": "icmpv6", "type": "135"}),
        Rule("return", "out", 500, "ipv6",
             {"srcipaddr": "::", "protocol": "icmpv6", "type": "143"}),
        Rule("drop", "out", 1000),
    ])  # fmt: skip
    arp = Filter(name("arp"), "arp", [
        Rule("drop", "out", 300, "arp", {"match": "no", "arpsrcmacaddr": "$MAC"}),
        Rule("return", "out", 500, "arp", {"arpsrcipaddr": "$IP"}),
        Rule("return", "out", 500, "arp", {"arpsrcipaddr": "0.0.0.0"}),  # noqa: S104 - a probe (RFC 5227)
        Rule("drop", "out", 1000),
    ])  # fmt: skip
    noarp = Filter(name("noarp"), "arp", [Rule("drop", "out", 1000)])
    # After each protocol's chain has returned: accept it; every other protocol dropped.
    l2 = Filter(name("l2"), "root", [
        Rule("accept", "inout", -650, "mac", {"protocolid": "ipv4"}),
        Rule("accept", "inout", -550, "mac", {"protocolid": "ipv6"}),
        Rule("accept", "inout", -450, "mac", {"protocolid": "arp"}),
        Rule("accept", "inout", -350, "mac", {"protocolid": "rarp"}),  # QEMU's announce
        Rule("drop", "inout", 1000),
    ])  # fmt: skip
    return [mac, ipv4, noipv4, ipv6, arp, noarp, l2]


# ---------------------------------------------------------------------- groups
def rule_xml(rule: FilterRule) -> Rule:
    """A group's allow rule in the IP layer: NEW and ESTABLISHED accepted in its
    direction, libvirt adds the answers' way back."""
    attrs: dict[str, str] = {}
    if rule.port_min is not None:
        attrs["dstportstart"] = str(rule.port_min)
        attrs["dstportend"] = str(rule.port_max if rule.port_max is not None else rule.port_min)
    if rule.remote is not None:
        address, _, prefix = rule.remote.partition("/")
        side = "src" if rule.direction == IN else "dst"
        attrs[f"{side}ipaddr"] = address
        if prefix:
            attrs[f"{side}ipmask"] = prefix
    protocol = IP_PROTOCOLS[rule.family][rule.protocol]
    return Rule("accept", rule.direction, DEFAULT_PRIORITY, protocol, attrs)


def group_filter(spec: GroupFilter) -> Filter:
    return Filter(spec.name, "root", [rule_xml(rule) for rule in spec.rules])


# ---------------------------------------------------------------------- one NIC
def port_filter(spec: PortFilter) -> Filter:
    entries: list[Rule | Ref] = []
    if spec.guard is not None:
        parts = ("mac", "ipv4" if spec.ipv4 else "noipv4", "ipv6",
                 "arp" if spec.ipv4 else "noarp", "l2")  # fmt: skip
        entries += [Ref(spec.guard.name(part)) for part in parts]
    entries += [Ref(name) for name in spec.groups]
    if spec.groups:
        every = ("all", "all-ipv6")
        established = {"state": "ESTABLISHED,RELATED"}
        entries += [
            *(Rule("accept", way, 300, "icmpv6", {"type": str(kind)}, statematch=False)
              for way, kinds in NEIGHBOUR_DISCOVERY.items() for kind in kinds),
            *(Rule("accept", "in", 400, proto, dict(established)) for proto in every),
            *(Rule("drop", "in", 1000, proto) for proto in every),
        ]  # fmt: skip
        if spec.egress_limited:
            entries += [Rule("accept", "out", 400, proto, dict(established)) for proto in every]
            entries += [Rule("drop", "out", 1000, proto) for proto in every]
        else:
            entries += [Rule("accept", "out", DEFAULT_PRIORITY, proto) for proto in every]
    return Filter(spec.name, "root", entries)


def filters_of(spec: NetworkFilter) -> list[Filter]:
    """The filter XML objects ``spec`` is made of (several for the guard)."""
    if isinstance(spec, GuardFilters):
        return guard_filters(spec)
    if isinstance(spec, GroupFilter):
        return [group_filter(spec)]
    return [port_filter(spec)]


def filter_params(nic: NicSpec) -> list[tuple[str, str]]:
    """The variables of the NIC's ``<filterref>``: its addresses (``MAC`` libvirt takes
    from the NIC) and no address learning."""
    params = [("CTRL_IP_LEARNING", "none")]
    params += [("IP", address) for address in nic.filter_ipv4]
    params += [("IPV6", address) for address in nic.filter_ipv6]
    return params


# ---------------------------------------------------------------------- comparing
def canonical(el: ET.Element) -> tuple:
    """A filter as comparable data: what libvirt writes back (its UUID aside, defaults
    filled in) equals what vmapi wrote when the filter is the same."""
    entries = []
    for child in el:
        if child.tag == "filterref":
            entries.append(("ref", child.get("filter")))
        elif child.tag == "rule":
            attrs = dict(child.attrib)
            attrs.setdefault("priority", str(DEFAULT_PRIORITY))
            attrs.setdefault("statematch", "true")
            if attrs["statematch"] in ("1", "true"):
                attrs["statematch"] = "true"
            match = [(m.tag, tuple(sorted(m.attrib.items()))) for m in child]
            entries.append(("rule", tuple(sorted(attrs.items())), tuple(match)))
    return (el.get("name"), el.get("chain"), tuple(entries))


# ---------------------------------------------------------------------- the calls
class FilterCalls(LibvirtCalls):
    """Network filters on a host, and a running NIC's reference to its filter."""

    def network_filters(self, uri: str) -> bool:
        def probe(conn: libvirt.virConnect) -> bool:
            try:
                conn.listNWFilters()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                    return False
                raise
            return True

        return self._call(uri, probe)

    def define_filter(self, uri: str, spec: NetworkFilter) -> None:
        xmls = [made.to_xml() for made in filters_of(spec)]

        def define(conn: libvirt.virConnect) -> None:
            for xml in xmls:
                try:
                    conn.nwfilterDefineXML(xml)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                        raise NoNetworkFilters(
                            uri, "this host has no network filter driver"
                        ) from exc
                    raise

        self._call(uri, define)

    def undefine_filter(self, uri: str, name: str) -> None:
        def undefine(conn: libvirt.virConnect) -> None:
            try:
                conn.nwfilterLookupByName(name).undefine()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_NWFILTER:
                    raise

        self._call(uri, undefine)

    def filter_names(self, uri: str, prefix: str) -> set[str]:
        names = self._call(uri, lambda conn: conn.listNWFilters())
        return {name for name in names if name.startswith(prefix)}

    def stale_filters(self, uri: str, specs: Iterable[NetworkFilter]) -> list[str]:
        wanted = [made for spec in specs for made in filters_of(spec)]

        def compare(conn: libvirt.virConnect) -> list[str]:
            stale = []
            for made in wanted:
                try:
                    xml = conn.nwfilterLookupByName(made.name).XMLDesc(0)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_NWFILTER:
                        raise
                    stale.append(made.name)
                    continue
                held = ET.fromstring(xml)  # noqa: S314 - from libvirt, not from a guest
                if canonical(held) != canonical(made.element()):
                    stale.append(made.name)
            return stale

        return self._call(uri, compare)

    def update_nic_filter_live(self, uri: str, name: str, nic: NicSpec) -> bool:
        def update(dom: libvirt.virDomain) -> bool:
            if not dom.isActive():
                return False
            root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - from libvirt, not from a guest
            for iface in root.findall("devices/interface"):
                mac = iface.find("mac")
                if mac is None or mac.get("address", "").lower() != nic.mac.lower():
                    continue
                # The live element as libvirt wrote it (its tap, its alias): libvirt
                # refuses an update that changes anything but what may change live.
                old = iface.find("filterref")
                if old is not None:
                    iface.remove(old)
                if nic.filter:
                    iface.append(filterref(nic.filter, filter_params(nic)))
                xml = ET.tostring(iface, encoding="unicode")
                dom.updateDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                return True
            raise NotSupported(uri, f"the running domain {name} has no NIC {nic.mac}")

        return self._on_domain(uri, name, update)
