"""``select_and_claim``: one filtering and weighing query, then a claim on the winner."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import and_, case, func, select, text

from vmapi.extensions import db
from vmapi.models import Node
from vmapi.scheduler.claims import claim, lock_group
from vmapi.scheduler.filters import FILTERS, Defaults, PlacementRequest, walks_index, weigh

CANDIDATES = 5  # nodes fetched per query; a lost claim race moves to the next
ATTEMPTS = 3  # queries before giving up on a fleet that keeps filling up under us


class NoValidHost(Exception):
    """No node passes the filters; ``details`` says how many each filter removed."""

    def __init__(self, details: dict[str, Any]) -> None:
        self.details = details
        super().__init__("no valid host")


def select_and_claim(request: PlacementRequest, d: Defaults, weigher: str = "spread") -> Node:
    """Pick the best node for ``request`` and claim its capacity; return the node.

    SQL (PostgreSQL), first:
        SELECT node.id FROM node WHERE <every filter>
        ORDER BY <weigher>[, holds the image DESC], node.id LIMIT 1
        FOR UPDATE OF node SKIP LOCKED
    The weigher's order is an index, so PostgreSQL reads nodes best-first and stops at
    the first that passes the filters and that no concurrent create is claiming; the
    claim then updates a row this transaction already holds. Concurrent creates so go
    to different nodes instead of queueing on the best one's row lock. Only when every
    suitable node is being claimed does it fall back to reading the best five without
    locking and waiting for one of them (a small fleet under a burst).

    Both queries run under :func:`index_walk`, so their plan is that walk whatever the
    planner's statistics say.

    A VM of a server group is placed holding the group's row lock
    (:func:`~vmapi.scheduler.claims.lock_group`, until the caller's transaction ends,
    after its VM row is written): the group's filters are then exact under races.
    """
    request = lock_group(request)
    conditions = [f(request, d) for _name, f in FILTERS]
    order = weigh(request, weigher)
    unclaimed = (
        select(Node.id)
        .where(and_(*conditions))
        .order_by(*order)
        .limit(1)
        .with_for_update(of=Node, skip_locked=True)
    )
    with index_walk(walks_index(request)):
        node_id = db.session.scalars(unclaimed).first()
    if node_id is not None and (node := claim(node_id, request.cores, request.ram)):
        return node
    for _attempt in range(ATTEMPTS):
        stmt = select(Node.id).where(and_(*conditions)).order_by(*order).limit(CANDIDATES)
        with index_walk(walks_index(request)):
            candidates = list(db.session.scalars(stmt))
        if not candidates:
            break
        for node_id in candidates:
            if node := claim(node_id, request.cores, request.ram):
                return node
    raise NoValidHost(explain(request, d))


@contextmanager
def index_walk(walk: bool = True) -> Iterator[None]:
    """PostgreSQL plans the scheduler's query as a walk of the weigher's index that stops
    at the first node passing the filters: sorting is off for it (``SET LOCAL``, this
    transaction only, and back to the default right after).

    Without this the plan depends on the statistics: on tables never analyzed, or
    analyzed while the fleet was small (autovacuum off, nodes registered in bulk), the
    filters look so selective that PostgreSQL expects one row and finds sorting every
    node cheaper than walking the index: 12-14 ms for 2,000 nodes against 1 ms. The
    walk reads the best nodes first whatever the statistics say, and checks each node
    it visits with index lookups (:func:`vmapi.scheduler.filters.per_node`, and
    ``ix_virt_node_method_node`` for its virt_method). Shown by
    ``tests/api/test_placement_plans.py``. SQLite has no planner settings; its fleets
    are small.

    ``walk=False``: an order that is no index walk (a soft-anti-affinity group's member
    count first): planned as PostgreSQL likes (with sorting off it would still sort, at
    a "disabled" cost that alone sets off JIT compilation).
    """
    if not walk or db.session.get_bind().dialect.name != "postgresql":
        yield
        return
    db.session.execute(text("SET LOCAL enable_sort = off"))
    yield
    # not reached after an error: the transaction is rolled back, and the setting with it
    db.session.execute(text("SET LOCAL enable_sort TO DEFAULT"))


def explain(request: PlacementRequest, d: Defaults) -> dict[str, Any]:
    """How many nodes each filter removed, applied in order (one query)."""
    columns = [func.count(Node.id)]
    passed = []
    for _name, f in FILTERS:
        passed.append(f(request, d))
        columns.append(func.coalesce(func.sum(case((and_(*passed), 1), else_=0)), 0))
    counts = db.session.execute(select(*columns)).one()
    removed = {}
    for index, (name, _f) in enumerate(FILTERS):
        removed[name] = int(counts[index]) - int(counts[index + 1])
    asked: dict[str, Any] = {"cores": request.cores, "ram": request.ram,
                             "virt_method": {"id": request.virt_method_id}}  # fmt: skip
    if request.server_group_id is not None:
        asked["server_group"] = {"id": request.server_group_id, "policy": request.policy}
    return {"nodes": int(counts[0]), "removed_by_filter": removed, "request": asked}


def unsuitable_reasons(node_id: int, request: PlacementRequest, d: Defaults) -> list[str]:
    """The filters a given node fails (empty when it fits). Called before a claim on a
    named node: a VM of a server group has the group's row locked first, as
    :func:`select_and_claim` has (the claim that follows in the transaction is exact)."""
    request = lock_group(request)
    columns = [f(request, d).label(name) for name, f in FILTERS]
    row = db.session.execute(select(*columns).where(Node.id == node_id)).one()
    return [name for name, _f in FILTERS if not getattr(row, name)]
