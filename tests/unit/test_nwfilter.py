"""The filter XML vmapi writes (vmapi/hypervisor/libvirt/nwfilter.py), as data: what each
rule matches; libvirt's own reading of it is proven in tests/hypervisor."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from vmapi.hypervisor import FilterRule, GroupFilter, GuardFilters, NicSpec, PortFilter
from vmapi.hypervisor.libvirt.designer import nic_xml
from vmapi.hypervisor.libvirt.nwfilter import (
    canonical,
    filters_of,
    group_filter,
    guard_filters,
    port_filter,
)
from vmapi.services.network.filters import link_local

GUARD = GuardFilters("inst")


def rules_of(el: ET.Element) -> list[tuple]:
    return [(r.get("action"), r.get("direction"), r.get("priority"),
             [(m.tag, dict(m.attrib)) for m in r]) for r in el.findall("rule")]  # fmt: skip


def test_the_guard_parts_are_the_ones_the_services_name():
    assert [f.name for f in guard_filters(GUARD)] == list(GUARD.names())
    assert len(set(f.uuid for f in guard_filters(GUARD))) == len(GUARD.names())


def test_the_guard_holds_the_guest_to_its_own_mac_and_addresses():
    parts = {f.name.rsplit("-", 1)[1]: f.element() for f in guard_filters(GUARD)}
    assert rules_of(parts["mac"]) == [
        ("drop", "out", "100", [("mac", {"match": "no", "srcmacaddr": "$MAC"})]),
        ("return", "out", "1000", []),  # on to the protocol's part
    ]
    ipv4 = rules_of(parts["ipv4"])
    assert ("return", "out", "500", [("ip", {"srcipaddr": "$IP"})]) in ipv4
    assert ipv4[-1] == ("drop", "out", "1000", [])  # everything else
    assert ipv4[0][3][0][1]["srcportstart"] == "67"  # no DHCP server, first
    ipv6 = rules_of(parts["ipv6"])
    assert ("return", "out", "500", [("ipv6", {"srcipaddr": "$IPV6"})]) in ipv6
    dropped_types = {m[1].get("type") for a, _d, _p, ms in ipv6 if a == "drop" for m in ms}
    assert {"134", "137"} <= dropped_types  # router advertisements, redirects
    arp = rules_of(parts["arp"])
    assert ("drop", "out", "300", [("arp", {"match": "no", "arpsrcmacaddr": "$MAC"})]) in arp
    assert ("return", "out", "500", [("arp", {"arpsrcipaddr": "$IP"})]) in arp
    assert rules_of(parts["noipv4"]) == rules_of(parts["noarp"]) == [("drop", "out", "1000", [])]
    l2 = rules_of(parts["l2"])
    assert l2[-1] == ("drop", "inout", "1000", [])  # no other layer-2 protocol


def test_every_part_of_the_guard_ends_with_its_own_verdict():
    """libvirt makes each part a chain of the bridge layer jumped to from the NIC's root
    chain; a frame that runs off a chain's end is ACCEPTED there (ebtables' default
    policy), so the parts after it (IPv4, IPv6, ARP after the MAC's) would never see it.
    Each part's last rule decides every frame still in it: return or drop."""
    for part in guard_filters(GUARD):
        last = rules_of(part.element())[-1]
        assert last[0] in ("return", "drop") and last[3] == [], (part.name, last)
        assert last[1] in ("out", "inout") and last[2] == "1000", (part.name, last)


@pytest.mark.parametrize(
    ("rule", "element", "attrs"),
    [
        (FilterRule("in", "ipv4", "tcp", 80, 80, None), "tcp",
         {"dstportstart": "80", "dstportend": "80"}),
        (FilterRule("in", "ipv4", "tcp", 8000, None, "203.0.113.0/24"), "tcp",
         {"dstportstart": "8000", "dstportend": "8000", "srcipaddr": "203.0.113.0",
          "srcipmask": "24"}),
        (FilterRule("out", "ipv6", "udp", 53, 53, "2001:db8::/32"), "udp-ipv6",
         {"dstportstart": "53", "dstportend": "53", "dstipaddr": "2001:db8::",
          "dstipmask": "32"}),
        (FilterRule("in", "ipv4", "icmp"), "icmp", {}),
        (FilterRule("in", "ipv6", "icmpv6"), "icmpv6", {}),
        (FilterRule("out", "ipv4", "any"), "all", {}),
        (FilterRule("in", "ipv6", "any"), "all-ipv6", {}),
    ],
)  # fmt: skip
def test_a_group_rule_allows_what_it_names(rule, element, attrs):
    (written,) = group_filter(GroupFilter("inst-sg-1", (rule,))).element().findall("rule")
    assert (written.get("action"), written.get("direction")) == ("accept", rule.direction)
    (match,) = list(written)
    assert (match.tag, dict(match.attrib)) == (element, attrs)


def test_a_nic_with_groups_drops_what_they_do_not_allow():
    spec = PortFilter("inst-nic-1", GUARD, ipv4=True, groups=("inst-sg-1",))
    el = port_filter(spec).element()
    assert [r.get("filter") for r in el.findall("filterref")] == [
        "inst-guard-mac", "inst-guard-ipv4", "inst-guard-ipv6", "inst-guard-arp",
        "inst-guard-l2", "inst-sg-1",
    ]  # fmt: skip
    rules = rules_of(el)
    assert ("drop", "in", "1000", [("all", {})]) in rules
    assert ("drop", "in", "1000", [("all-ipv6", {})]) in rules
    assert ("accept", "out", "500", [("all", {})]) in rules  # egress open: no egress rule
    # neighbour discovery passes without connection tracking, one rule per direction
    nd = [r for r in el.findall("rule") if r.get("statematch") == "false"]
    assert {(r.get("direction"), r[0].get("type")) for r in nd} == {
        ("in", "134"), ("in", "135"), ("in", "136"), ("out", "133"), ("out", "135"), ("out", "136")
    }  # fmt: skip
    limited = rules_of(
        port_filter(PortFilter("n", GUARD, groups=("g",), egress_limited=True)).element()
    )
    assert ("drop", "out", "1000", [("all", {})]) in limited
    assert ("accept", "out", "500", [("all", {})]) not in limited


def test_a_nic_without_groups_has_only_the_guard_and_without_guard_nothing():
    assert rules_of(port_filter(PortFilter("n", GUARD)).element()) == []
    bare = port_filter(PortFilter("n", None)).element()
    assert bare.findall("filterref") == [] and bare.findall("rule") == []
    no_v4 = port_filter(PortFilter("n", GUARD, ipv4=False)).element()
    assert [r.get("filter") for r in no_v4.findall("filterref")] == [
        "inst-guard-mac", "inst-guard-noipv4", "inst-guard-ipv6", "inst-guard-noarp",
        "inst-guard-l2",
    ]  # fmt: skip


def test_the_nic_carries_its_addresses_and_never_learns_one():
    nic = NicSpec(mac="52:54:00:aa:00:11", mode="bridge", device="br0", filter="inst-nic-4",
                  filter_ipv4=("198.51.100.10",),
                  filter_ipv6=("2001:db8::10", "fe80::5054:ff:feaa:11"))  # fmt: skip
    ref = nic_xml(nic).element().find("filterref")
    assert ref.get("filter") == "inst-nic-4"
    assert [(p.get("name"), p.get("value")) for p in ref] == [
        ("CTRL_IP_LEARNING", "none"), ("IP", "198.51.100.10"),
        ("IPV6", "2001:db8::10"), ("IPV6", "fe80::5054:ff:feaa:11"),
    ]  # fmt: skip
    plain = NicSpec(mac="52:54:00:aa:00:11", mode="user")
    assert nic_xml(plain).element().find("filterref") is None


def test_canonical_ignores_what_libvirt_adds_and_sees_what_differs():
    (ours,) = filters_of(GroupFilter("inst-sg-1", (FilterRule("in", "ipv4", "tcp", 80, 80),)))
    theirs = ET.fromstring(
        "<filter name='inst-sg-1' chain='root' priority='-500'><uuid>x</uuid>"
        "<rule action='accept' direction='in' priority='500'>"
        "<tcp dstportend='80' dstportstart='80'/></rule></filter>"
    )
    assert canonical(theirs) == canonical(ours.element())
    theirs.find("rule/tcp").set("dstportend", "81")
    assert canonical(theirs) != canonical(ours.element())


def test_link_local_is_the_modified_eui64_of_the_mac():
    assert link_local("52:54:00:aa:00:11") == "fe80::5054:ff:feaa:11"
    assert link_local("00:16:3e:00:00:01") == "fe80::216:3eff:fe00:1"
