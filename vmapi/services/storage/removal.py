"""A volume removed with its disk and row: what ``DELETE /storage`` does to each volume,
and what a retry that takes a POST /storage Idempotency-Key over from a dead request
does to the volumes that request left unfinished.

A storage row is committed before its volume is made (so the row always says where the
volume is), and named ``building`` on its key's row in that commit; the key names it
``made`` only in the last commit of the request, once the volume is made and attached.
A row the key names building but not made, after its request is gone and the key was
taken over, is abandoned: nobody was answered with it. Its volume may or may not exist,
its disk may or may not be in the domain's definition (and live): the removal finds
out, as a delete does. The retry makes its own volume only once they are gone: on the
same VM, on the same node, it would otherwise be a second one.
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
    lock. If one cannot go (its node does not answer, its VM stays busy, its guest keeps
    the disk), its error is raised with a message that says so: the retry makes nothing
    (its volume would be a second one), and the key still names them for the next
    retry."""
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
                    if storage.boot:  # (a root disk comes with its VM, never /storage)
                        continue
                    ident = storage.id
                    remove_storage(storage, [])
                    log.warning("storage %s: not made when its request died; removed", ident)
        except ApiError as exc:
            db.session.rollback()
            log.warning("storage %s of vm-%s: not made when its request died; kept for the "
                        "next retry (%s)", storage_ids, vm_id, exc.message)  # fmt: skip
            exc.message = (
                f"Storage of vm-{vm_id} that the first request with this Idempotency-Key "
                "left unfinished could not be removed yet, so nothing was made "
                f"({exc.message}); retry with the same key."
            )
            raise
