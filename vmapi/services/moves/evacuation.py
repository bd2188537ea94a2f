"""Evacuating a node that is down: ``flask vmapi node evacuate FQDN [--accept-data-loss]``.

Only for a node the health check finds unreachable (``unreachable_since``): a node that
answers is drained instead. The node goes ``offline`` (it takes no new VMs), then each of
its VMs is made anew on the node the scheduler picks, from the database: the same
definition, UUID, MACs and addresses; volumes of shared pools as they are; a VM booted
from an image gets a new root disk from its image (and its seed). Nothing of the dead
node can be copied, so a VM with data volumes there is refused unless the admin accepts
the loss (it gets empty volumes of the same sizes). Every rebuild is all or nothing; what
the dead node keeps (its domains and volumes) is listed as leftovers, which
``flask vmapi reconcile --fix`` removes once it answers again.

The node must really be down (powered off or fenced) before its VMs are started
elsewhere: vmapi cannot tell a dead host from one it merely cannot reach.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select, update

from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import PAUSED, RUNNING, HypervisorError
from vmapi.models import Node, NodeState, VirtMethod, Vm, VmState
from vmapi.models.leftover import DOMAIN
from vmapi.services import audit
from vmapi.services.leftovers import Left
from vmapi.services.locks import vm_locks
from vmapi.services.moves.books import claim_target, record, release_target
from vmapi.services.moves.move import EVACUATE, Move, MovedVolume, moved_volumes
from vmapi.services.moves.volumes import prepare_target
from vmapi.services.nodes.domains import BUILDING, hypervisor_failure, remove_domain
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.undo import Undo, run_undo
from vmapi.services.vms.specs import domain_spec
from vmapi.telemetry import count_migration

OFFLINE = "offline"


class EvacuationRefused(Exception):
    """The node cannot be evacuated (unknown, or it answers)."""


@dataclass
class Evacuated:
    """What became of one VM of the evacuated node."""

    vm_id: int
    rebuilt: bool
    detail: str
    #: the error id of a failed rebuild (None: rebuilt, or not tried)
    error_id: str | None = None

    def line(self) -> str:
        return f"{'rebuilt' if self.rebuilt else 'NOT rebuilt':11}  vm-{self.vm_id}: {self.detail}"


def start_evacuation(fqdn: str) -> tuple[Node, list[int]]:
    """Put the dead node ``offline``; it and its VMs in id order."""
    node = db.session.scalars(select(Node).where(Node.fqdn == fqdn)).first()
    if node is None:
        raise EvacuationRefused(f"no node {fqdn}")
    if node.unreachable_since is None:
        raise EvacuationRefused(
            f"{fqdn} is not down: its last health check reached it (unreachable_since is "
            "not set). Drain a node that answers (flask vmapi node drain); run flask vmapi "
            "node check to record a node that does not."
        )
    offline = db.session.scalars(select(NodeState.id).where(NodeState.name == OFFLINE)).one()
    if node.node_state_id != offline:
        audit.record(db.session, "node", node.id, "update", {"node_state_id": node.node_state_id},
                     {"node_state_id": offline})  # fmt: skip
        db.session.execute(update(Node).where(Node.id == node.id).values(node_state_id=offline))
        db.session.commit()
    vms = db.session.scalars(select(Vm.id).where(Vm.node_id == node.id).order_by(Vm.id))
    return node, list(vms)


def evacuate_one(vm_id: int, node_id: int, accept_data_loss: bool) -> Evacuated:
    """Make one VM of the dead node anew elsewhere, all or nothing, under its lock."""
    started = time.monotonic()
    try:
        with vm_locks([vm_id]):
            done = _evacuate(vm_id, node_id, accept_data_loss, started)
    except ApiError as exc:
        count_migration(EVACUATE, exc.error_id, time.monotonic() - started)
        audit.record_failure("vm", vm_id, EVACUATE, exc.error_id, exc.status_code)
        return Evacuated(vm_id, False, f"{exc.error_id}: {exc.message}", exc.error_id)
    if done.rebuilt:
        count_migration(EVACUATE, "ok", time.monotonic() - started)
    return done


def _evacuate(vm_id: int, node_id: int, accept_data_loss: bool, started: float) -> Evacuated:
    vm = db.session.get(Vm, vm_id, populate_existing=True)
    if vm is None or vm.node_id != node_id:
        return Evacuated(vm_id, True, "no longer on the node. Nothing to do.")
    state = db.session.get(VmState, vm.vm_state_id).name
    if state == BUILDING:
        return Evacuated(vm_id, False, "still building: its request died with the node; "
                                       "flask vmapi reconcile --fix removes it")  # fmt: skip
    if vm.migration_node_id is not None:
        return Evacuated(vm_id, False, "a move of it was interrupted; settle it with flask "
                                       "vmapi reconcile --fix first")  # fmt: skip
    volumes = moved_volumes(vm.id)
    lost = [v.storage.id for v in volumes if not v.shared and not rebuilt_from_image(v)]
    if lost and not accept_data_loss:
        return Evacuated(vm_id, False, f"its storage {lost} is on the dead node and would be "
                                       "lost; --accept-data-loss makes it anew, empty")  # fmt: skip
    source = Host.of(node_id)
    claimed = claim_target(vm, None)
    target = Host.of(claimed.id)
    move = Move(vm, source, target, EVACUATE, volumes, started=started,
                deadline=started + float(current_app.config["MIGRATION_TIMEOUT"]))  # fmt: skip
    undo = Undo()
    undo.push(f"releasing the claim of vm-{vm.id} on node {claimed.fqdn}",
              lambda: release_target(vm, claimed.id))  # fmt: skip
    try:
        prepare_target(move, undo)
        after = rebuild(move, state, undo)
    except BaseException:
        run_undo(undo)
        raise
    record(move, after)
    lost_note = f"; storage {lost} made anew, empty" if lost else ""
    return Evacuated(vm_id, True, f"on {target.node.fqdn} ({after}){lost_note}")


def rebuilt_from_image(volume: MovedVolume) -> bool:
    """A root disk: made anew from the VM's image, what the image holds comes back (what
    the guest wrote on it since is lost, as with any rebuild from an image)."""
    return volume.storage.boot


def rebuild(move: Move, state: str, undo: Undo) -> str:
    """Define the VM's domain on the target from the database (with its volumes there)
    and start it if it was running or paused; the state libvirt reports."""
    vm, target, driver = move.vm, move.target, hypervisor()
    method = db.session.get(VirtMethod, vm.virt_method_id)
    spec = domain_spec(vm, method, target.node, current_app.config)
    paths = {v.storage.path: v.target_path for v in move.volumes}
    disks = tuple(dataclasses.replace(d, path=paths.get(d.path, d.path)) for d in spec.disks)
    seed = spec.seed and dataclasses.replace(spec.seed, path=move.seed_path or spec.seed.path)
    spec = dataclasses.replace(spec, disks=disks, console_log=move.console_log, seed=seed)
    step = "defining the domain on the target"
    try:
        driver.define(target.uri, spec)
        name = vm.domain_name
        undo.push(f"removing domain {name} from node {target.node.fqdn}",
                  lambda: remove_domain(target, name),
                  Left(target.node.id, DOMAIN, name, vm.id))  # fmt: skip
        if state in (RUNNING, PAUSED):
            step = "starting the domain on the target"
            driver.start(target.uri, vm.domain_name)
        step = "reading the domain's state on the target"
        return driver.domain(target.uri, vm.domain_name).state
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, target) from exc
