"""Network protection on the nodes: the guard and the security groups as libvirt network
filters, written from the database (API.md "Network protection").

Every NIC of a node in ``bridge`` or ``ethernet`` mode references a filter of its own,
``<installation>-nic-<interface id>`` (its ``<filterref>`` carries the interface's MAC
and addresses), made of the guard's parts (unless ``spoof_guard`` is off), its groups'
filters ``<installation>-sg-<group id>`` and the policy around them
(vmapi/hypervisor/libvirt/nwfilter.py writes them). Here:

- what a node must hold for its VMs (:func:`wanted_on`), and making it hold that before
  a domain is defined or arrives (:func:`ensure_for_vm`, create, migration, evacuation)
  or after a change (:func:`interface_changed`, :func:`groups_changed`): a filter is
  (re)defined only where the node lacks it or holds it otherwise, since libvirt
  re-applies a redefined filter to every running guest using it;
- removing what no VM of the node uses any more (:func:`prune`), which lists the node
  first and reads the database after, so a VM committed meanwhile keeps its filters;
- a node whose libvirt has no network filter driver: recorded on the node
  (``network_filters``), the scheduler gives it no VM it would have to guard, and a
  create there fails (502) rather than run a guest unguarded;
- a node a change could not reach: ``filters_pending`` set; ``node check`` (and
  ``reconcile --fix``) bring it in line when it answers (:func:`sync_node`).

libvirt's ``test`` driver (the embedded default) carries no traffic and has no filter
driver: its NICs are described with their filter reference, but nothing is defined there.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import current_app
from sqlalchemy import select

from vmapi.extensions import db
from vmapi.hypervisor import (
    FilterRule,
    GroupFilter,
    GuardFilters,
    HypervisorDriver,
    HypervisorError,
    NetworkFilter,
    NoNetworkFilters,
    PortFilter,
)
from vmapi.models import (
    Interface,
    InterfaceSecurityGroup,
    Ipv4Address,
    Node,
    SecurityGroupRule,
    Vm,
)
from vmapi.node_detail import NodeNote
from vmapi.services.names import installation_id
from vmapi.services.nodes.domains import hypervisor_failure
from vmapi.services.nodes.hosts import Host, hypervisor, node_uri, on_hosts
from vmapi.services.undo import Undo

log = logging.getLogger(__name__)

#: the interface modes whose NICs sit on a host device other guests share
GUARDED_MODES = ("bridge", "ethernet")
STEP = "defining the network filters"
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
            names |= {f"{self.guard.prefix}-guard-{part}" for part in GUARD_PARTS}
        return names


#: the guard's parts (vmapi/hypervisor/libvirt/nwfilter.py names them so)
GUARD_PARTS = ("mac", "ipv4", "noipv4", "ipv6", "arp", "noarp", "l2")


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


def wanted_on(node: Node) -> NodeFilters:
    """Everything the node must hold for the VMs the database has on it."""
    if not guarded_mode(node_mode(node)):
        return NodeFilters(None, (), ())
    interfaces = db.session.scalars(
        select(Interface)
        .join(Vm, Vm.id == Interface.vm_id)
        .where(Vm.node_id == node.id)
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


# ---------------------------------------------------------------------- on a node
def _mark(node_id: int, **values) -> None:
    node = db.session.get(Node, node_id)
    for key, value in values.items():
        setattr(node, key, value)
    db.session.commit()


def define_stale(
    uri: str, wanted: NodeFilters, driver: HypervisorDriver | None = None
) -> list[str]:
    """Define what the node lacks or holds otherwise (nothing else: a redefinition is
    re-applied to every guest using the filter); the names defined. ``driver``: given
    in threads without the app."""
    driver = driver or hypervisor()
    specs = wanted.specs()
    if not specs:
        return []
    stale = set(driver.stale_filters(uri, specs))
    defined = []
    for spec in specs:
        names = NodeFilters(spec, (), ()).names() if isinstance(spec, GuardFilters) else {spec.name}
        if names & stale:
            driver.define_filter(uri, spec)
            defined += sorted(names & stale)
    return defined


def filters_on(host: Host, vm_ids: list[int]) -> NodeFilters | None:
    """What the VMs' NICs need on ``host`` (None: nothing is defined there)."""
    if not guarded_mode(node_mode(host.node)) or not filters_here(host.uri):
        return None
    return filters_for([iface for vm_id in vm_ids for iface in vm_interfaces(vm_id)])


def no_filter_driver(host: Host) -> None:
    """The node's libvirt answered that it has no network filter driver: recorded, so
    the scheduler gives it no VM it would have to guard."""
    _mark(host.node.id, network_filters=False)


def ensure_for_vm(host: Host, vm_id: int, undo: Undo | None = None) -> None:
    """Before the VM's domain is defined on (or moves to) ``host``: the filters its NICs
    reference are there. A failure is the request's (502, ``data.step``), and a node
    without a filter driver is recorded as such; the inverse removes what no VM of the
    node uses then."""
    wanted = filters_on(host, [vm_id])
    if wanted is None:
        return
    try:
        define_stale(host.uri, wanted)
    except NoNetworkFilters as exc:
        no_filter_driver(host)
        raise hypervisor_failure(exc, STEP, host) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, STEP, host) from exc
    if host.node.network_filters is not True:
        _mark(host.node.id, network_filters=True)
    if undo is not None:
        undo.push(f"removing the network filters no VM uses on node {host.node.fqdn}",
                  lambda: prune(host))  # fmt: skip


def prune(host: Host, keep_vm: int | None = None) -> list[str]:
    """Remove this installation's filters no VM of the node uses now (the NICs' first,
    then groups', then the guard's); the names removed. ``keep_vm``: a VM whose filters
    stay although the database has it elsewhere (a move still under way)."""
    if not filters_here(host.uri):
        return []
    driver = hypervisor()
    held = driver.filter_names(host.uri, f"{prefix()}-")  # first the node, then the rows
    wanted = wanted_on(host.node).names()
    if keep_vm is not None:
        wanted |= filters_for(vm_interfaces(keep_vm)).names()
    order = {"nic": 0, "sg": 1, "guard": 2}
    extra = sorted(
        held - wanted, key=lambda n: (order.get(n[len(prefix()) + 1 :].split("-")[0], 3), n)
    )
    removed = []
    for name in extra:
        try:
            driver.undefine_filter(host.uri, name)
            removed.append(name)
        except HypervisorError as exc:  # still in use by a guest defined meanwhile
            log.warning("filter %s on %s stays: %s", name, host.node.fqdn, exc.reason)
    return removed


def prune_after(host: Host) -> list[NodeNote]:
    """:func:`prune` after a VM left the node; a failure is a note, not the request's."""
    try:
        prune(host)
    except HypervisorError as exc:
        db.session.rollback()
        return [
            NodeNote(
                "Network filters no VM uses any more stay on the VM's node for now; "
                "`flask vmapi reconcile --fix` removes them.",
                f"node {host.node.fqdn}: {exc.reason}",
            )
        ]
    return []


def sync_node(host: Host) -> tuple[list[str], list[str]]:
    """Bring the node's filters in line with the database: (defined, removed)."""
    if not guarded_mode(node_mode(host.node)) or not filters_here(host.uri):
        return [], []
    defined = define_stale(host.uri, wanted_on(host.node))
    removed = prune(host)
    return defined, removed


def differences(host: Host) -> tuple[list[str], list[str]]:
    """What reconcile reports: (filters missing or different, filters nobody uses)."""
    if not guarded_mode(node_mode(host.node)) or not filters_here(host.uri):
        return [], []
    driver = hypervisor()
    held = driver.filter_names(host.uri, f"{prefix()}-")
    wanted = wanted_on(host.node)
    stale = driver.stale_filters(host.uri, wanted.specs())
    return sorted(stale), sorted(held - wanted.names())


# ---------------------------------------------------------------------- changes
def nodes_using(group_ids: Collection[int]) -> list[Node]:
    return list(
        db.session.scalars(
            select(Node)
            .where(
                Node.id.in_(
                    select(Vm.node_id)
                    .join(Interface, Interface.vm_id == Vm.id)
                    .join(
                        InterfaceSecurityGroup,
                        InterfaceSecurityGroup.interface_id == Interface.id,
                    )
                    .where(InterfaceSecurityGroup.security_group_id.in_(group_ids))
                )
            )
            .order_by(Node.id)
        )
    )


def groups_changed(group_ids: Collection[int]) -> list[str]:
    """Called after a commit that changed these groups' rules: each node with an
    interface using them gets the groups' filters (and the NICs' own where a group gained
    or lost its egress rules) at once, in parallel; libvirt re-applies them to the
    running guests. A node that cannot be reached is marked ``filters_pending`` (node
    check brings it in line when it answers); the notes say which."""
    if not group_ids:
        return []
    hosts: dict[int, Host] = {}
    wanted: dict[int, NodeFilters] = {}
    notes: list[str] = []
    for node in nodes_using(group_ids):
        if not guarded_mode(node_mode(node)):
            continue
        try:
            uri = node_uri(node.fqdn, node.libvirt_uri)
        except Exception as exc:  # a URI vmapi may not open: reported, not connected
            notes.append(f"Node {node.fqdn}: its filters were not changed ({exc}).")
            continue
        if not filters_here(uri):
            continue
        hosts[node.id] = Host(node, uri)
        full = wanted_on(node)
        wanted[node.id] = NodeFilters(
            None,
            tuple(g for g in full.groups if g.name in {group_filter_name(i) for i in group_ids}),
            full.ports,
        )
    driver = hypervisor()
    results = on_hosts(
        {node_id: node_id for node_id in hosts},
        lambda node_id: define_stale(hosts[node_id].uri, wanted[node_id], driver),
        len(hosts),
    )
    for node_id, result in results.items():
        if isinstance(result, HypervisorError):
            host = hosts[node_id]
            _mark(node_id, filters_pending=True)
            notes.append(
                f"Node {host.node.fqdn} could not be reached ({result.reason_class or 'error'}); "
                "its filters are brought in line when it answers (flask vmapi node check)."
            )
    return notes
