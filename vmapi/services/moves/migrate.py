"""Moving VMs: ``POST /vm/<id>/migrate`` and ``flask vmapi node drain`` (evacuating a
dead node is :mod:`vmapi.services.moves.evacuation`).

A move, under the VM's lock and within MIGRATION_TIMEOUT (services/moves/books.py has the
steps): claim the target through the scheduler and commit; make the VM's volumes there
(unless their pool is shared); move the domain, live (running or paused: it stays
paused) with its disks copied by libvirt, or cold (shut off: the volumes were copied
through the streams, only the definition moves); record where it all is; delete what
the domain left on the source. A failure before the domain has moved undoes every step
(the VM runs on where it was; no claim, volume or domain is left on the target) and the
answer names the step; past the deadline libvirt's job is aborted (504). Once the
domain has moved, the move is recorded whatever else fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select, update

from vmapi.auth import Principal
from vmapi.error_ids import VM_HYPERVISOR_TIMEOUT, VM_STATE_CONFLICT, not_found
from vmapi.errors import ApiError, Conflict, HypervisorTimedOut, NotFound
from vmapi.extensions import db
from vmapi.hypervisor import (
    PAUSED,
    RUNNING,
    SHUTOFF,
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
)
from vmapi.models import Node, NodeState, Vm, VmState
from vmapi.services import audit
from vmapi.services.crud import Outcome
from vmapi.services.locks import vm_locks
from vmapi.services.moves.books import (
    claim_target,
    migration_uri,
    record,
    release_target,
    settle,
)
from vmapi.services.moves.move import COLD, LIVE, Move, moved_volumes
from vmapi.services.moves.volumes import (
    prepare_target,
    remove_source_leftovers,
)
from vmapi.services.nodes.domains import BUILDING, hypervisor_failure
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.undo import Undo, run_undo
from vmapi.services.vms.rows import VmRows
from vmapi.services.vms.specs import sealed_display
from vmapi.telemetry import count_migration

MOVING = "moving the domain"
MAINTENANCE = "maintenance"


def migrate_vm(
    ident: int,
    principal: Principal,
    node: int | None = None,
    live: bool = True,
    timeout: float | None = None,
    from_node: int | None = None,
) -> Outcome[Vm]:
    """Move VM ``ident`` to ``node`` (None: the scheduler picks one), all or nothing,
    within ``timeout`` seconds (default MIGRATION_TIMEOUT). ``from_node``: only if the
    VM is there (a drain), else :class:`NotThere`."""
    seconds = float(timeout or current_app.config["MIGRATION_TIMEOUT"])
    started = time.monotonic()
    kind = LIVE if live else COLD
    try:
        with vm_locks([ident]):
            vm = VmRows().get(ident, principal)
            messages = []
            if vm.migration_node_id is not None:
                was = vm.node_id
                messages.append(settle_interrupted(vm))
                if vm.node_id != was and node in (None, vm.node_id):
                    return Outcome(VmRows().loaded([vm]), messages)  # it has moved
            if from_node is not None and vm.node_id != from_node:
                raise NotThere(f"vm-{vm.id} is no longer on node {from_node}.")
            source = Host.of(vm.node_id)
            kind = kind_of_move(vm, source, live)
            claimed = claim_target(vm, node)
            move = Move(vm, source, Host.of(claimed.id), kind, moved_volumes(vm.id),
                        deadline=started + seconds, started=started)  # fmt: skip
            undo = Undo()
            undo.push(f"releasing the claim of vm-{vm.id} on node {claimed.fqdn}",
                      lambda: release_target(vm, claimed.id))  # fmt: skip
            try:
                prepare_target(move, undo)
                move_domain(move)
            except BaseException:
                run_undo(undo)
                raise
            record(move, confirm(move))
            messages += [*move.messages, *remove_source_leftovers(move), summary(move)]
    except ApiError as exc:
        count_migration(kind, exc.error_id, time.monotonic() - started)
        raise
    count_migration(kind, "ok", time.monotonic() - started)
    return Outcome(VmRows().loaded([vm]), messages)


class NotThere(Exception):
    """The VM is not (or no longer) on the node a drain empties."""


def settle_interrupted(vm: Vm) -> str:
    """An earlier move of the VM died part-way (we hold the VM's lock, so its process is
    gone): finish or undo it first."""
    try:
        return f"vm-{vm.id}: {settle(vm)}."
    except HypervisorError as exc:
        host = Host.of(vm.migration_node_id)
        raise hypervisor_failure(exc, "settling an interrupted move", host) from exc


def kind_of_move(vm: Vm, source: Host, live: bool) -> str:
    """Live for a running or paused domain, cold for a shut-off one; 409 otherwise."""
    stored = db.session.get(VmState, vm.vm_state_id).name
    if stored == BUILDING:
        raise Conflict(f"vm-{vm.id} is still being built.", error_id=VM_STATE_CONFLICT)
    try:
        state = hypervisor().domain(source.uri, vm.domain_name).state
    except DomainNotFound as exc:
        raise Conflict(
            f"vm-{vm.id} has no domain on {source.node.fqdn}; `flask vmapi reconcile` tells "
            "more. Nothing moved.",
            error_id=VM_STATE_CONFLICT,
        ) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, "reading the domain's state", source) from exc
    if state in (RUNNING, PAUSED):
        if not live:
            raise Conflict(
                f"vm-{vm.id} is {state}: it moves live only. Shut it off first to move it cold.",
                error_id=VM_STATE_CONFLICT,
                data={"state": state},
            )
        return LIVE
    if state == SHUTOFF:
        return COLD
    raise Conflict(
        f"vm-{vm.id} is {state}; only a running, paused or shut-off VM moves. Power it off first.",
        error_id=VM_STATE_CONFLICT,
        data={"state": state},
    )


def move_domain(move: Move) -> None:
    """Hand the domain to the target's libvirtd: live with its disks copied into the
    volumes made there (those of shared pools stay), or cold (the definition only; the
    volumes were copied). The target gets its own display address and a sealed display
    password."""
    vm, source, target = move.vm, move.source, move.target
    live = move.kind == LIVE
    remaining = move.remaining()
    copied = {v.storage.path: v.target_path for v in move.copied if v.storage.path}
    paths = dict(copied)
    if move.seed_path is not None and vm.seed_path is not None:
        paths[vm.seed_path] = move.seed_path  # read-only: pointed at, never copied
    try:
        if remaining <= 0:
            raise HypervisorTimeout(source.uri, 0)
        hypervisor().migrate(
            source.uri,
            vm.domain_name,
            migration_uri(target.node),
            timeout=remaining,
            live=live,
            migration_address=target.node.migration_address if live else None,
            copy_storage=live and bool(copied),
            disk_paths=paths or None,
            unchecked_storage=any(v.shared for v in move.volumes),
            display=sealed_display(target.node, current_app.config),
            # a root disk was made on the target's own copy of its image: its top layer
            # is all that travels
            incremental=any(v.storage.boot for v in move.copied),
            console_log=move.console_log,
        )
    except HypervisorTimeout as exc:
        limit = current_app.config["MIGRATION_TIMEOUT"]
        raise HypervisorTimedOut(
            f"vm-{vm.id} did not move to {target.node.fqdn} in time (the move may take "
            f"{limit:g} s): libvirt's migration job was aborted, the VM keeps running on "
            f"{source.node.fqdn} and nothing is left on {target.node.fqdn}.",
            error_id=VM_HYPERVISOR_TIMEOUT,
            data={"step": MOVING, "node": {"id": source.node.id},
                  "target": {"id": target.node.id}, "reason": exc.reason},
        ) from exc  # fmt: skip
    except HypervisorError as exc:
        # the source could not reach the target: the target is the one in trouble
        at = target if isinstance(exc, HypervisorUnavailable) and exc.uri != source.uri else source
        error = hypervisor_failure(exc, MOVING, at)
        error.message += f"; vm-{vm.id} stays on {source.node.fqdn} and the move was undone."
        error.data = {**error.data, "target": {"id": target.node.id}}
        raise error from exc


def confirm(move: Move) -> str | None:
    """The domain's state on the target (None when it cannot be read: the stored one is
    kept) and a live move's downtime, as libvirt reports them."""
    driver, target = hypervisor(), move.target
    try:
        state = driver.domain(target.uri, move.vm.domain_name).state
    except HypervisorError as exc:
        move.messages.append(f"Its state on {target.node.fqdn} could not be read: {exc.reason}.")
        return None
    if move.kind == LIVE:
        try:
            stats = driver.last_migration(target.uri, move.vm.domain_name)
        except HypervisorError:
            stats = None  # only for the answer's note
        move.downtime = stats.downtime if stats is not None else None
    return state


def summary(move: Move) -> str:
    seconds = time.monotonic() - move.started
    text = (f"vm-{move.vm.id} moved {move.kind} from {move.source.node.fqdn} to "
            f"{move.target.node.fqdn} in {seconds:.1f} s")  # fmt: skip
    if move.downtime is not None:
        text += f", paused for {move.downtime * 1000:.0f} ms at the switch-over"
    return text + "."


# ---------------------------------------------------------------------- drain
@dataclass
class Drained:
    """What became of one VM of a drained node."""

    vm_id: int
    moved: bool
    detail: str  # the target and how, or why not

    def line(self) -> str:
        return f"{'moved' if self.moved else 'NOT moved':9}  vm-{self.vm_id}: {self.detail}"


def start_drain(fqdn: str) -> tuple[Node, list[int]]:
    """Put the node in ``maintenance`` (unless it is already in a state that takes no new
    VMs); the node and its VMs in id order. Safe to call again: it picks up where an
    earlier drain stopped."""
    node = db.session.scalars(select(Node).where(Node.fqdn == fqdn)).first()
    if node is None:
        raise NotFound(f"No node {fqdn}.", error_id=not_found("node"))
    state = db.session.get(NodeState, node.node_state_id)
    if state.schedulable:
        maintenance = db.session.scalars(
            select(NodeState.id).where(NodeState.name == MAINTENANCE)
        ).one()
        db.session.execute(update(Node).where(Node.id == node.id).values(node_state_id=maintenance))
        audit.record(db.session, "node", node.id, "update", {"node_state_id": state.id},
                     {"node_state_id": maintenance})  # fmt: skip
        db.session.commit()
    vms = db.session.scalars(select(Vm.id).where(Vm.node_id == node.id).order_by(Vm.id))
    return node, list(vms)


def drain_one(vm_id: int, node_id: int, principal: Principal, timeout: float | None) -> Drained:
    """Move one VM of a draining node wherever the scheduler says; never raises for a VM
    that cannot move (the refusal is audited, like an API request's)."""
    try:
        outcome = migrate_vm(vm_id, principal, timeout=timeout, from_node=node_id)
    except NotThere as exc:
        return Drained(vm_id, True, f"{exc} Nothing to do.")
    except NotFound as exc:
        if exc.error_id != not_found("vm"):
            raise
        return Drained(vm_id, True, "deleted meanwhile. Nothing to do.")
    except ApiError as exc:
        audit.record_failure("vm", vm_id, "migrate", exc.error_id, exc.status_code)
        return Drained(vm_id, False, f"{exc.error_id}: {exc.message}")
    return Drained(vm_id, True, outcome.messages[-1])
