"""/storage: volumes in a libvirt pool on the VM's node, attached as virtio disks.

The service the routes call: its checks, and the batches, each holding the locks of
the VMs it changes. A create is :mod:`.create`, a change :mod:`.changes`, the disk of a
domain :mod:`.disks`. Each step pushes its named inverse, so a failure leaves no
volume, no disk and no row.
"""

from __future__ import annotations

from typing import Any

from vmapi.auth import Principal
from vmapi.error_ids import STORAGE_NODE_MISMATCH, STORAGE_SHRINK_FORBIDDEN
from vmapi.errors import Conflict, ValidationError, at_index
from vmapi.extensions import db
from vmapi.models import Storage, Vm
from vmapi.services import idempotency
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.ownership import own_vms
from vmapi.services.storage.changes import apply_update
from vmapi.services.storage.create import NewVolume, create_volume, plan_volume
from vmapi.services.storage.disks import check_size, root_disk, visible_vm, vms_of
from vmapi.services.storage.removal import remove_abandoned, remove_storage
from vmapi.services.undo import Undo, all_or_nothing


class StorageService(CrudService[Storage]):
    def __init__(self) -> None:
        super().__init__(Storage, "storage")

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(Storage.vm_id.in_(own_vms(customer_id)))

    # ------------------------------------------------------------------ create
    def create_locks(self, items: list[dict[str, Any]]) -> list[int]:
        return [data["vm_id"] for data in items]

    def create_all(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome[Storage]:
        messages: list[str] = []

        def check(data: dict[str, Any]) -> NewVolume:
            vm = visible_vm(data["vm_id"], principal)
            self.check_references(data)
            new = plan_volume(data, vm)
            check_size(new.data["size"])
            return new

        def apply(new: NewVolume, undo: Undo) -> Storage:
            return create_volume(new, undo, messages)

        def made(done: list[Storage]) -> None:
            # the key names them made once all are attached (each was named building
            # when its row was first committed): a request that dies before leaves them
            # to the retry that takes its key over (remove_abandoned), array and all
            if idempotency.current() is not None:
                idempotency.commit_made([storage.id for storage in done])

        return Outcome(all_or_nothing(items, indexed, check, apply, made), messages)

    def remove_abandoned(self, ids: list[int]) -> None:
        """The volumes a dead request committed and never named made (:mod:`.removal`)."""
        remove_abandoned(ids)

    # ------------------------------------------------------------------ update
    def update_locks(self, items: list[tuple[int, dict[str, Any]]]) -> list[int]:
        return [
            *vms_of([ident for ident, _data in items]),
            *[data["vm_id"] for _ident, data in items if "vm_id" in data],
        ]

    def update_all(
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
            apply_update(storage, data, undo, messages)
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
            check_size(data["size"])
        if "storage_type_id" in data and data["storage_type_id"] != storage.storage_type_id:
            raise ValidationError(data={"storage_type": ["Cannot change; make a new volume."]})
        if "image_id" in data and data["image_id"] != storage.image_id:
            raise ValidationError(
                data={"image": ["Cannot change; make a new volume from the image (POST)."]}
            )
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

    # ------------------------------------------------------------------ delete
    def delete_locks(self, ids: list[int]) -> list[int]:
        return vms_of(ids)

    def delete_all(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[Storage]:
        found = []
        for index, ident in enumerate(ids):
            with at_index(index if indexed else None):
                found.append(self.get(ident, principal))
                if found[-1].boot:
                    raise root_disk(found[-1], "is deleted on its own")
        messages: list[str] = []
        for index, storage in enumerate(found):
            with at_index(index if indexed else None):
                remove_storage(storage, messages)
        return Outcome(found, messages)
