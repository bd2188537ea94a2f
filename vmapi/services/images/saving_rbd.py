"""Saving a disk that is an RBD image (an rbd storage type): the image is made inside the
Ceph cluster, and no byte of it passes through the API host (vmapi's process or any tool
it runs), its image store, a node or HTTP: the flatten is a task of the cluster's
manager (its ``rbd_support`` module, :mod:`vmapi.hypervisor.rbd_tasks`), which the API
host queues and waits for.

Under the VM's lock, as every save (:mod:`vmapi.services.images.saving`), within
``IMAGE_SAVE_TIMEOUT``:

1. the image row, ``saving``, ``raw``, with the disk's size against the owner's quota
   (403 before anything is made), and its :class:`~vmapi.models.ImageRbd` row naming
   the RBD image it will be (``<installation>-image-<image id>`` in the disk's Ceph
   pool), committed together: whatever happens next, the rows say what to remove;
2. an RBD snapshot of the disk (with ``quiesce``, the guest's file systems frozen
   through its agent for that moment only), cloned by the API host's Ceph client and
   flattened into the new RBD image by the cluster's manager (waited for within the
   bound, beating the worker's heartbeat; a task still running at the bound is
   cancelled), the snapshot removed again; the new image gets its
   own protected snapshot, the parent of root disks cloned from it
   (:func:`vmapi.hypervisor.rbd.RbdClient.copy_flattened`);
3. under the image row's lock, ``active`` with its size.

Such an image lives in Ceph only (its ``file`` is null): VMs boot from it in the same
rbd type (a clone in a fraction of a second, as any image there), and it is deleted with
its RBD image. It cannot be downloaded nor boot on local storage (409
``image/not_active``, the message says why); save the VM to a local-qcow2 disk for that.
A failure at any step removes the new RBD image and the rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import current_app
from sqlalchemy import select

from vmapi import heartbeat
from vmapi.error_ids import IMAGE_QUOTA_EXCEEDED, VM_NO_GUEST_AGENT, not_found
from vmapi.errors import Conflict, NotFound
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, HypervisorTimeout, NoGuestAgent
from vmapi.models import Image, ImageRbd, StorageType
from vmapi.models.image import ACTIVE, SAVING
from vmapi.services.crud import Outcome
from vmapi.services.images.rbd_copies import SNAPSHOT, find_rbd_image_by_id
from vmapi.services.names import image_volume_name
from vmapi.services.nodes.domains import hypervisor_failure
from vmapi.services.nodes.hosts import hypervisor
from vmapi.services.quotas import check_storage_quota
from vmapi.services.storage.ceph import KeyUnreadable, key_unreadable, rbd_client
from vmapi.services.undo import Undo, run_undo

if TYPE_CHECKING:  # (a cycle otherwise: saving.py hands its saves on rbd here)
    from vmapi.services.images.saving import Saving


def save_rbd(saving: Saving, live: bool, quiesce: bool, deadline: float) -> Outcome[Image]:
    """The steps of the module's text; the caller holds the VM's lock."""
    disk, vm, host = saving.disk, saving.vm, saving.host
    storage_type = db.session.get(StorageType, disk.storage_type_id)
    try:
        client = rbd_client(storage_type)
    except KeyUnreadable as exc:
        raise key_unreadable(exc, storage_type) from exc
    image, row_id = reserve(saving, storage_type)
    image_id, pool, name = image.id, storage_type.ceph_pool or "", image_volume_name(image.id)
    undo = Undo()
    undo.push(f"forgetting image {image_id}", lambda: forget(image_id, row_id))
    frozen = False

    def thaw() -> None:
        nonlocal frozen
        if frozen:
            frozen = False
            hypervisor().thaw_filesystems(host.uri, vm.domain_name)

    step = "copying the disk in Ceph"
    try:
        if live and quiesce:
            step = "freezing the guest's file systems"
            hypervisor().freeze_filesystems(host.uri, vm.domain_name)
            frozen = True
            step = "copying the disk in Ceph"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HypervisorTimeout(host.uri, float(current_app.config["IMAGE_SAVE_TIMEOUT"]))
        undo.push(f"removing RBD image {pool}/{name}", lambda: client.remove_image(pool, name))
        size = client.copy_flattened(pool, disk.volume_name or "", name, SNAPSHOT, remaining,
                                     on_snapshot=thaw, beat=heartbeat.beat)  # fmt: skip
        thaw()
        image = activate(image_id, size)
    except NoGuestAgent as exc:
        run_undo(undo)
        raise Conflict(
            f"vm-{vm.id} has no guest agent that answers, so its file systems cannot be "
            "frozen; nothing was copied. Save without quiesce for a crash-consistent copy.",
            error_id=VM_NO_GUEST_AGENT,
        ) from exc
    except HypervisorError as exc:
        _thaw_quietly(thaw)
        run_undo(undo)
        raise hypervisor_failure(exc, step, host) from exc
    except BaseException:
        _thaw_quietly(thaw)
        run_undo(undo)
        raise
    return Outcome([image], [])


def _thaw_quietly(thaw: Callable[[], None]) -> None:
    with contextlib.suppress(HypervisorError):  # (logged; the copy's failure is the answer)
        thaw()


def reserve(saving: Saving, storage_type: StorageType) -> tuple[Image, int]:
    """The image row (``saving``, raw, the disk's size held against the quota) and the
    row of the RBD image it will be, committed together."""
    vm, disk = saving.vm, saving.disk
    check_storage_quota(vm.customer_id, disk.size, IMAGE_QUOTA_EXCEEDED)
    min_ram = None
    if disk.boot and disk.image_id is not None:
        min_ram = db.session.scalar(select(Image.min_ram).where(Image.id == disk.image_id))
    image = Image(name=saving.name, description=saving.description, format="raw",
                  state=SAVING, customer_id=vm.customer_id, size=disk.size, min_ram=min_ram,
                  kind=saving.kind, source_vm_id=vm.id,
                  source_storage_id=saving.source_storage_id)  # fmt: skip
    db.session.add(image)
    db.session.flush()
    row = ImageRbd(image_id=image.id, storage_type_id=storage_type.id,
                   ceph_pool=storage_type.ceph_pool or "", rbd_name=image_volume_name(image.id),
                   snapshot=SNAPSHOT)  # fmt: skip
    db.session.add(row)
    db.session.commit()
    return image, row.id


def forget(image_id: int, row_id: int) -> None:
    """Undo: the rows go (the RBD image's own undo ran first)."""
    db.session.rollback()
    row = find_rbd_image_by_id(row_id)
    if row is not None:
        db.session.delete(row)
    image = db.session.get(Image, image_id)
    if image is not None and image.state == SAVING:
        db.session.delete(image)
    db.session.commit()


def activate(image_id: int, size: int) -> Image:
    """Under the row's lock: still ``saving``, the real size within the quota; active."""
    db.session.rollback()
    image = db.session.scalars(select(Image).where(Image.id == image_id).with_for_update()).first()
    if image is None or image.state != SAVING:
        raise NotFound(f"Image {image_id} was deleted while it was being saved; nothing was kept.",
                       error_id=not_found("image"))  # fmt: skip
    image.size = None
    db.session.flush()
    check_storage_quota(image.customer_id, size, IMAGE_QUOTA_EXCEEDED)
    image.state = ACTIVE
    image.size = size
    image.virtual_size = size
    db.session.commit()
    return image
