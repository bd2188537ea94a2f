"""Atomic capacity claims on a node.

A claim is one conditional ``UPDATE``: it moves ``cores``/``ram`` from free to allocated
only if they are still free. PostgreSQL re-evaluates the ``WHERE`` against the newest
row version when two transactions update the same node (READ COMMITTED), so concurrent
claims in any number of workers and API servers can never overcommit; SQLite serializes
writers.
"""

from __future__ import annotations

from sqlalchemy import update

from vmapi.extensions import db
from vmapi.models import Node


def claim(node_id: int, cores: int, ram: int) -> Node | None:
    """Take ``cores``/``ram`` from the node's free capacity if they fit: the node as the
    claim left it (loaded by the same statement, so the create needs no second read),
    or None when they do not fit."""
    stmt = (
        update(Node)
        .where(Node.id == node_id, Node.free_cores >= cores, Node.free_ram >= ram)
        .values(
            allocated_cores=Node.allocated_cores + cores,
            allocated_ram=Node.allocated_ram + ram,
            free_cores=Node.free_cores - cores,
            free_ram=Node.free_ram - ram,
        )
        .returning(Node)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return db.session.scalars(stmt).first()


def release(node_id: int, cores: int, ram: int) -> None:
    """Give back what a claim took (negative amounts take, unconditionally)."""
    stmt = (
        update(Node)
        .where(Node.id == node_id)
        .values(
            allocated_cores=Node.allocated_cores - cores,
            allocated_ram=Node.allocated_ram - ram,
            free_cores=Node.free_cores + cores,
            free_ram=Node.free_ram + ram,
        )
        .execution_options(synchronize_session=False)
    )
    db.session.execute(stmt)
