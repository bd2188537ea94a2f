"""A new volume for a VM (POST /storage), each step with its named inverse.

Order: pick a target device under the VM's row lock and commit the row (named building
on its Idempotency-Key's row, if any); make sure the pool exists; create the volume
(empty, or holding an image's content: cloned whole from the image's copy on the node,
made there first when missing, then grown to its size); rewrite the domain's persistent
definition (from the database, now with the disk); attach it live when the domain runs.
The caller names it made on the key's row once the whole request is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import select

from vmapi.error_ids import STORAGE_NAME_TAKEN, STORAGE_NO_FREE_TARGET
from vmapi.errors import Conflict, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, NameTaken
from vmapi.models import Image, Storage, StorageType, VirtNode, Vm
from vmapi.models.catalog import RBD
from vmapi.models.image import ACTIVE
from vmapi.models.leftover import VOLUME
from vmapi.node_detail import NodeNote
from vmapi.services.idempotency import commit_building
from vmapi.services.images.copies import (
    CopyGone,
    Source,
    held_copy,
    pool_directory,
    remove_if_unused,
    root_type,
)
from vmapi.services.images.rbd_copies import in_ceph_only
from vmapi.services.leftovers import Left
from vmapi.services.names import volume_name
from vmapi.services.nodes.domains import hypervisor_failure, name_taken
from vmapi.services.nodes.hosts import hypervisor
from vmapi.services.quotas import check_storage_quota
from vmapi.services.storage.ceph import KeyUnreadable, Steps, ensure_rbd_pool, key_unreadable
from vmapi.services.storage.disks import TARGETS, AttachedVolume, live
from vmapi.services.storage.volumes import delete_volume
from vmapi.services.undo import Undo
from vmapi.services.vms.boot import not_active, round_up

#: the format of a volume made from an image (the driver's clone_volume writes qcow2)
CLONE_FORMAT = "qcow2"


@dataclass(frozen=True)
class NewVolume:
    """A volume to make, checked: its row's fields and, made from an image, that image
    (as read when checked)."""

    data: dict[str, Any]
    source: Source | None = None


def plan_volume(data: dict[str, Any], vm: Vm) -> NewVolume:
    """Check ``image`` and ``size`` of a new volume of ``vm`` (nothing written). The
    image is one the VM's owner may see (public, or its own: 400 otherwise, as for any
    reference the body names) and active (409); the size defaults to its virtual size
    rounded up to a whole MiB, which is also its minimum (400). The row records no
    image: the volume is a copy that stands alone."""
    data = dict(data)
    image_id = data.pop("image_id", None)
    if image_id is None:
        if data.get("size") is None:
            raise ValidationError(data={"size": ["Missing data for required field."]})
        return NewVolume(data)
    image = db.session.get(Image, image_id)
    if image is None or image.customer_id not in (None, vm.customer_id):
        raise ValidationError(
            data={"image": [f"No image with id {image_id} that the VM's owner may use."]}
        )
    if image.state != ACTIVE:
        raise not_active(image)
    if image.file is None:
        raise in_ceph_only(image)
    if db.session.get(StorageType, data["storage_type_id"]).format != CLONE_FORMAT:
        raise ValidationError(
            data={"storage_type": [f"A volume made from an image is {CLONE_FORMAT}: give a "
                                   f"storage type of format {CLONE_FORMAT}."]}
        )  # fmt: skip
    minimum = round_up(image.virtual_size or 0)
    if data.get("size") is None:
        data["size"] = minimum
    elif data["size"] < minimum:
        raise ValidationError(
            data={"size": [f"Must be at least the image's virtual_size, {image.virtual_size} "
                           f"bytes ({minimum} rounded up to a whole MiB)."]}
        )  # fmt: skip
    return NewVolume(data, Source.of(image))


def create_volume(new: NewVolume, undo: Undo, messages: list[str]) -> Storage:
    """Make the checked volume and attach it to its VM."""
    data = new.data
    try:
        vm = db.session.get(Vm, data["vm_id"])
        storage = Storage(**data, target=take_target(data["vm_id"]), node_id=vm.node_id,
                          pool=type_for_volume(data["storage_type_id"]).pool)  # fmt: skip
        check_storage_quota(vm.customer_id, data["size"])
        db.session.add(storage)
        db.session.flush()
        # stored before the volume is made: from now on the row says where it is
        storage.volume_name = volume_name(storage.id)
        # and under an Idempotency-Key the key names it building until it is made: a
        # retry that takes the key over from a dead request removes it (.removal)
        commit_building([storage.id])
    except BaseException:
        db.session.rollback()
        raise
    storage_id = storage.id
    undo.push(f"forgetting storage {storage_id}", lambda: forget(storage_id))
    disk = AttachedVolume(storage)
    driver = hypervisor()
    uri, pool, name = disk.host.uri, storage.pool, storage.volume_name
    step = "preparing the storage pool"
    ceph = Steps()
    try:
        if disk.type.backend == RBD:
            try:
                ensure_rbd_pool(disk.type, disk.host, undo, messages, ceph)
            except KeyUnreadable as exc:
                raise key_unreadable(exc, disk.type) from exc
            except HypervisorError:
                step = ceph.step
                raise
        else:
            directory = pool_dir(disk.vm, pool)
            if driver.ensure_pool(uri, pool, directory):
                made = f"storage pool {pool} at {directory}"
                messages.append(NodeNote("A storage pool was created.", made))
        step = "creating the volume"
        if new.source is None:
            size, fmt = storage.size, disk.type.format
            try:
                storage.path = driver.create_volume(uri, pool, name, size, fmt)
            except NameTaken as exc:
                taken = f"{pool}/{name}"
                raise name_taken(exc, taken, disk.host, "a volume", STORAGE_NAME_TAKEN) from exc
            pushed(storage, disk, undo)
        else:
            storage.path = copy_image(new.source, storage, disk, undo)
            messages.append(f"Storage {storage_id} holds the content of image {new.source.id}.")
        db.session.commit()
        disk = AttachedVolume(storage)
        step = "attaching the disk"
        old = disk.domain(without=True)
        driver.define(uri, disk.domain())
        domain = disk.vm.domain_name
        undo.push(f"redefining {domain} without storage {storage_id}",
                  lambda: driver.define(uri, old))  # fmt: skip
        if disk.running():
            what = f"Attaching storage {storage_id} to the running vm-{disk.vm.id}"
            if live(lambda: driver.attach_disk_live(uri, domain, disk.spec), messages, what):
                undo.push(f"detaching storage {storage_id} from {domain}",
                          lambda: driver.detach_disk_live(uri, domain, disk.spec))  # fmt: skip
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, disk.host) from exc
    return storage


def pushed(storage: Storage, disk: AttachedVolume, undo: Undo) -> None:
    """The new volume's inverse."""
    host, pool, name = disk.host, storage.pool, storage.volume_name
    undo.push(f"deleting volume {pool}/{name} on node {host.node.fqdn}",
              lambda: delete_volume(storage, host),
              Left(host.node.id, VOLUME, name, storage.vm_id, pool))  # fmt: skip


def copy_image(source: Source, storage: Storage, disk: AttachedVolume, undo: Undo) -> str:
    """The new volume, holding the image's content: the image's copy on the node held
    (made first when missing, in the root disks' pool), cloned whole into the volume
    (a standalone qcow2, within IMAGE_COPY_TIMEOUT), grown to the row's size; its path.
    A failure answers with its step."""
    driver = hypervisor()
    host, pool, name = disk.host, storage.pool, storage.volume_name
    base_pool = root_type().pool
    directory = pool_directory(host.node.id, base_pool, disk.vm.virt_method_id)
    db.session.commit()  # (only read) nothing stays open across the copies
    step = "copying the image to the node"
    try:
        with held_copy(source, host, base_pool, directory) as held:
            if held.made:
                copy_id = held.copy.id
                undo.push(f"removing the copy of image {source.id} from node "
                          f"{host.node.fqdn} unless used",
                          lambda: remove_if_unused(copy_id))  # fmt: skip
            step = "copying the image into the volume"
            timeout = float(current_app.config["IMAGE_COPY_TIMEOUT"])
            try:
                path = driver.clone_volume(host.uri, pool, name, held.copy.pool,
                                           held.copy.volume_name, timeout)  # fmt: skip
            except NameTaken as exc:
                taken = f"{pool}/{name}"
                raise name_taken(exc, taken, host, "a volume", STORAGE_NAME_TAKEN) from exc
        pushed(storage, disk, undo)
        step = "growing the volume"
        if driver.volume(host.uri, pool, name)[1] < storage.size:
            driver.resize_volume(host.uri, pool, name, storage.size)
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    except CopyGone as exc:
        gone = f"Image {source.id} was deleted meanwhile."
        raise ValidationError(data={"image": [gone]}) from exc
    return path


def pool_dir(vm: Vm, pool: str) -> str:
    configured = db.session.scalars(
        select(VirtNode.local_storage_path).where(
            VirtNode.node_id == vm.node_id, VirtNode.virt_method_id == vm.virt_method_id
        )
    ).first()
    return configured or f"{current_app.config['STORAGE_POOL_DIR']}/{pool}"


def take_target(vm_id: int) -> str:
    """The first free device name of the VM, under its row lock."""
    db.session.scalars(select(Vm).where(Vm.id == vm_id).with_for_update()).one()
    used = set(db.session.scalars(select(Storage.target).where(Storage.vm_id == vm_id)))
    free = [t for t in TARGETS if t not in used]
    if not free:
        raise Conflict(
            f"vm-{vm_id} has no free disk device name left.", error_id=STORAGE_NO_FREE_TARGET
        )
    return free[0]


def forget(storage_id: int) -> None:
    db.session.rollback()
    row = db.session.get(Storage, storage_id)
    if row is not None:
        db.session.delete(row)
        db.session.commit()


def type_for_volume(storage_type_id: int) -> StorageType:
    """The storage type, read under a share lock: a concurrent change of its pool or
    format waits for this volume's row, then sees it (409 storage_type/in_use)."""
    stmt = select(StorageType).where(StorageType.id == storage_type_id)
    return db.session.scalars(stmt.with_for_update(read=True)).one()
