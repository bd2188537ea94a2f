"""Scheduler filters and weighers, each a named SQL expression over ``node``.

Capacity, as API.md defines it (the ratios and reservation fall back to configuration
when a node's own value is null):

    free vCPUs = cores * cpu_allocation_ratio - allocated_cores
    free RAM   = (ram - reserved_ram) * ram_allocation_ratio - allocated_ram
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, exists, func, literal, or_, select

from vmapi.models import Node, NodeState, VirtNode, Vm


@dataclass(frozen=True)
class PlacementRequest:
    """What a VM needs from a node."""

    cores: int
    ram: int
    virt_method_id: int
    uuid: str | None = None


@dataclass(frozen=True)
class Defaults:
    """Configuration the filters need: default ratios, reservation, libvirt cool-off."""

    cpu_allocation_ratio: float
    ram_allocation_ratio: float
    reserved_ram: int
    down_since: datetime  # nodes whose libvirt failed after this are skipped


def free_cores(d: Defaults) -> ColumnElement:
    ratio = func.coalesce(Node.cpu_allocation_ratio, literal(d.cpu_allocation_ratio))
    return Node.cores * ratio - Node.allocated_cores


def free_ram(d: Defaults) -> ColumnElement:
    ratio = func.coalesce(Node.ram_allocation_ratio, literal(d.ram_allocation_ratio))
    reserved = func.coalesce(Node.reserved_ram, literal(d.reserved_ram))
    return (Node.ram - reserved) * ratio - Node.allocated_ram


def state_schedulable(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node's state lets it receive new VMs."""
    return Node.node_state_id.in_(select(NodeState.id).where(NodeState.schedulable.is_(True)))


def has_virt_method(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node has a virt_node for the requested virtualization method."""
    return exists().where(
        and_(VirtNode.node_id == Node.id, VirtNode.virt_method_id == r.virt_method_id)
    )


def libvirt_reachable(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node's libvirt has not failed within the cool-off period."""
    return or_(Node.libvirt_failed_at.is_(None), Node.libvirt_failed_at < d.down_since)


def enough_cores(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """Free vCPUs (capacity times ratio, minus allocated) fit the request."""
    return free_cores(d) >= r.cores


def enough_ram(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """Free RAM (capacity less reservation, times ratio, minus allocated) fits the request."""
    return free_ram(d) >= r.ram


def uuid_free(r: PlacementRequest, d: Defaults) -> ColumnElement:
    """The node does not already hold a domain with the VM's UUID (libvirt forbids it)."""
    if r.uuid is None:
        return literal(True)
    return ~exists().where(and_(Vm.node_id == Node.id, Vm.uuid == r.uuid))


Filter = Callable[[PlacementRequest, Defaults], ColumnElement]

#: In the order their removals are counted for ``vm/no_valid_host``.
FILTERS: list[tuple[str, Filter]] = [
    ("state_schedulable", state_schedulable),
    ("has_virt_method", has_virt_method),
    ("libvirt_reachable", libvirt_reachable),
    ("enough_cores", enough_cores),
    ("enough_ram", enough_ram),
    ("uuid_free", uuid_free),
]


def spread(d: Defaults) -> list[ColumnElement]:
    """Most free RAM first: VMs spread over the fleet (the default)."""
    return [free_ram(d).desc(), Node.id]


def pack(d: Defaults) -> list[ColumnElement]:
    """Least free RAM that fits first: fill nodes up before starting new ones."""
    return [free_ram(d).asc(), Node.id]


WEIGHERS: dict[str, Callable[[Defaults], list[ColumnElement]]] = {"spread": spread, "pack": pack}
