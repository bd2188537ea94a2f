"""Atomic capacity claims on a node.

A claim is one conditional ``UPDATE``: it adds to ``allocated_*`` only if the result
still fits. PostgreSQL re-evaluates the ``WHERE`` against the newest row version when
two transactions update the same node (READ COMMITTED), so concurrent claims in any
number of workers and API servers can never overcommit; SQLite serializes writers.
"""

from __future__ import annotations

from sqlalchemy import update

from vmapi.extensions import db
from vmapi.models import Node
from vmapi.scheduler.filters import Defaults, free_cores, free_ram


def claim(node_id: int, cores: int, ram: int, d: Defaults) -> bool:
    """Add ``cores``/``ram`` to the node's allocation if they fit; False if they don't."""
    stmt = (
        update(Node)
        .where(Node.id == node_id, free_cores(d) >= cores, free_ram(d) >= ram)
        .values(
            allocated_cores=Node.allocated_cores + cores, allocated_ram=Node.allocated_ram + ram
        )
        .execution_options(synchronize_session=False)
    )
    return db.session.execute(stmt).rowcount == 1


def release(node_id: int, cores: int, ram: int) -> None:
    """Give back what a claim took (never below zero: the CHECK constraint guards it)."""
    stmt = (
        update(Node)
        .where(Node.id == node_id)
        .values(
            allocated_cores=Node.allocated_cores - cores, allocated_ram=Node.allocated_ram - ram
        )
        .execution_options(synchronize_session=False)
    )
    db.session.execute(stmt)
