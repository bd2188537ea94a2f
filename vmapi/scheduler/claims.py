"""Atomic capacity claims on a node.

A claim is one conditional ``UPDATE``: it moves ``cores``/``ram`` from free to allocated
only if they are still free. PostgreSQL re-evaluates the ``WHERE`` against the newest
row version when two transactions update the same node (READ COMMITTED), so concurrent
claims in any number of workers and API servers can never overcommit; SQLite serializes
writers.

A VM of a server group is placed holding the group's row lock (:func:`lock_group`): the
claims into one group take turns, each seeing the members every earlier one placed.
"""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import select, update

from vmapi.extensions import db
from vmapi.models import Node, ServerGroup
from vmapi.scheduler.filters import PlacementRequest


class NoSuchGroup(Exception):
    """The request's server group is gone (deleted after the request was checked)."""

    def __init__(self, group_id: int) -> None:
        self.group_id = group_id
        super().__init__(f"no server_group {group_id}")


def lock_group(request: PlacementRequest) -> PlacementRequest:
    """Lock the request's server group row (``SELECT ... FOR UPDATE``) until the
    transaction ends; the request with the group's policy as the locked row says.

    The lock is what makes a policy exact under races: the filters read the group's
    members on each node, and a concurrent claim into the same group could read them
    before this one's VM row is committed (READ COMMITTED), so two would pick the same
    node for anti-affinity. Holding the row, claims into one group run one after the
    other: the next one's statements start after this transaction committed its VM row
    (a create inserts it, a move sets its ``migration_node_id``, in the claim's
    transaction), and see it. Claims into other groups, or none, do not wait. The order
    is always quota row, then group row, then node rows: no deadlock between them."""
    if request.server_group_id is None:
        return request
    stmt = select(ServerGroup.policy).where(ServerGroup.id == request.server_group_id)
    policy = db.session.scalars(stmt.with_for_update()).first()
    if policy is None:
        raise NoSuchGroup(request.server_group_id)
    return replace(request, policy=policy)


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
