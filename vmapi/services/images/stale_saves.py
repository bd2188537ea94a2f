"""What a save that died part-way left (:mod:`vmapi.services.images.saving`): its
``saving`` image row, perhaps a block copy still mirroring the disk into the temporary
copy, and the copy itself (listed in the leftovers ledger before it was made).

A save is bounded by IMAGE_SAVE_TIMEOUT and dies with its worker, so a ``saving`` row
older than twice that (:func:`~vmapi.services.leftovers.stale_before`) has no process
behind it. :func:`sweep` ends the block job on the source disk when the VM is still
there and free (no other operation holds its lock), forgets the row, and leaves the copy
to the ledger, which ``reconcile --fix`` works through (a copy of a save no longer in
flight is owned by nobody).
"""

from __future__ import annotations

from sqlalchemy import select

from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Image, Storage, Vm
from vmapi.models.image import SAVING
from vmapi.services.images import rbd_copies
from vmapi.services.leftovers import stale_before
from vmapi.services.locks import vm_locks
from vmapi.services.nodes.hosts import Host, hypervisor


def stale_images() -> list[Image]:
    stmt = select(Image).where(Image.state == SAVING, Image.created_at < stale_before())
    return list(db.session.scalars(stmt.order_by(Image.id)))


def sweep() -> list[str]:
    """Clean up after every save that died part-way; what was done, one line each."""
    return [forget_stale(image) for image in stale_images()]


def forget_stale(image: Image) -> str:
    """Clean up after one save that died part-way (its copy job ended, its row
    forgotten); what was done."""
    ident, when = image.id, f"{image.created_at:%Y-%m-%d %H:%M}"
    note = end_copy_job(image)
    in_ceph = rbd_copies.forget_image(ident)  # a save on RBD: the image it was making
    db.session.delete(image)
    db.session.commit()
    kept = rbd_copies.remove_orphans(in_ceph) if in_ceph else []
    note += "".join(f"; {line}" for line in kept)
    return f"image {ident}: a save that died part-way ({when} UTC) was forgotten{note}"


def end_copy_job(image: Image) -> str:
    """End a block copy the dead save may have left on its source disk; what was found."""
    vm = db.session.get(Vm, image.source_vm_id) if image.source_vm_id is not None else None
    if vm is None or vm.domain_name is None:
        return ""
    stmt = select(Storage).where(Storage.vm_id == vm.id)
    if image.source_storage_id is not None:
        stmt = stmt.where(Storage.id == image.source_storage_id)
    else:
        stmt = stmt.where(Storage.boot.is_(True))
    disk = db.session.scalars(stmt).first()
    if disk is None:
        return ""
    host = Host.of(vm.node_id)
    try:
        with vm_locks([vm.id], wait=0):
            ended = hypervisor().abort_disk_copy(host.uri, vm.domain_name, disk.target)
    except Conflict:
        return f"; vm-{vm.id} is busy, its disk {disk.target} was not checked for a copy job"
    except HypervisorError as exc:
        return f"; node {host.node.fqdn} failed ({exc.reason}): disk {disk.target} not checked"
    return f"; the copy job on vm-{vm.id}'s disk {disk.target} was ended" if ended else ""
