"""Scheduler filters and weighers, each a named SQL expression over ``node``.

Free capacity (API.md: capacity times ratio, less reservation, minus what is
allocated) is stored on the node and kept by every claim; see
:mod:`vmapi.scheduler.capacity`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Exists, and_, func, literal, or_, select

from vmapi.models import ImageCopy, Node, NodeState, NodeStorageAccess, VirtNode, Vm
from vmapi.models.server_group import AFFINITY, ANTI_AFFINITY, SOFT_ANTI_AFFINITY


@dataclass(frozen=True)
class PlacementRequest:
    """What a VM needs from a node."""

    cores: int
    ram: int
    virt_method_id: int
    uuid: str | None = None
    #: the image the VM boots from: nodes that hold a copy win ties (:func:`weigh`)
    image_id: int | None = None
    #: the rbd storage types of the VM's volumes: nodes must reach their Ceph clusters
    rbd_type_ids: tuple[int, ...] = ()
    #: the server group the VM joins (or is in), and its policy: the policy as read under
    #: the group row's lock by the claim (:func:`vmapi.scheduler.claims.lock_group`)
    server_group_id: int | None = None
    policy: str | None = None
    #: a VM that exists (a move's): not counted among its group's members
    vm_id: int | None = None


@dataclass(frozen=True)
class Defaults:
    """What the filters need beyond the request: when libvirt failures stop counting."""

    down_since: datetime  # nodes whose libvirt failed after this are skipped
    #: how a node's NICs are wired when its ``interface_mode`` is null (INTERFACE_MODE)
    interface_mode: str = "bridge"


#: Interface modes whose NICs a node must guard with network filters.
GUARDED_MODES = ("bridge", "ethernet")


def per_node(*conditions: ColumnElement) -> Exists:
    """``EXISTS`` over other tables, kept a check of each node the walk visits.

    The ``OFFSET 0`` stops PostgreSQL from turning the subquery into a join: on missing
    or stale statistics (a fleet registered in bulk, a new virt_method) it drove the
    query from the other table (every node joined, then sorted: 12-14 ms on 2,000 nodes
    instead of 1), or, walking the nodes, paired each with every virt_node row of the
    method (320,000 rows filtered for 200 nodes visited). As a subplan it is one index
    lookup per node visited (``tests/api/test_placement_plans.py``).
    """
    return select(literal(1)).where(*conditions).offset(0).exists()


def state_schedulable(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node's state lets it receive new VMs."""
    return per_node(NodeState.id == Node.node_state_id, NodeState.schedulable.is_(True))


def has_virt_method(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node has a virt_node for the requested virtualization method."""
    return per_node(VirtNode.node_id == Node.id, VirtNode.virt_method_id == r.virt_method_id)


def libvirt_reachable(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node's libvirt answered its last health check (``flask vmapi node check``)
    and no request failed to reach it within the cool-off period."""
    return and_(
        Node.unreachable_since.is_(None),
        or_(Node.libvirt_failed_at.is_(None), Node.libvirt_failed_at < d.down_since),
    )


def can_guard(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """A node whose NICs must be guarded (bridge or ethernet mode) has a network filter
    driver, or is not known to lack one (a create there fails closed when it does)."""
    mode = func.coalesce(Node.interface_mode, d.interface_mode)
    return or_(Node.network_filters.is_not(False), mode.not_in(GUARDED_MODES))


def reaches_ceph(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node is not recorded as unable to reach the Ceph cluster of an rbd type the
    VM's volumes use (``flask vmapi node check`` records it in ``node_storage_access``;
    a node never checked for a type counts as reaching it)."""
    if not r.rbd_type_ids:
        return literal(True)
    return ~per_node(
        NodeStorageAccess.node_id == Node.id,
        NodeStorageAccess.storage_type_id.in_(r.rbd_type_ids),
        NodeStorageAccess.reachable.is_(False),
    )


def enough_cores(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """Free vCPUs (capacity times ratio, minus allocated) fit the request."""
    return Node.free_cores >= r.cores


def enough_ram(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """Free RAM (capacity less reservation, times ratio, minus allocated) fits the request."""
    return Node.free_ram >= r.ram


def uuid_free(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node does not already hold a domain with the VM's UUID (libvirt forbids it),
    nor is one being moved there. A moving VM's own node fails it: it goes elsewhere."""
    if r.uuid is None:
        return literal(True)
    here = or_(Vm.node_id == Node.id, Vm.migration_node_id == Node.id)
    return ~per_node(Vm.uuid == r.uuid, here)


def members_here(r: PlacementRequest) -> list[ColumnElement]:
    """A member of the request's group is on the node, or being moved there (its VM
    itself left out)."""
    conditions = [
        Vm.server_group_id == r.server_group_id,
        or_(Vm.node_id == Node.id, Vm.migration_node_id == Node.id),
    ]
    if r.vm_id is not None:
        conditions.append(Vm.id != r.vm_id)
    return conditions


def anti_affinity(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """A VM of an anti-affinity group: the node holds no other member of the group (nor
    is one being moved there)."""
    if r.policy != ANTI_AFFINITY:
        return literal(True)
    return ~per_node(*members_here(r))


def affinity(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """A VM of an affinity group: the node holds a member of the group (or one is being
    moved there); any node when the group has no other member."""
    if r.policy != AFFINITY:
        return literal(True)
    others = [Vm.server_group_id == r.server_group_id]
    if r.vm_id is not None:
        others.append(Vm.id != r.vm_id)
    alone = ~select(literal(1)).where(*others).exists()  # once per query, not per node
    return or_(alone, per_node(*members_here(r)))


Filter = Callable[[PlacementRequest, Defaults], ColumnElement]

#: In the order their removals are counted for ``vm/no_valid_host``.
FILTERS: list[tuple[str, Filter]] = [
    ("state_schedulable", state_schedulable),
    ("has_virt_method", has_virt_method),
    ("libvirt_reachable", libvirt_reachable),
    ("can_guard", can_guard),
    ("reaches_ceph", reaches_ceph),
    ("enough_cores", enough_cores),
    ("enough_ram", enough_ram),
    ("uuid_free", uuid_free),
    # a server group's policy, named by the policy (API.md "/server_group")
    (ANTI_AFFINITY, anti_affinity),
    (AFFINITY, affinity),
]


def spread() -> list[ColumnElement]:
    """Most free RAM first: VMs spread over the fleet (the default). Index ix_node_spread."""
    return [Node.free_ram.desc(), Node.id]


def pack() -> list[ColumnElement]:
    """Least free RAM that fits first: fill nodes up before new ones. Index ix_node_pack."""
    return [Node.free_ram.asc(), Node.id]


WEIGHERS: dict[str, Callable[[], list[ColumnElement]]] = {"spread": spread, "pack": pack}


def holds_image(image_id: int) -> ColumnElement:
    """The node holds a copy of the image (its base volume there is made already)."""
    return per_node(ImageCopy.image_id == image_id, ImageCopy.node_id == Node.id)


def members_count(r: PlacementRequest) -> ColumnElement:
    """How many members of the request's group the node holds (or receives)."""
    return select(func.count()).select_from(Vm).where(*members_here(r)).scalar_subquery()


def walks_index(r: PlacementRequest) -> bool:
    """Whether :func:`weigh`'s order starts with the weigher's index (the scheduler then
    plans its query as a walk of it): not for a soft-anti-affinity group, whose member
    count comes first."""
    return r.policy != SOFT_ANTI_AFFINITY


def weigh(r: PlacementRequest, weigher: str) -> list[ColumnElement]:
    """The weigher's order; a VM from an image prefers, among nodes the weigher ranks
    equal, those that hold the image (sparing a copy). Only a tie-break: the weigher's
    index still orders the walk (PostgreSQL sorts each run of equal weights, an
    incremental sort), so placement stays as flat as without an image.

    A VM of a soft-anti-affinity group goes first to the nodes holding the fewest of its
    group's members, then by the weigher: every node that fits is counted and sorted
    (the group's weigher; its filters are the others')."""
    order = WEIGHERS[weigher]()
    if r.image_id is not None:
        order = [order[0], holds_image(r.image_id).desc(), *order[1:]]
    if r.policy == SOFT_ANTI_AFFINITY:
        order = [members_count(r).asc(), *order]
    return order
