"""A storage row as a disk of its VM's domain: what the hypervisor needs to know about
it, and the changes of a running domain that creates, updates and deletes share."""

from __future__ import annotations

import string
from collections.abc import Callable

from flask import current_app
from sqlalchemy import select

from vmapi.auth import Principal
from vmapi.error_ids import STORAGE_DETACH_FAILED, STORAGE_ROOT_DISK
from vmapi.errors import Conflict, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import PAUSED, RUNNING, DomainSpec, NotSupported
from vmapi.models import CacheOption, Storage, StorageType, VirtMethod, Vm
from vmapi.models.catalog import RBD
from vmapi.node_detail import NodeNote
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.ownership import own_vms
from vmapi.services.storage.ceph import resize_rbd_volume
from vmapi.services.undo import Undo
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


def check_size(size: int) -> None:
    limit = current_app.config["STORAGE_MAX_SIZE"]
    if size > limit:
        raise ValidationError(data={"size": [f"Must be at most {limit} bytes."]})


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
        self.spec = disk_spec(storage, self.type, cache.name if cache else None)

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
            messages.append(f"Storage {disk.storage.id} grew; the guest sees it after a restart.")
    if disk.type.backend == RBD:  # (the node's pool may not know the image: see ceph.py)
        resize_rbd_volume(disk.type, disk.storage.volume_name or "", size)
        return
    driver.resize_volume(uri, disk.storage.pool, disk.storage.volume_name, size)


def detach(disk: AttachedVolume, messages: list[str], undo: Undo) -> None:
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
    undo.push(f"attaching storage {disk.storage.id} to {name} again",
              lambda: driver.attach_disk_live(uri, name, disk.spec))  # fmt: skip
