"""A node's schedulable capacity and the stored free amounts derived from it.

    capacity vCPUs = cores * cpu_allocation_ratio
    capacity RAM   = (ram - reserved_ram) * ram_allocation_ratio
    free           = capacity - allocated

Null ratios and reservation take the configured defaults at the time the node is
written; ``refresh_all`` recomputes every node after the defaults change
(``flask vmapi node refresh-capacity``). The free amounts are stored so that the
scheduler filters and orders on indexed columns instead of computing them per row.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update

from vmapi.extensions import db
from vmapi.models import Node


@dataclass(frozen=True)
class CapacityDefaults:
    cpu_allocation_ratio: float
    ram_allocation_ratio: float
    reserved_ram: int


def capacity(node: Node, d: CapacityDefaults) -> tuple[float, int]:
    """Schedulable (vCPUs, RAM bytes) of ``node``."""
    cpu_ratio = node.cpu_allocation_ratio or d.cpu_allocation_ratio
    ram_ratio = node.ram_allocation_ratio or d.ram_allocation_ratio
    reserved = node.reserved_ram if node.reserved_ram is not None else d.reserved_ram
    return node.cores * cpu_ratio, int((node.ram - reserved) * ram_ratio)


def set_free(node: Node, d: CapacityDefaults) -> None:
    """Store the node's free amounts; computed in the UPDATE itself for an existing row,
    so a claim that commits in between is never overwritten."""
    cores, ram = capacity(node, d)
    if node.id is None:
        node.free_cores = cores - (node.allocated_cores or 0)
        node.free_ram = ram - (node.allocated_ram or 0)
    else:
        node.free_cores = cores - Node.allocated_cores
        node.free_ram = ram - Node.allocated_ram


def refresh_all(d: CapacityDefaults) -> int:
    """Recompute every node's free amounts (after the configured defaults changed)."""
    count = 0
    for node in db.session.scalars(select(Node).with_for_update()).all():
        cores, ram = capacity(node, d)
        db.session.execute(
            update(Node)
            .where(Node.id == node.id)
            .values(free_cores=cores - Node.allocated_cores, free_ram=ram - Node.allocated_ram)
            .execution_options(synchronize_session=False)
        )
        count += 1
    db.session.commit()
    return count
