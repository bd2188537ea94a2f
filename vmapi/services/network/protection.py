"""Network protection on the nodes: the guard and the security groups as libvirt network
filters (API.md "Network protection"), what they are made of being read from the database
by :mod:`vmapi.services.network.filters`. Here:

- making a node hold what its VMs' NICs reference before a domain is defined or arrives
  (:func:`ensure_for_vm`: create, migration, evacuation) or after a change
  (:func:`follow_live`, :func:`groups_changed`): a filter is (re)defined only where the
  node lacks it or holds it otherwise, since libvirt re-applies a redefined filter to
  every running guest using it;
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

import logging
from collections.abc import Collection

from sqlalchemy import select

from vmapi.extensions import db
from vmapi.hypervisor import (
    DomainSpec,
    GuardFilters,
    HypervisorDriver,
    HypervisorError,
    NicSpec,
    NoNetworkFilters,
)
from vmapi.models import Interface, InterfaceSecurityGroup, Node, Vm
from vmapi.node_detail import NodeNote
from vmapi.services.network.filters import (
    NodeFilters,
    filters_for,
    filters_here,
    group_filter_name,
    guarded_mode,
    node_mode,
    prefix,
    vm_interfaces,
    wanted_on,
)
from vmapi.services.nodes.domains import hypervisor_failure
from vmapi.services.nodes.hosts import Host, hypervisor, node_uri, on_hosts
from vmapi.services.undo import Undo

log = logging.getLogger(__name__)

STEP = "defining the network filters"


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
        names = set(spec.names()) if isinstance(spec, GuardFilters) else {spec.name}
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
                  lambda: prune(host, [vm_id]))  # fmt: skip


def prune(host: Host, gone: Collection[int] = ()) -> list[str]:
    """Remove this installation's filters no VM of the node uses now (the NICs' first,
    then groups', then the guard's); the names removed. ``gone``: VMs whose filters go
    although the database still has them there (a create being undone)."""
    if not filters_here(host.uri):
        return []
    driver = hypervisor()
    held = driver.filter_names(host.uri, f"{prefix()}-")  # first the node, then the rows
    wanted = wanted_on(host.node, gone).names()
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
def nic_of(spec: DomainSpec, mac: str) -> NicSpec:
    return next(nic for nic in spec.nics if nic.mac == mac)


def follow_live(host: Host, vm_id: int, domain: str, before: NicSpec, after: NicSpec,
                old_filters: NodeFilters | None, undo: Undo) -> None:  # fmt: skip
    """After an interface changed (addresses, groups, guard): the running guest's filter
    follows at once, its NIC's addresses by a live device update and its filter by a
    redefinition libvirt re-applies; each with its inverse. A NIC losing its last IPv4
    address gets its filter first (the new one no longer needs ``IP``), otherwise its
    addresses first (a filter that needs ``IP`` finds it)."""
    new_filters = filters_on(host, [vm_id]) if old_filters else None
    if new_filters is None or old_filters is None:
        return
    driver = hypervisor()

    def nic() -> None:
        if before == after:
            return
        driver.update_nic_filter_live(host.uri, domain, after)
        undo.push(f"giving the NIC {after.mac} of {domain} its former addresses",
                  lambda: driver.update_nic_filter_live(host.uri, domain, before))  # fmt: skip

    def filters() -> None:
        define_stale(host.uri, new_filters)
        undo.push(f"restoring the network filters of {domain}",
                  lambda: define_stale(host.uri, old_filters))  # fmt: skip

    losing_ipv4 = bool(before.filter_ipv4) and not after.filter_ipv4
    step = STEP
    try:
        for action in (filters, nic) if losing_ipv4 else (nic, filters):
            step = STEP if action is filters else "changing the NIC's filter live"
            action()
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc


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
        changed = {group_filter_name(i) for i in group_ids}
        # the groups' filters, and the NICs' of their users only (one may have gained or
        # lost its egress policy): compared with the node's before anything is defined
        wanted[node.id] = NodeFilters(
            None,
            tuple(g for g in full.groups if g.name in changed),
            tuple(p for p in full.ports if changed & set(p.groups)),
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
