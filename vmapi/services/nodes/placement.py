"""Claiming capacity on a node for a VM: the scheduler's defaults, and the one answer
when a named node cannot take the VM (a create's ``node_id``, a move's target)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import current_app

from vmapi.error_ids import VM_NODE_UNSUITABLE
from vmapi.errors import Conflict
from vmapi.models import Node
from vmapi.scheduler import Defaults, PlacementRequest, claim, unsuitable_reasons


def scheduler_defaults() -> Defaults:
    cooloff = timedelta(seconds=current_app.config["LIBVIRT_COOLOFF"])
    return Defaults(
        down_since=datetime.now(UTC) - cooloff,
        interface_mode=current_app.config["INTERFACE_MODE"],
    )


def claim_named(
    node_id: int,
    request: PlacementRequest,
    defaults: Defaults,
    subject: str,
    reasons: list[str] | None = None,
) -> Node:
    """Claim the request's cores and RAM on the node ``node_id``, the node as the claim
    left it; 409 ``vm/node_unsuitable`` naming the filters it fails (``reasons``, when
    the caller has them already), or its capacity when a concurrent claim won.
    ``subject``: how the message names the VM ("this VM", "vm-7")."""
    if reasons is None:
        reasons = unsuitable_reasons(node_id, request, defaults)
    node = None if reasons else claim(node_id, request.cores, request.ram)
    if node is None:
        raise node_unsuitable(node_id, subject, reasons or ["enough_cores", "enough_ram"])
    return node


def node_unsuitable(node_id: int, subject: str, reasons: list[str]) -> Conflict:
    """409 ``vm/node_unsuitable``: the named node cannot take the VM, and why."""
    return Conflict(
        f"Node {node_id} cannot take {subject}: {', '.join(reasons)}.",
        error_id=VM_NODE_UNSUITABLE,
        data={"node": {"id": node_id}, "reasons": reasons},
    )
