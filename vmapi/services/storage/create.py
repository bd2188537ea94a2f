"""A new volume for a VM (POST /storage), each step with its named inverse.

Order: pick a target device under the VM's row lock and commit the row; make sure the
pool exists; create the volume; rewrite the domain's persistent definition (from the
database, now with the disk); attach it live when the domain runs.
"""

from __future__ import annotations

from typing import Any

from flask import current_app
from sqlalchemy import select

from vmapi.error_ids import STORAGE_NAME_TAKEN, STORAGE_NO_FREE_TARGET
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, NameTaken
from vmapi.models import Storage, StorageType, VirtNode, Vm
from vmapi.models.leftover import VOLUME
from vmapi.node_detail import NodeNote
from vmapi.services.leftovers import Left
from vmapi.services.names import volume_name
from vmapi.services.nodes.domains import hypervisor_failure, name_taken
from vmapi.services.nodes.hosts import hypervisor
from vmapi.services.quotas import check_storage_quota
from vmapi.services.storage.disks import TARGETS, AttachedVolume, live
from vmapi.services.storage.volumes import delete_volume
from vmapi.services.undo import Undo


def create_volume(data: dict[str, Any], undo: Undo, messages: list[str]) -> Storage:
    """Make the checked volume ``data`` describes and attach it to its VM."""
    try:
        vm = db.session.get(Vm, data["vm_id"])
        storage = Storage(**data, target=take_target(data["vm_id"]), node_id=vm.node_id,
                          pool=type_for_volume(data["storage_type_id"]).pool)  # fmt: skip
        check_storage_quota(vm.customer_id, data["size"])
        db.session.add(storage)
        db.session.flush()
        # stored before the volume is made: from now on the row says where it is
        storage.volume_name = volume_name(storage.id)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    storage_id = storage.id
    undo.push(f"forgetting storage {storage_id}", lambda: forget(storage_id))
    disk = AttachedVolume(storage)
    driver = hypervisor()
    uri, pool, name = disk.host.uri, storage.pool, storage.volume_name
    step = "preparing the storage pool"
    try:
        directory = pool_dir(disk.vm, pool)
        if driver.ensure_pool(uri, pool, directory):
            made = f"storage pool {pool} at {directory}"
            messages.append(NodeNote("A storage pool was created.", made))
        step = "creating the volume"
        size, fmt = storage.size, disk.type.format
        try:
            storage.path = driver.create_volume(uri, pool, name, size, fmt)
        except NameTaken as exc:
            taken = f"{pool}/{name}"
            raise name_taken(exc, taken, disk.host, "a volume", STORAGE_NAME_TAKEN) from exc
        host = disk.host
        undo.push(f"deleting volume {pool}/{name} on node {host.node.fqdn}",
                  lambda: delete_volume(storage, host),
                  Left(host.node.id, VOLUME, name, storage.vm_id, pool))  # fmt: skip
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
