"""A volume removed with its disk and row: what ``DELETE /storage`` does to each volume,
and what a retry that takes a POST /storage Idempotency-Key over from a dead request
does to the volumes that request left unfinished.

A storage row is committed before its volume is made (so the row always says where the
volume is), and named ``building`` on its key's row in that commit; the key names it
``made`` only in the last commit of the request, once the volume is made and attached.
A row the key names building but not made, after its request is gone and the key was
taken over, is abandoned: nobody was answered with it. Its volume may or may not exist,
its disk may or may not be in the domain's definition (and live): the removal finds
out, as a delete does.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Storage
from vmapi.services.locks import vm_locks
from vmapi.services.nodes.domains import hypervisor_failure
from vmapi.services.nodes.hosts import hypervisor
from vmapi.services.storage.disks import AttachedVolume, detach, vms_of
from vmapi.services.storage.volumes import delete_volume
from vmapi.services.undo import Undo, run_undo

log = logging.getLogger(__name__)


def remove_storage(storage: Storage, messages: list[str]) -> None:
    """Detach the volume from its running domain, define the domain without it, delete
    the volume, then the row (committed); the caller holds the VM's lock. A failure
    puts the disk back as it was (409 ``storage/detach_failed``, or the node's error
    with its step) and keeps the row."""
    undo = Undo()
    disk = AttachedVolume(storage)
    driver = hypervisor()
    step = "detaching the disk"
    try:
        try:
            detach(disk, messages, undo)
            step = "redefining the domain"
            driver.define(disk.host.uri, disk.domain(without=True))
            name = f"redefining {disk.vm.domain_name} with storage {storage.id} again"
            undo.push(name, lambda: driver.define(disk.host.uri, disk.domain()))
            step = "deleting the volume"
            if not delete_volume(storage, disk.host):
                messages.append(f"The volume of storage {storage.id} was already gone.")
        except HypervisorError as exc:
            raise hypervisor_failure(exc, step, disk.host) from exc
    except BaseException:
        run_undo(undo)
        raise
    db.session.delete(storage)
    db.session.commit()


def remove_abandoned(storage_ids: list[int]) -> None:
    """Remove the abandoned storage ``storage_ids`` (module doc), each under its VM's
    lock. One whose node does not answer (or whose VM stays busy, or whose guest keeps
    the disk) stays as it is, logged: an ordinary volume of its VM, which
    ``DELETE /storage/<id>`` removes."""
    if not storage_ids:
        return
    vms = sorted(set(vms_of(storage_ids)))
    db.session.commit()  # nothing stays open while the locks are waited for
    for vm_id in vms:
        try:
            with vm_locks([vm_id]):
                # read under the lock: what the VM holds now
                stmt = select(Storage).where(Storage.id.in_(storage_ids), Storage.vm_id == vm_id)
                for storage in db.session.scalars(stmt.order_by(Storage.id)).all():
                    if not storage.boot:  # (a root disk comes with its VM, never /storage)
                        _remove_one(storage)
        except ApiError as exc:  # vm/busy: another operation holds the VM
            db.session.rollback()
            log.warning("storage %s of vm-%s: not made when its request died; left as it is "
                        "(%s)", storage_ids, vm_id, exc.message)  # fmt: skip


def _remove_one(storage: Storage) -> None:
    ident = storage.id
    try:
        remove_storage(storage, [])
    except (ApiError, HypervisorError) as exc:
        db.session.rollback()
        log.warning("storage %s: not made when its request died; left as it is (%s)",
                    ident, getattr(exc, "message", exc))  # fmt: skip
        return
    log.warning("storage %s: not made when its request died; removed", ident)
