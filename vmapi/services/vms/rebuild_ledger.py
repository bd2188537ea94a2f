"""A rebuild's volumes in the leftover ledger (services/leftovers.py), and what reconcile
does with a rebuild whose worker died.

A rebuild (:mod:`.rebuild`) lists each volume it makes (the new root disk, the new
cloud-init seed) before making it, as a move lists what it makes on its target: a
process that dies part-way leaves a list, not a mystery. The entry says "made by a
rebuild of vm-N that has not finished", and from the moment the domain may be defined
with the new volumes, says so too. The commit that records the rebuild strikes the new
volumes off and lists the old ones ("replaced by the rebuild of vm-N"), deleted next;
one that cannot go stays listed, a plain leftover for ``reconcile --fix``.

Reconcile reports the entries of a rebuild that has not finished as
``interrupted_rebuild`` (never while the rebuild still runs: it holds the VM's lock),
and ``--fix`` undoes it under the VM's lock: the rows never recorded it, so the VM's
row names its root disk's image again, the root disk's row the old volume's size, the
domain is defined from the rows (its old root disk and seed) and, if it had been
defined with the new ones and runs, powered off and started on the old ones; then the
new volumes are deleted.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import current_app
from sqlalchemy import select

from vmapi.error_ids import VM_BUSY
from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import PAUSED, RUNNING, DomainNotFound, HypervisorError, VolumeNotFound
from vmapi.models import Leftover, Storage, VirtMethod, Vm
from vmapi.models.leftover import VOLUME
from vmapi.services.leftovers import (
    Left,
    delete_listed_volume,
    drop_leftover,
    find_leftover,
    note_leftover,
    remove_leftover,
)
from vmapi.services.locks import vm_locks
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.undo import Undo
from vmapi.services.vms.specs import domain_spec

UNFINISHED = "made by a rebuild of vm-{} that has not finished"
DEFINED = UNFINISHED + "; its domain was defined with it"
REPLACED = "replaced by the rebuild of vm-{}"


def unfinished(left: Leftover) -> bool:
    """Whether the entry lists a volume of a rebuild that has not finished."""
    return left.reason.startswith(UNFINISHED.split("{}", 1)[0])


class Listed:
    """A volume a rebuild makes, listed before it exists; its inverse (pushed at once)
    deletes it once it is made (``made``), else only strikes it off."""

    def __init__(self, host: Host, vm_id: int, pool: str, name: str, what: str,
                 undo: Undo) -> None:  # fmt: skip
        self.host, self.vm_id, self.pool, self.name = host, vm_id, pool, name
        self.made = False
        note_leftover(host.node.id, VOLUME, name, UNFINISHED.format(vm_id), vm_id, pool)
        db.session.commit()
        undo.push(f"deleting the new {what} {pool}/{name} on node {host.node.fqdn}",
                  self.remove, Left(host.node.id, VOLUME, name, vm_id, pool))  # fmt: skip

    def remove(self) -> None:
        if self.made:  # (a failure keeps the entry, with the step's name)
            delete_listed_volume(self.host, self.pool, self.name)
            return
        drop_leftover(self.host.node.id, VOLUME, self.name, self.pool)
        db.session.commit()


def defining(listed: list[Listed]) -> None:
    """The domain may be defined with the listed volumes from now on: their entries say
    so (reconcile then puts the domain back before deleting them)."""
    for volume in listed:
        entry = find_leftover(volume.host.node.id, VOLUME, volume.name, volume.pool)
        if entry is not None:
            entry.reason = DEFINED.format(volume.vm_id)
    db.session.commit()


def recorded(listed: list[Listed], replaced: list[tuple[str, str]], host: Host,
             vm_id: int) -> None:  # fmt: skip
    """In the transaction that records the rebuild: the new volumes are owned now, the
    replaced ones (pool, name) are leftovers until they are deleted."""
    for volume in listed:
        drop_leftover(host.node.id, VOLUME, volume.name, volume.pool)
    for pool, name in replaced:
        note_leftover(host.node.id, VOLUME, name, REPLACED.format(vm_id), vm_id, pool)


def interrupted(lefts: list[Leftover], host: Host | None,
                fix: bool) -> Iterator[tuple[str, str, bool]]:  # fmt: skip
    """For reconcile: each VM whose rebuild left ``lefts`` unfinished (entries of one
    node), as (VM, what is listed, fixed). A VM whose lock is taken is skipped: its
    rebuild is still running. ``host``: the node, None when it does not answer."""
    for vm_id in sorted({left.vm_id or 0 for left in lefts}):
        mine = [left for left in lefts if (left.vm_id or 0) == vm_id]
        detail = "new volumes " + ", ".join(f"{left.pool}/{left.name}" for left in mine)
        fixed = False
        try:
            with vm_locks([vm_id], wait=0):
                if host is None:
                    detail += "; the node does not answer"
                elif fix:
                    detail += f"; {settle(vm_id, host, mine)}"
                    fixed = True
        except ApiError as exc:
            if exc.error_id == VM_BUSY:  # its rebuild is still running
                continue
            db.session.rollback()
            detail += f"; not settled: {exc.message}"
        except HypervisorError as exc:
            db.session.rollback()
            detail += f"; not settled: {exc.reason}"
        yield f"vm-{vm_id}", detail, fixed


def settle(vm_id: int, host: Host, lefts: list[Leftover]) -> str:
    """Undo the unfinished rebuild of ``vm_id`` whose volumes ``lefts`` lists on
    ``host`` (the caller holds the VM's lock); what was done."""
    done = []
    vm = db.session.get(Vm, vm_id)
    if vm is not None and vm.node_id == host.node.id:
        done += _restore_rows(vm, host)
        if any(left.reason == DEFINED.format(vm_id) for left in lefts):
            done += _restore_domain(vm, host)
    for left in lefts:
        remove_leftover(left, host)
    done.append("the new volumes deleted")
    return "undone: " + ", ".join(done)


def _restore_rows(vm: Vm, host: Host) -> list[str]:
    """The VM's image and its root disk's size as its old root disk has them."""
    stmt = select(Storage).where(Storage.vm_id == vm.id, Storage.boot.is_(True))
    root = db.session.scalars(stmt).first()
    if root is None or root.volume_name is None:
        return []
    done = []
    if vm.image_id != root.image_id:
        vm.image_id = root.image_id
        done.append(f"vm-{vm.id} boots from image {root.image_id} again")
    try:
        capacity = hypervisor().volume(host.uri, root.pool, root.volume_name)[1]
    except VolumeNotFound:
        capacity = root.size
    if capacity < root.size:  # (a rebuild to a larger disk counted it before making it)
        root.size = capacity
        done.append(f"storage {root.id} back to {capacity} bytes")
    db.session.commit()
    return done


def _restore_domain(vm: Vm, host: Host) -> list[str]:
    """The domain defined from the rows; restarted on them if it runs (on the new
    disks, maybe)."""
    driver = hypervisor()
    try:
        state = driver.domain(host.uri, vm.domain_name).state
    except DomainNotFound:
        return []
    method = db.session.get(VirtMethod, vm.virt_method_id)
    driver.define(host.uri, domain_spec(vm, method, host.node, current_app.config))
    if state not in (RUNNING, PAUSED):
        return ["its domain defined with its old root disk"]
    driver.destroy(host.uri, vm.domain_name)
    driver.start(host.uri, vm.domain_name)
    return ["its domain restarted on its old root disk"]
