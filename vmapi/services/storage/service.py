"""/storage: volumes in a libvirt pool on the VM's node, attached as virtio disks.

Order of a create: pick a target device under the VM's row lock and commit the row;
make sure the pool exists; create the volume; rewrite the domain's persistent definition
(from the database, now with the disk); attach it live when the domain runs. Each step
pushes its inverse, so a failure leaves no volume, no disk and no row. Where the
hypervisor cannot change a running domain (attach, grow, limits) the persistent
definition has it and the answer says it takes effect at the next start.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

from flask import current_app
from sqlalchemy import select

from vmapi.auth import Principal
from vmapi.error_ids import (
    STORAGE_DETACH_FAILED,
    STORAGE_NAME_TAKEN,
    STORAGE_NO_FREE_TARGET,
    STORAGE_NODE_MISMATCH,
    STORAGE_ROOT_DISK,
    STORAGE_SHRINK_FORBIDDEN,
)
from vmapi.errors import Conflict, ValidationError, at_index
from vmapi.extensions import db
from vmapi.hypervisor import (
    PAUSED,
    RUNNING,
    DomainSpec,
    HypervisorError,
    NameTaken,
    NotSupported,
)
from vmapi.models import CacheOption, Storage, StorageType, VirtMethod, VirtNode, Vm
from vmapi.node_detail import NodeNote
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.locks import with_vm_locks
from vmapi.services.names import volume_name
from vmapi.services.nodes.domains import hypervisor_failure, name_taken
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.ownership import own_vms
from vmapi.services.quotas import check_storage_quota
from vmapi.services.storage.volumes import delete_volume
from vmapi.services.undo import Undo, all_or_nothing, run_undo
from vmapi.services.vms.specs import SEED_TARGET, disk_spec, domain_spec

#: vda is left for a boot disk, vdz for the cloud-init seed (services/vms/cloud_init.py)
TARGETS = [f"vd{letter}" for letter in string.ascii_lowercase[1:] if f"vd{letter}" != SEED_TARGET]


def vms_of(storage_ids: list[int]) -> list[int]:
    """The VMs the storage objects are attached to now (for locking them)."""
    return list(db.session.scalars(select(Storage.vm_id).where(Storage.id.in_(storage_ids))))


def visible_vm(vm_id: int, principal: Principal) -> Vm:
    """The VM, if the principal may see it (400 otherwise: the body names it)."""
    stmt = select(Vm).where(Vm.id == vm_id)
    if not principal.is_admin:
        stmt = stmt.where(Vm.id.in_(own_vms(principal.customer_id)))
    vm = db.session.scalars(stmt).first()
    if vm is None:
        raise ValidationError(data={"vm": [f"No vm with id {vm_id}."]})
    return vm


def root_disk(storage: Storage, what: str) -> Conflict:
    """409 ``storage/root_disk``: a VM's root disk grows, but goes only with its VM."""
    return Conflict(
        f"Storage {storage.id} is the root disk of vm-{storage.vm_id}, which boots from it; "
        f"it never {what}. Delete the VM to delete it.",
        error_id=STORAGE_ROOT_DISK,
        data={"storage": {"id": storage.id}, "vm": {"id": storage.vm_id}},
    )


class AttachedVolume:
    """A storage row with what the hypervisor needs to know about it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.vm = db.session.get(Vm, storage.vm_id)
        self.host = Host.of(storage.node_id)  # where the volume is (the VM's node)
        self.type = db.session.get(StorageType, storage.storage_type_id)
        cache = (
            db.session.get(CacheOption, storage.cache_option_id)
            if storage.cache_option_id
            else None
        )
        self.spec = disk_spec(storage, self.type.format, cache.name if cache else None)

    def domain(self, without: bool = False) -> DomainSpec:
        method = db.session.get(VirtMethod, self.vm.virt_method_id)
        exclude = self.storage.id if without else None
        return domain_spec(self.vm, method, self.host.node, current_app.config, exclude)

    def running(self) -> bool:
        return hypervisor().domain(self.host.uri, self.vm.domain_name).state in (RUNNING, PAUSED)


def live(action: Callable[[], None], messages: list[str], what: str) -> bool:
    """Change the running domain. A hypervisor that cannot do it live at all (the test
    driver) leaves it to the next start, and the answer says so; any other refusal is a
    failure, so a disk libvirt rejects never lingers in the persistent definition."""
    try:
        action()
    except NotSupported as exc:
        messages.append(NodeNote(f"{what} takes effect at the next start.", exc.reason))
        return False
    return True


class StorageService(CrudService[Storage]):
    def __init__(self) -> None:
        super().__init__(Storage, "storage")

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(Storage.vm_id.in_(own_vms(customer_id)))

    def check_size(self, size: int) -> None:
        limit = current_app.config["STORAGE_MAX_SIZE"]
        if size > limit:
            raise ValidationError(data={"size": [f"Must be at most {limit} bytes."]})

    # ------------------------------------------------------------------ create
    @with_vm_locks(lambda items: [data["vm_id"] for data in items])
    def create_many(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome[Storage]:
        messages: list[str] = []

        def check(data: dict[str, Any]) -> dict[str, Any]:
            visible_vm(data["vm_id"], principal)
            self.check_references(data)
            self.check_size(data["size"])
            return data

        def apply(data: dict[str, Any], undo: Undo) -> Storage:
            return self.create_one(data, undo, messages)

        return Outcome(all_or_nothing(items, indexed, check, apply), messages)

    def pool_dir(self, vm: Vm, pool: str) -> str:
        configured = db.session.scalars(
            select(VirtNode.local_storage_path).where(
                VirtNode.node_id == vm.node_id, VirtNode.virt_method_id == vm.virt_method_id
            )
        ).first()
        return configured or f"{current_app.config['STORAGE_POOL_DIR']}/{pool}"

    def take_target(self, vm_id: int) -> str:
        """The first free device name of the VM, under its row lock."""
        db.session.scalars(select(Vm).where(Vm.id == vm_id).with_for_update()).one()
        used = set(db.session.scalars(select(Storage.target).where(Storage.vm_id == vm_id)))
        free = [t for t in TARGETS if t not in used]
        if not free:
            raise Conflict(
                f"vm-{vm_id} has no free disk device name left.", error_id=STORAGE_NO_FREE_TARGET
            )
        return free[0]

    def create_one(self, data: dict[str, Any], undo: Undo, messages: list[str]) -> Storage:
        try:
            vm = db.session.get(Vm, data["vm_id"])
            storage = Storage(**data, target=self.take_target(data["vm_id"]), node_id=vm.node_id,
                              pool=self.type_for_volume(data["storage_type_id"]).pool)  # fmt: skip
            check_storage_quota(vm.customer_id, data["size"])
            db.session.add(storage)
            db.session.flush()
            # stored before the volume is made: from now on the row says where it is
            storage.volume_name = volume_name(storage.id)
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise
        undo.append(lambda: self.forget(storage.id))
        disk = AttachedVolume(storage)
        driver = hypervisor()
        uri, pool, name = disk.host.uri, storage.pool, storage.volume_name
        step = "preparing the storage pool"
        try:
            directory = self.pool_dir(disk.vm, pool)
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
            undo.append(lambda: delete_volume(storage, disk.host))
            db.session.commit()
            disk = AttachedVolume(storage)
            step = "attaching the disk"
            old = disk.domain(without=True)
            driver.define(uri, disk.domain())
            undo.append(lambda: driver.define(uri, old))
            if disk.running():
                name = disk.vm.domain_name
                what = f"Attaching storage {storage.id} to the running vm-{disk.vm.id}"
                if live(lambda: driver.attach_disk_live(uri, name, disk.spec), messages, what):
                    undo.append(lambda: driver.detach_disk_live(uri, name, disk.spec))
        except HypervisorError as exc:
            raise hypervisor_failure(exc, step, disk.host) from exc
        return storage

    @staticmethod
    def forget(storage_id: int) -> None:
        db.session.rollback()
        row = db.session.get(Storage, storage_id)
        if row is not None:
            db.session.delete(row)
            db.session.commit()

    @staticmethod
    def type_for_volume(storage_type_id: int) -> StorageType:
        """The storage type, read under a share lock: a concurrent change of its pool or
        format waits for this volume's row, then sees it (409 storage_type/in_use)."""
        stmt = select(StorageType).where(StorageType.id == storage_type_id)
        return db.session.scalars(stmt.with_for_update(read=True)).one()

    # ------------------------------------------------------------------ update
    @with_vm_locks(
        lambda items: [
            *vms_of([ident for ident, _data in items]),
            *[data["vm_id"] for _ident, data in items if "vm_id" in data],
        ]
    )
    def update_many(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[Storage]:
        messages: list[str] = []

        def check(item: tuple[int, dict[str, Any]]) -> tuple[Storage, dict[str, Any]]:
            ident, data = item
            storage = self.get(ident, principal)
            self.check_update(storage, data, principal)
            return storage, data

        def apply(plan: tuple[Storage, dict[str, Any]], undo: Undo) -> Storage:
            storage, data = plan
            self.apply_update(storage, data, undo, messages)
            return storage

        return Outcome(all_or_nothing(items, indexed, check, apply), messages)

    def check_update(self, storage: Storage, data: dict[str, Any], principal: Principal) -> None:
        if "size" in data:
            if data["size"] < storage.size:
                raise ValidationError(
                    f"Volumes only grow: {data['size']} is less than {storage.size} bytes.",
                    error_id=STORAGE_SHRINK_FORBIDDEN,
                    data={"size": storage.size},
                )
            self.check_size(data["size"])
        if "storage_type_id" in data and data["storage_type_id"] != storage.storage_type_id:
            raise ValidationError(data={"storage_type": ["Cannot change; make a new volume."]})
        if "vm_id" in data and data["vm_id"] != storage.vm_id:
            if storage.boot:
                raise root_disk(storage, "moves to another VM")
            target = visible_vm(data["vm_id"], principal)
            if target.node_id != db.session.get(Vm, storage.vm_id).node_id:
                raise Conflict(
                    f"vm-{target.id} is on another node; volumes move only between VMs of "
                    "one node.",
                    error_id=STORAGE_NODE_MISMATCH,
                )
        self.check_references(data)

    def apply_update(
        self, storage: Storage, data: dict[str, Any], undo: Undo, messages: list[str]
    ) -> None:
        before = AttachedVolume(storage)
        old = {k: getattr(storage, k) for k in data}
        moving = "vm_id" in data and data["vm_id"] != storage.vm_id
        if moving:
            data = {**data, "target": self.take_target(data["vm_id"])}
            old["target"] = storage.target
        try:
            owner = db.session.get(Vm, storage.vm_id).customer_id
            size = data.get("size", storage.size)
            new_owner = db.session.get(Vm, data["vm_id"]).customer_id if moving else owner
            if new_owner != owner:  # moved to another customer's VM: all of it is theirs now
                check_storage_quota(new_owner, size)
            elif size > storage.size:
                check_storage_quota(owner, size - storage.size)
            for key, value in data.items():
                setattr(storage, key, value)
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise

        def restore() -> None:
            db.session.rollback()
            for key, value in old.items():
                setattr(storage, key, value)
            db.session.commit()

        undo.append(restore)
        driver = hypervisor()
        after = AttachedVolume(storage)
        uri = after.host.uri
        step = "growing the volume"
        try:
            if "size" in data and data["size"] != old["size"]:
                self.grow(before, storage.size, messages)
            if moving:
                step = "detaching the disk"
                self.detach(before, messages, undo)
                driver.define(uri, before.domain(without=True))
                undo.append(lambda: driver.define(uri, before.domain()))
            step = "redefining the domain"
            previous = before.domain() if not moving else after.domain(without=True)
            driver.define(uri, after.domain())
            undo.append(lambda: driver.define(uri, previous))
            if not after.running():
                return
            step = "changing the running domain"
            name, label = after.vm.domain_name, f"The change to storage {storage.id}"
            if moving:
                if live(lambda: driver.attach_disk_live(uri, name, after.spec), messages, label):
                    undo.append(lambda: driver.detach_disk_live(uri, name, after.spec))
                return
            limits = [k for k in data if k.endswith("_limit")]
            if limits:
                live(lambda: driver.set_iotune_live(uri, name, storage.target, after.spec.iotune),
                     messages, f"The new I/O limits of storage {storage.id}")  # fmt: skip
            if "cache_option_id" in data and data["cache_option_id"] != old["cache_option_id"]:
                messages.append(
                    f"The cache mode of storage {storage.id} takes effect at the next start."
                )
        except HypervisorError as exc:
            raise hypervisor_failure(exc, step, after.host) from exc

    @staticmethod
    def grow(disk: AttachedVolume, size: int, messages: list[str]) -> None:
        """Grow the volume: through QEMU while the disk is in use (it holds the image's
        lock, and the guest sees the new size at once), else in the pool. A volume that
        grew stays grown if a later step fails (volumes never shrink)."""
        driver = hypervisor()
        uri = disk.host.uri
        if disk.running():
            try:
                driver.resize_disk_live(uri, disk.vm.domain_name, disk.spec.target, size)
                return
            except NotSupported:
                messages.append(
                    f"Storage {disk.storage.id} grew; the guest sees it after a restart."
                )
        driver.resize_volume(uri, disk.storage.pool, disk.storage.volume_name, size)

    def detach(self, disk: AttachedVolume, messages: list[str], undo: Undo) -> None:
        """Detach from the running domain (if it runs); the caller redefines it.

        A guest that does not release the disk in time (no OS, or one that refuses PCI
        hot-unplug) leaves everything as it was: 409 ``storage/detach_failed``.
        """
        if not disk.running():
            return
        driver = hypervisor()
        uri, name = disk.host.uri, disk.vm.domain_name
        wait = float(current_app.config["DETACH_TIMEOUT"])
        released: list[bool] = []
        what = f"Detaching storage {disk.storage.id} from the running vm-{disk.vm.id}"
        if not live(
            lambda: released.append(driver.detach_disk_live(uri, name, disk.spec, wait)),
            messages,
            what,
        ):
            return
        if not released[0]:
            raise Conflict(
                f"vm-{disk.vm.id} did not release {disk.spec.target} within {wait:g} s (the "
                "guest must allow PCI hot-unplug); shut the VM off and retry. Nothing changed.",
                error_id=STORAGE_DETACH_FAILED,
                data={"storage": {"id": disk.storage.id}, "target": disk.spec.target},
            )
        undo.append(lambda: driver.attach_disk_live(uri, name, disk.spec))

    # ------------------------------------------------------------------ delete
    @with_vm_locks(lambda ids: vms_of(ids))
    def delete_many(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[Storage]:
        found = []
        for index, ident in enumerate(ids):
            with at_index(index if indexed else None):
                found.append(self.get(ident, principal))
                if found[-1].boot:
                    raise root_disk(found[-1], "is deleted on its own")
        messages: list[str] = []
        driver = hypervisor()
        for index, storage in enumerate(found):
            undo: Undo = []
            disk = AttachedVolume(storage)
            step = "detaching the disk"
            try:
                with at_index(index if indexed else None):
                    try:
                        self.detach(disk, messages, undo)
                        step = "redefining the domain"
                        driver.define(disk.host.uri, disk.domain(without=True))
                        undo.append(lambda d=disk: driver.define(d.host.uri, d.domain()))
                        step = "deleting the volume"
                        if not delete_volume(disk.storage, disk.host):
                            messages.append(f"The volume of storage {storage.id} was already gone.")
                    except HypervisorError as exc:
                        raise hypervisor_failure(exc, step, disk.host) from exc
            except BaseException:
                run_undo(undo)
                raise
            db.session.delete(storage)
            db.session.commit()
        return Outcome(found, messages)
