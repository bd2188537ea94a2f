"""Images saved from disks: ``POST /vm/<id>/image`` (the root disk) and
``POST /storage/<id>/image`` (a data volume), and the backups of ``flask vmapi backup``.

A saved image is an image like an upload: a file in the store, ``active`` once whole,
listed, downloaded, booted, counted in the owner's storage quota. How its file is made,
under the VM's lock (one operation at a time per VM: a move, a resize or another save
waits or answers 409 ``vm/busy``) and within ``IMAGE_SAVE_TIMEOUT``:

1. the image row, ``saving``, with the disk's estimated size, so the quota check (made
   under the quota row's lock, 403 before anything is copied) counts saves in flight;
2. a flattened, standalone qcow2 copy on the node, in the disk's pool, named
   ``<installation>-save-<image id>`` and listed in the leftovers ledger before it is
   made: for a running (or paused) domain a block copy ended without a pivot
   (:meth:`~vmapi.hypervisor.HypervisorDriver.copy_disk_live`: the guest never pauses,
   its disk chain is never changed), with ``quiesce`` its file systems frozen through
   its agent for that moment; for a shut-off one a copy of the volume
   (:meth:`~vmapi.hypervisor.HypervisorDriver.clone_volume`);
3. the copy downloaded through libvirt into the store (a temporary file, hashed as it
   arrives) and checked as an upload is (qcow2, no backing file);
4. under the image row's lock, the file renamed into place and the row made ``active``
   with its real size (the quota checked again); then the copy on the node deleted.

Any failure before 4 plays the undo stack backwards: no copy on the node, no file, no
row; the domain never left its disk. A process killed part-way leaves a ``saving`` row
and a listed copy: :func:`sweep_stale` (``reconcile --fix`` and every backup run)
removes both once the save's time has passed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select

from vmapi import heartbeat
from vmapi.auth import Principal
from vmapi.error_ids import (
    IMAGE_INVALID,
    IMAGE_QUOTA_EXCEEDED,
    VM_NO_GUEST_AGENT,
    VM_NO_ROOT_DISK,
    VM_STATE_CONFLICT,
    not_found,
)
from vmapi.errors import BodyTooLarge, Conflict, NotFound, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import (
    PAUSED,
    RUNNING,
    SHUTOFF,
    HypervisorError,
    HypervisorTimeout,
    NameTaken,
    NoGuestAgent,
    NotSupported,
    VolumeNotFound,
)
from vmapi.models import Image, Storage, StorageType, Vm
from vmapi.models.catalog import RBD
from vmapi.models.image import ACTIVE, SAVING, SNAPSHOT
from vmapi.models.leftover import VOLUME
from vmapi.services.crud import Outcome
from vmapi.services.images import store
from vmapi.services.images.catalog import image_dir
from vmapi.services.images.inspection import ImageRefused, inspect
from vmapi.services.images.saving_rbd import save_rbd
from vmapi.services.leftovers import (
    Left,
    drop_leftover,
    find_leftover,
    note_leftover,
)
from vmapi.services.locks import vm_locks
from vmapi.services.names import save_volume_name
from vmapi.services.nodes.domains import hypervisor_failure, name_taken
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.quotas import check_storage_quota
from vmapi.services.undo import Undo, run_undo
from vmapi.services.vms.rows import VmRows

log = logging.getLogger(__name__)

CONSISTENCY = {
    "quiesced": "quiesced: the guest's file systems were frozen through its agent for the copy",
    "crash": "crash-consistent: the disk as a power cut would have left it (send quiesce: true "
    "with a guest agent running for a file-system-consistent copy)",
    "offline": "consistent: the VM was shut off, its disk was copied as it is",
}


@dataclass(frozen=True)
class Saving:
    """What one save copies: a disk of a VM, and what the image records of its source."""

    vm: Vm
    disk: Storage
    host: Host
    name: str
    description: str | None
    kind: str
    source_storage_id: int | None  # None: the VM's root disk


# ---------------------------------------------------------------------- entry points
def save_vm(
    ident: int,
    principal: Principal,
    name: str,
    description: str | None = None,
    quiesce: bool = False,
    kind: str = SNAPSHOT,
) -> Outcome[Image]:
    """``POST /vm/<id>/image``: an image of the VM's root disk as it is now."""
    with vm_locks([ident]):
        vm = VmRows().get(ident, principal)
        root = db.session.scalars(
            select(Storage).where(Storage.vm_id == vm.id, Storage.boot.is_(True))
        ).first()
        if root is None:
            raise Conflict(
                f"vm-{vm.id} was made without an image: it has no root disk to save. Save its "
                "volumes with POST /storage/<id>/image.",
                error_id=VM_NO_ROOT_DISK,
            )
        return save(Saving(vm, root, Host.of(vm.node_id), name, description, kind, None),
                    quiesce)  # fmt: skip


def save_storage(
    ident: int,
    principal: Principal,
    name: str,
    description: str | None = None,
    quiesce: bool = False,
) -> Outcome[Image]:
    """``POST /storage/<id>/image``: an image of a volume as it is now."""
    disk = visible_storage(ident, principal)
    with vm_locks([disk.vm_id]):
        disk = visible_storage(ident, principal)  # it may have moved to another VM
        vm = db.session.get(Vm, disk.vm_id)
        return save(Saving(vm, disk, Host.of(disk.node_id), name, description, SNAPSHOT,
                           disk.id), quiesce)  # fmt: skip


def visible_storage(ident: int, principal: Principal) -> Storage:
    stmt = select(Storage).where(Storage.id == ident).execution_options(populate_existing=True)
    if not principal.is_admin:
        stmt = stmt.join(Vm, Vm.id == Storage.vm_id).where(Vm.customer_id == principal.customer_id)
    found = db.session.scalars(stmt).first()
    if found is None:
        raise NotFound(f"storage {ident} does not exist.", error_id=not_found("storage"))
    return found


# ---------------------------------------------------------------------- the save
def save(saving: Saving, quiesce: bool) -> Outcome[Image]:
    """The steps of the module's text; the caller holds the VM's lock."""
    seconds = float(current_app.config["IMAGE_SAVE_TIMEOUT"])
    deadline = time.monotonic() + seconds
    live = domain_runs(saving)
    if is_rbd(saving.disk):  # made inside the cluster: no copy on the node, no download
        return save_rbd(saving, live, quiesce, deadline)
    image = reserve(saving)
    undo = Undo()
    image_id = image.id
    undo.push(f"forgetting image {image_id}", lambda: forget_image(image_id))
    try:
        copy = make_copy(saving, image_id, live, quiesce, deadline, undo)
        received = download(saving, image_id, copy, deadline, undo)
        image = activate(image_id, received, undo)
    except BaseException:
        run_undo(undo)
        raise
    messages = [f"image {image_id}: {consistency(live, quiesce)}."]
    messages += delete_copy(saving.host, saving.disk.pool, copy, saving.vm.id)
    return Outcome([image], messages)


def is_rbd(disk: Storage) -> bool:
    return (
        db.session.scalar(select(StorageType.backend).where(StorageType.id == disk.storage_type_id))
        == RBD
    )


def consistency(live: bool, quiesce: bool) -> str:
    if not live:
        return CONSISTENCY["offline"]
    return CONSISTENCY["quiesced" if quiesce else "crash"]


def domain_runs(saving: Saving) -> bool:
    """True: the domain runs (or is paused), so the copy is made live; False: shut off."""
    host, vm = saving.host, saving.vm
    try:
        state = hypervisor().domain(host.uri, vm.domain_name).state
    except HypervisorError as exc:
        raise hypervisor_failure(exc, "reading the domain's state", host) from exc
    if state in (RUNNING, PAUSED):
        return True
    if state == SHUTOFF:
        return False
    raise Conflict(
        f"vm-{vm.id} is {state}; its disks are saved when it runs, is paused or is shut off.",
        error_id=VM_STATE_CONFLICT,
        data={"state": state},
    )


def estimate(saving: Saving) -> int:
    """The bytes the copy will take at most, as far as can be known before it is made:
    the volume's file, and for an overlay the image it is made on; never above the disk's
    size (the size itself when the node cannot tell a file's length). Held against the
    quota while the save runs."""
    disk, host = saving.disk, saving.host
    try:
        length = hypervisor().volume_length(host.uri, disk.pool, disk.volume_name)
    except NotSupported:  # a driver that cannot tell a file's length: the disk's size
        return disk.size
    except HypervisorError as exc:
        raise hypervisor_failure(exc, "reading the disk's size", host) from exc
    if disk.boot and disk.image_id is not None:
        length += db.session.scalar(select(Image.size).where(Image.id == disk.image_id)) or 0
    return max(1, min(length, disk.size))


def reserve(saving: Saving) -> Image:
    """The image row, ``saving``, its estimated size checked against the owner's quota
    (403 before anything is copied); committed."""
    vm, disk = saving.vm, saving.disk
    size = estimate(saving)
    check_storage_quota(vm.customer_id, size, IMAGE_QUOTA_EXCEEDED)
    min_ram = None
    if disk.boot and disk.image_id is not None:
        min_ram = db.session.scalar(select(Image.min_ram).where(Image.id == disk.image_id))
    image = Image(name=saving.name, description=saving.description, format="qcow2",
                  state=SAVING, customer_id=vm.customer_id, size=size, min_ram=min_ram,
                  kind=saving.kind, source_vm_id=vm.id,
                  source_storage_id=saving.source_storage_id)  # fmt: skip
    db.session.add(image)
    db.session.commit()
    return image


def forget_image(image_id: int) -> None:
    """Undo: delete the ``saving`` row (one deleted meanwhile by DELETE /image is fine)."""
    db.session.rollback()
    row = db.session.get(Image, image_id)
    if row is not None and row.state == SAVING:
        db.session.delete(row)
        db.session.commit()


def make_copy(
    saving: Saving, image_id: int, live: bool, quiesce: bool, deadline: float, undo: Undo
) -> str:
    """The standalone copy on the node (listed as a leftover before it is made); its
    volume name."""
    host, disk, vm = saving.host, saving.disk, saving.vm
    name = save_volume_name(image_id)
    left = Left(host.node.id, VOLUME, name, vm.id, disk.pool)
    note_leftover(host.node.id, VOLUME, name, f"the temporary copy saving image {image_id}",
                  vm.id, disk.pool)  # fmt: skip
    db.session.commit()
    undo.push(f"forgetting the temporary copy {disk.pool}/{name}",
              lambda: forget_copy(left))  # fmt: skip
    driver = hypervisor()
    step = "copying the disk" + (" live" if live else "")
    try:
        if live:
            driver.copy_disk_live(host.uri, vm.domain_name, disk.target, disk.pool, name,
                                  remaining(host, deadline), quiesce)  # fmt: skip
        else:
            driver.clone_volume(host.uri, disk.pool, name, disk.pool, disk.volume_name,
                                remaining(host, deadline))  # fmt: skip
    except NoGuestAgent as exc:
        raise Conflict(
            f"vm-{vm.id} has no guest agent that answers, so its file systems cannot be "
            "frozen; nothing was copied. Save without quiesce for a crash-consistent copy.",
            error_id=VM_NO_GUEST_AGENT,
        ) from exc
    except NameTaken as exc:
        raise name_taken(exc, f"{disk.pool}/{name}", host, "a volume",
                         done="nothing was copied") from exc  # fmt: skip
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    undo.push(f"deleting the temporary copy {disk.pool}/{name} on node {host.node.fqdn}",
              lambda: delete_volume(host, disk.pool, name), left)  # fmt: skip
    return name


def remaining(host: Host, deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise HypervisorTimeout(host.uri, float(current_app.config["IMAGE_SAVE_TIMEOUT"]))
    return left


def download(saving: Saving, image_id: int, copy: str, deadline: float, undo: Undo) -> Received:
    """The copy, read through libvirt into a temporary file of the store and checked as
    an upload is; the file's undo removes it."""
    host, pool = saving.host, saving.disk.pool
    driver = hypervisor()
    limit = int(current_app.config["IMAGE_MAX_SIZE"])
    directory = image_dir()
    store.sweep_stale(directory)
    step = "reading the copy back"
    try:
        length = driver.volume_length(host.uri, pool, copy)
        if length > limit:
            raise BodyTooLarge(limit=limit)
        chunks = driver.download_volume(host.uri, pool, copy, remaining(host, deadline))
        received = store.receive(beating(chunks), directory, image_id, limit, length)
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    except store.UploadTruncated as exc:  # (the node's stream ended early)
        raise ValidationError(f"The copy could not be read back whole: {exc}.",
                              error_id=IMAGE_INVALID) from exc  # fmt: skip
    undo.push(f"removing {received.path}", lambda: store.remove(received.path))
    try:
        maximum = int(current_app.config["IMAGE_MAX_VIRTUAL_SIZE"])
        found = inspect(received.path, "qcow2", maximum)
    except ImageRefused as exc:
        raise ValidationError(f"The copy was refused: {exc}.", error_id=IMAGE_INVALID) from exc
    return Received(received, found.virtual_size)


@dataclass(frozen=True)
class Received:
    file: store.Received
    virtual_size: int


def beating(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks, each beating the worker's heartbeat (a long save that keeps moving
    outlives gunicorn's worker timeout, as an image copy does)."""
    for chunk in chunks:
        heartbeat.beat()
        yield chunk


def activate(image_id: int, received: Received, undo: Undo) -> Image:
    """Under the row's lock: still ``saving`` (not deleted meanwhile), the real size
    within the quota; the file renamed into place and the row made active; committed."""
    db.session.rollback()
    image = db.session.scalars(select(Image).where(Image.id == image_id).with_for_update()).first()
    if image is None or image.state != SAVING:
        raise NotFound(f"Image {image_id} was deleted while it was being saved; nothing was kept.",
                       error_id=not_found("image"))  # fmt: skip
    image.size = None  # (its estimate no longer counts: the real size does)
    db.session.flush()
    check_storage_quota(image.customer_id, received.file.size, IMAGE_QUOTA_EXCEEDED)
    name = store.publish(received.file, image_dir(), image_id)
    path = os.path.join(image_dir(), name)
    try:
        image.file = name
        image.state = ACTIVE
        image.size = received.file.size
        image.virtual_size = received.virtual_size
        image.checksum = received.file.sha256
        db.session.commit()
    except BaseException:
        db.session.rollback()
        store.remove(path)
        raise
    return image


def delete_volume(host: Host, pool: str, name: str) -> None:
    """Delete a volume of the node; one already gone is fine."""
    with contextlib.suppress(VolumeNotFound):
        hypervisor().delete_volume(host.uri, pool, name)


def forget_copy(left: Left) -> None:
    """Undo of the ledger entry: the copy is gone (its own undo ran first) or was never
    made. An entry a failed deletion rewrote stays (reconcile removes the copy)."""
    db.session.rollback()
    found = find_leftover(left.node_id, left.kind, left.name, left.pool)
    if found is not None and not found.reason.startswith("undo step failed"):
        drop_leftover(left.node_id, left.kind, left.name, left.pool)
        db.session.commit()


def delete_copy(host: Host, pool: str, name: str, vm_id: int) -> list[str]:
    """After the image is active: the copy on the node goes; a node that fails keeps it
    listed for reconcile (a message, not an error: the image is made)."""
    try:
        delete_volume(host, pool, name)
    except HypervisorError as exc:
        log.warning("could not delete the temporary copy %s/%s: %s", pool, name, exc)
        return [
            f"The temporary copy {pool}/{name} could not be deleted on node {host.node.fqdn} "
            f"({exc.reason}); flask vmapi reconcile --fix removes it."
        ]
    drop_leftover(host.node.id, VOLUME, name, pool)
    db.session.commit()
    return []
