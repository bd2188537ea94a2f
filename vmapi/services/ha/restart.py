"""Restarting a fenced node's HA VMs on other nodes: the evacuation
(:mod:`vmapi.services.moves.evacuation`), one VM at a time, all or nothing each.

Which VMs: those on the node with ``ha`` true (null: ``HA_DEFAULT``), highest
``ha_priority`` first (then by id). Each is made anew where the scheduler finds room
(its policies, its rbd types' reach): the same definition, UUID, MACs and addresses,
its volumes of shared storage types attached as they are (an RBD root disk is the same
clone: nothing lost). A root disk on local storage is rebuilt from the VM's image only
when its ``ha_local_disks`` is ``rebuild`` (what the guest wrote since is lost); with
``leave`` (the default) the VM stays down with its node and is reported. A VM with data
volumes on the node's local storage is never restarted (their data is on the dead node).
A VM the fleet has no room for yet is tried again in the next round.

A restart the target's lock manager refuses (``vm/disk_leased``: another host holds the
lease of a disk of the VM, so a QEMU there still has it open) proves the node is not off,
whatever its fence agent said: :class:`FencingContradicted` ends the node's restarts (the
watcher makes it ``fence_failed``). That VM's attempt was undone whole: it is still
recorded on the node (where it runs), nothing of it is left on the target.

A restart that died with its watcher left the VM's move marker set: it is settled first
(recorded where the domain runs, or undone), the dead node counted as holding nothing.
"""

from __future__ import annotations

from flask import current_app
from sqlalchemy import select

from vmapi.error_ids import VM_DISK_LEASED
from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Node, Vm
from vmapi.services.locks import vm_locks
from vmapi.services.moves.books import settle
from vmapi.services.moves.evacuation import EvacuationRefused, evacuate_one, start_evacuation
from vmapi.services.moves.move import moved_volumes

#: what a VM's line says when it is not restarted by policy (it stays so)
LEFT = "left down: its root disk is on the dead node's local storage (ha_local_disks: leave)"
LOCAL_DATA = "left down: its data volumes are on the dead node's local storage"


class FencingContradicted(Exception):
    """A restart was refused by the lock manager: the fenced node still holds a disk."""

    def __init__(self, lines: list[str], detail: str) -> None:
        self.lines, self.detail = lines, detail
        super().__init__(detail)


def ha_vms(node_id: int) -> list[Vm]:
    """The node's VMs to restart, in the order they are restarted."""
    default = bool(current_app.config["HA_DEFAULT"])
    wanted = Vm.ha.is_(True) if not default else Vm.ha.is_not(False)
    stmt = select(Vm).where(Vm.node_id == node_id, wanted)
    return list(db.session.scalars(stmt.order_by(Vm.ha_priority.desc(), Vm.id)))


def restart_fenced(node_id: int) -> list[str]:
    """Restart what is due of the fenced node's HA VMs; a line per VM not restarted or
    restarted now: ``"<vm id> <what became of it>"``."""
    node = db.session.get(Node, node_id)
    try:
        start_evacuation(node.fqdn)  # (offline: it takes no new VMs)
    except EvacuationRefused:  # it answers again: nothing is restarted from it
        db.session.rollback()
        return []
    lines = []
    for vm in ha_vms(node_id):
        vm_id = vm.id
        if vm.migration_node_id is not None:
            lines.append(f"{vm_id} {settle_dead(vm_id)}")
            if db.session.get(Vm, vm_id, populate_existing=True).node_id != node_id:
                continue  # recorded where the interrupted restart made it: done
        volumes = moved_volumes(vm_id)
        local = [v for v in volumes if not v.shared]
        if any(not v.storage.boot for v in local):
            lines.append(f"{vm_id} {LOCAL_DATA}")
            continue
        if local and vm.ha_local_disks != "rebuild":
            lines.append(f"{vm_id} {LEFT}")
            continue
        done = evacuate_one(vm_id, node_id, accept_data_loss=False)
        verb = "restarted" if done.rebuilt else "not restarted yet"
        lines.append(f"{vm_id} {verb}: {done.detail}")
        if done.error_id == VM_DISK_LEASED:
            db.session.commit()
            raise FencingContradicted(lines, f"vm-{vm_id}'s restart on another node was "
                                      f"refused: {done.detail}")  # fmt: skip
    db.session.commit()
    return lines


def settle_dead(vm_id: int) -> str:
    """Settle a restart that died part-way (its marker set), under the VM's lock."""
    try:
        with vm_locks([vm_id]):
            vm = db.session.get(Vm, vm_id, populate_existing=True)
            if vm is None or vm.migration_node_id is None:
                return "nothing to settle"
            return settle(vm, source_dead=True)
    except (ApiError, HypervisorError) as exc:
        db.session.rollback()
        return f"an interrupted restart could not be settled: {exc}"
