"""Booting from an image: the checks of POST /vm's ``image`` and ``root_size``, and the
VM's root disk (API.md "Boot from an image").

The root disk is a ``/storage`` row of the seeded ``local-qcow2`` type with ``boot`` and
``image``, target ``vda``, made in the VM's claim transaction (so it counts against the
storage quota there and then, and marks the image's copy on the node as used before any
libvirt call); then, with the copy held (:func:`vmapi.services.images.copies.held_copy`,
which copies the image to the node first when it is not there), a qcow2 overlay of
``root_size`` bytes whose backing store is the copy. The VM's domain boots from it.
Every step pushes its inverse on the create's undo stack: the overlay, a copy this
request made that nobody uses, the row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import select

from vmapi.error_ids import IMAGE_NOT_ACTIVE, VM_IMAGE_NOT_FOUND, VM_QUOTA_EXCEEDED
from vmapi.errors import Conflict, NotFound, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, NameTaken
from vmapi.models import Image, Storage, StorageType, Vm
from vmapi.models.catalog import RBD
from vmapi.models.image import ACTIVE
from vmapi.models.leftover import VOLUME
from vmapi.services.images.copies import (
    ROOT_TYPE,
    CopyGone,
    Source,
    held_copy,
    pool_directory,
    remove_if_unused,
    root_type,
)
from vmapi.services.images.rbd_copies import in_ceph_only, rbd_homes
from vmapi.services.leftovers import Left
from vmapi.services.names import volume_name
from vmapi.services.nodes.domains import hypervisor_failure, name_taken
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.quotas import check_storage_quota
from vmapi.services.storage.volumes import delete_volume
from vmapi.services.undo import Undo
from vmapi.services.vms.rbd_boot import ROOT_TARGET, RbdClone, make_rbd_root, rbd_type

MIB = 1024 * 1024


@dataclass(frozen=True)
class Boot:
    """What a new VM boots from: its image (as read when checked) and its root disk size."""

    source: Source
    root_size: int
    #: an rbd storage type of the root disk (an RBD clone); None: the local-qcow2 overlay
    rbd_type_id: int | None = None


def round_up(size: int) -> int:
    """A whole number of MiB, at least ``size`` bytes."""
    return -(-size // MIB) * MIB


def image_not_found(image_id: int) -> NotFound:
    return NotFound(
        f"No image with id {image_id} that this VM's owner may boot from.",
        error_id=VM_IMAGE_NOT_FOUND,
        data={"image": {"id": image_id}},
    )


def not_active(image: Image) -> Conflict:
    return Conflict(
        f"Image {image.id} is {image.state}; send its file first (PUT /image/{image.id}/file).",
        error_id=IMAGE_NOT_ACTIVE,
        data={"image": {"id": image.id}, "state": image.state},
    )


def plan_boot(data: dict[str, Any]) -> Boot | None:
    """Check ``image`` and ``root_size`` of a new VM (``data`` with its owner decided);
    pops them from ``data``. None: the VM has no image (and no disk), as before."""
    image_id = data.pop("image_id", None)
    root_size = data.pop("root_size", None)
    type_id = data.pop("root_storage_type_id", None)
    if image_id is None:
        for name, value in (("root_size", root_size), ("root_storage_type", type_id)):
            if value is not None:
                raise ValidationError(data={name: ["Give it with image: a root disk is "
                                                   "made from an image."]})  # fmt: skip
        return None
    rbd_type_id = root_disk_type(type_id)
    image = bootable_image(image_id, data.get("customer_id"))
    if image.file is None and rbd_type_id not in rbd_homes(image.id):
        raise in_ceph_only(image)
    size = disk_size(image, root_size, data["ram"])
    data["image_id"] = image.id
    return Boot(Source.of(image), size, rbd_type_id)


def root_disk_type(type_id: int | None) -> int | None:
    """The rbd type a root disk is asked for in (None: the seeded local-qcow2, also when
    named); any other type is 400 on ``root_storage_type``."""
    if type_id is None:
        return None
    storage_type = db.session.get(StorageType, type_id)
    if storage_type is None:
        raise ValidationError(data={"root_storage_type": [f"No storage_type with id {type_id}."]})
    if storage_type.name == ROOT_TYPE:
        return None
    if storage_type.backend != RBD:
        raise ValidationError(data={"root_storage_type": [
            f"A root disk is made in {ROOT_TYPE} or in an rbd storage type; "
            f"{storage_type.name} is neither."]})  # fmt: skip
    return storage_type.id


def bootable_image(image_id: int, customer_id: int | None) -> Image:
    """The image, if a VM of ``customer_id`` may boot from it (public images and the
    owner's own only; 404 otherwise) and it is active (409 otherwise)."""
    image = db.session.get(Image, image_id)
    if image is None or image.customer_id not in (None, customer_id):
        raise image_not_found(image_id)
    if image.state != ACTIVE:
        raise not_active(image)
    return image


def disk_size(image: Image, root_size: int | None, ram: int, default: int = 0) -> int:
    """The root disk's size for a VM of ``ram`` bytes booting from ``image``:
    ``root_size`` rounded up to a whole MiB, at least the image's virtual size and at
    most STORAGE_MAX_SIZE; without it, the larger of ``default`` and the virtual size
    (rounded up likewise). 400 on ``root_size`` and ``ram`` (the image's min_ram)."""
    minimum = round_up(image.virtual_size or 0)
    size = max(minimum, round_up(default)) if root_size is None else round_up(root_size)
    limit = current_app.config["STORAGE_MAX_SIZE"]
    problems = {}
    if size < minimum:
        problems["root_size"] = [
            f"Must be at least the image's virtual_size, {image.virtual_size} bytes "
            f"({minimum} rounded up to a whole MiB)."
        ]
    elif (root_size or 0) > limit or size > limit:
        problems["root_size"] = [f"Must be at most {limit} bytes."]
    if image.min_ram is not None and ram < image.min_ram:
        problems["ram"] = [f"Image {image.id} needs at least {image.min_ram} bytes (min_ram)."]
    if problems:
        raise ValidationError(data=problems)
    return size


def check_image(boot: Boot, customer_id: int | None) -> None:
    """In the claim transaction: the image is still there and active (held by a share
    lock until the VM's row, which references it, is committed: a delete waits), and the
    root disk fits the owner's storage quota."""
    stmt = select(Image).where(Image.id == boot.source.id).with_for_update(read=True)
    image = db.session.scalars(stmt).first()
    if image is None:
        raise image_not_found(boot.source.id)
    if image.state != ACTIVE:
        raise not_active(image)
    check_storage_quota(customer_id, boot.root_size, VM_QUOTA_EXCEEDED)


def add_root_disk(vm: Vm, boot: Boot, clone: RbdClone | None = None) -> Storage:
    """The root disk's row, in the claim transaction (flushed, named); with the id, name
    and path of its ``clone`` when that was started before the claim
    (:func:`vmapi.services.vms.rbd_boot.early_clone`)."""
    storage_type = root_type() if boot.rbd_type_id is None else rbd_type(boot.rbd_type_id)
    root = Storage(
        size=boot.root_size,
        vm_id=vm.id,
        storage_type_id=storage_type.id,
        target=ROOT_TARGET,
        node_id=vm.node_id,
        pool=storage_type.pool,
        boot=True,
        image_id=boot.source.id,
    )
    if clone is not None:  # its id (and so its name) taken from the sequence already
        root.id, root.path = clone.storage_id, clone.path
        clone.placed(vm.node_id, vm.id, root.pool)
    db.session.add(root)
    db.session.flush()
    root.volume_name = volume_name(root.id)
    return root


def forget_root_disk(storage_id: int) -> None:
    """Undo: delete the root disk's row (its volume is gone, or was never made)."""
    db.session.rollback()
    row = db.session.get(Storage, storage_id)
    if row is not None:
        db.session.delete(row)
        db.session.commit()


def make_root_disk(
    vm: Vm, root: Storage, boot: Boot, host: Host, undo: Undo, clone: RbdClone | None = None
) -> Callable[[], None] | None:
    """The image's copy on the node (made now if missing), then the overlay on it; the
    row records the overlay's path. Failures answer as POST /vm's steps do. (In an rbd
    type: :func:`vmapi.services.vms.rbd_boot.make_rbd_root`, the clone grown to
    ``root_size``, made while the create goes on, or started before its claim:
    ``clone``; call what this returns before the domain starts; None: nothing to wait
    for.)"""
    if boot.rbd_type_id is not None:
        try:
            return make_rbd_root(vm, root, boot, host, undo, clone)
        except CopyGone as exc:  # (the VM's row holds the image: only if that changes)
            raise image_not_found(boot.source.id) from exc
    driver = hypervisor()
    uri, pool = host.uri, root.pool
    directory = pool_directory(host.node.id, pool, vm.virt_method_id)
    db.session.commit()  # (only read) nothing stays open across the copy
    step = "copying the image to the node"
    try:
        with held_copy(boot.source, host, pool, directory) as held:
            if held.made:  # (this root disk's row goes after it: it does not count)
                copy_id, root_id = held.copy.id, root.id
                undo.push(f"removing the copy of image {boot.source.id} from node "
                          f"{host.node.fqdn} unless used",
                          lambda: remove_if_unused(copy_id, ignoring=root_id))  # fmt: skip
            step = "creating the root disk"
            try:
                base = held.copy.volume_name
                size, fmt = boot.root_size, boot.source.format
                root.path = driver.create_overlay(uri, pool, root.volume_name, size, base, fmt)
            except NameTaken as exc:
                raise name_taken(exc, f"{pool}/{root.volume_name}", host, "a volume") from exc
            undo.push(f"deleting root disk {pool}/{root.volume_name} on node {host.node.fqdn}",
                      lambda: delete_volume(root, host),
                      Left(host.node.id, VOLUME, root.volume_name, vm.id, pool))  # fmt: skip
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    except CopyGone as exc:  # (the VM's row holds the image: only if that changes)
        raise image_not_found(boot.source.id) from exc
    db.session.add(root)
    db.session.commit()
    return None
