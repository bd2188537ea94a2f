"""What a node's network filters must be, from the database (API.md "Network protection").

Every NIC of a node in ``bridge`` or ``ethernet`` mode references a filter of its own,
``<installation>-nic-<interface id>`` (its ``<filterref>`` carries the interface's MAC
and addresses), made of the guard's parts (unless ``spoof_guard`` is off), its groups'
filters ``<installation>-sg-<group id>`` and the policy around them. This module names
them and reads them from the rows as the driver's specs (:mod:`vmapi.hypervisor`);
vmapi/hypervisor/libvirt/nwfilter.py writes them as libvirt's filter XML, and
:mod:`vmapi.services.network.protection` puts them on the nodes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import current_app
from sqlalchemy import delete, insert, select

from vmapi.extensions import db
from vmapi.hypervisor import FilterRule, GroupFilter, GuardFilters, NetworkFilter, PortFilter
from vmapi.models import (
    Interface,
    InterfaceSecurityGroup,
    Ipv4Address,
    Node,
    SecurityGroupRule,
    Vm,
)
from vmapi.services.names import installation_id

#: the interface modes whose NICs sit on a host device other guests share
GUARDED_MODES = ("bridge", "ethernet")
#: a rule's direction as the filter sees it (from the guest)
DIRECTION = {"ingress": "in", "egress": "out"}


# ---------------------------------------------------------------------- names
def prefix() -> str:
    return installation_id()


def guard() -> GuardFilters:
    return GuardFilters(prefix())


def group_filter_name(group_id: int) -> str:
    return f"{prefix()}-sg-{group_id}"


def port_filter_name(interface_id: int) -> str:
    return f"{prefix()}-nic-{interface_id}"


def guarded_mode(mode: str) -> bool:
    return mode in GUARDED_MODES


def filters_here(uri: str) -> bool:
    """Whether filters are defined on this host: not on libvirt's ``test`` driver, whose
    NICs carry no traffic."""
    return urlsplit(uri).scheme.split("+")[0] != "test"


def link_local(mac: str) -> str:
    """The IPv6 link-local address a guest derives from its MAC (modified EUI-64)."""
    octets = bytearray(int(part, 16) for part in mac.split(":"))
    octets[0] ^= 0x02
    eui = bytes(octets[:3]) + b"\xff\xfe" + bytes(octets[3:])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


def nic_filter(interface_id: int, mac: str, ipv4: Iterable[str], ipv6: Iterable[str]) -> dict:
    """The NicSpec fields of a guarded NIC: its filter and the addresses it holds."""
    return {
        "filter": port_filter_name(interface_id),
        "filter_ipv4": tuple(ipv4),
        "filter_ipv6": (*ipv6, link_local(mac)),
    }


# ---------------------------------------------------------------------- from the rows
def group_spec(group_id: int) -> GroupFilter:
    rules = db.session.scalars(
        select(SecurityGroupRule)
        .where(SecurityGroupRule.security_group_id == group_id)
        .order_by(SecurityGroupRule.id)
    )
    return GroupFilter(
        group_filter_name(group_id),
        tuple(
            FilterRule(
                DIRECTION[rule.direction],
                rule.ethertype,
                rule.protocol,
                rule.port_min,
                rule.port_max,
                rule.remote_cidr,
            )
            for rule in rules
        ),
    )


def groups_of(interface_ids: Collection[int]) -> dict[int, list[int]]:
    """Each interface's groups (ids, ascending)."""
    found: dict[int, list[int]] = {i: [] for i in interface_ids}
    if not interface_ids:
        return found
    rows = db.session.execute(
        select(InterfaceSecurityGroup.interface_id, InterfaceSecurityGroup.security_group_id)
        .where(InterfaceSecurityGroup.interface_id.in_(interface_ids))
        .order_by(InterfaceSecurityGroup.security_group_id)
    )
    for interface_id, group_id in rows:
        found[interface_id].append(group_id)
    return found


def set_groups(interface_id: int, group_ids: list[int]) -> None:
    """The interface uses exactly these groups (in the caller's transaction)."""
    db.session.execute(
        delete(InterfaceSecurityGroup).where(InterfaceSecurityGroup.interface_id == interface_id)
    )
    if group_ids:  # a Core insert: the pairs are the interface's field, audited with it
        db.session.execute(
            insert(InterfaceSecurityGroup),
            [
                {"interface_id": interface_id, "security_group_id": g}
                for g in sorted(set(group_ids))
            ],
        )


def egress_groups(group_ids: Collection[int]) -> set[int]:
    """The groups among ``group_ids`` that have egress rules."""
    if not group_ids:
        return set()
    return set(
        db.session.scalars(
            select(SecurityGroupRule.security_group_id)
            .where(
                SecurityGroupRule.security_group_id.in_(group_ids),
                SecurityGroupRule.direction == "egress",
            )
            .distinct()
        )
    )


@dataclass(frozen=True)
class NodeFilters:
    """What a node must hold: the guard (if any NIC is guarded), groups, NICs' filters."""

    guard: GuardFilters | None
    groups: tuple[GroupFilter, ...]
    ports: tuple[PortFilter, ...]

    def specs(self) -> list[NetworkFilter]:
        """In the order to define them (referenced before referencing)."""
        return [*filter(None, [self.guard]), *self.groups, *self.ports]

    def names(self) -> set[str]:
        names = {g.name for g in self.groups} | {p.name for p in self.ports}
        if self.guard is not None:
            names |= set(self.guard.names())
        return names


def filters_for(interfaces: list[Interface]) -> NodeFilters:
    """The filters ``interfaces`` (rows with ``spoof_guard``) need on their node."""
    ids = [iface.id for iface in interfaces]
    groups = groups_of(ids)
    used = sorted({g for gs in groups.values() for g in gs})
    egress = egress_groups(used)
    with_ipv4 = set(
        db.session.scalars(
            select(Ipv4Address.interface_id).where(Ipv4Address.interface_id.in_(ids))
        )
    ) if ids else set()  # fmt: skip
    the_guard = guard()
    ports = tuple(
        PortFilter(
            name=port_filter_name(iface.id),
            guard=the_guard if iface.spoof_guard else None,
            ipv4=iface.id in with_ipv4,
            groups=tuple(group_filter_name(g) for g in groups[iface.id]),
            egress_limited=any(g in egress for g in groups[iface.id]),
        )
        for iface in interfaces
    )
    return NodeFilters(
        guard=the_guard if any(p.guard for p in ports) else None,
        groups=tuple(group_spec(g) for g in used),
        ports=ports,
    )


def node_mode(node: Node) -> str:
    return node.interface_mode or current_app.config["INTERFACE_MODE"]


def wanted_on(node: Node, gone: Collection[int] = ()) -> NodeFilters:
    """Everything the node must hold for the VMs the database has on it (but ``gone``)."""
    if not guarded_mode(node_mode(node)):
        return NodeFilters(None, (), ())
    interfaces = db.session.scalars(
        select(Interface)
        .join(Vm, Vm.id == Interface.vm_id)
        .where(Vm.node_id == node.id, Vm.id.not_in(gone))
        .order_by(Interface.id)
    ).all()
    return filters_for(list(interfaces))


def vm_interfaces(vm_id: int) -> list[Interface]:
    return list(
        db.session.scalars(
            select(Interface)
            .where(Interface.vm_id == vm_id)
            .order_by(Interface.id)
            .execution_options(populate_existing=True)
        )
    )
