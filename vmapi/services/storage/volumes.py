"""A VM's volumes on their node, found where their rows say they are, and removed.

A storage row records its volume's location when it is made (node, pool, name, path),
so what a storage type says later never decides which volume a row means. Removing a
VM with its volumes (``DELETE /vm?cascade=storage``, reconcile's cleanup of a stale
``building`` VM) deletes the volumes *before* the domain, each row with its volume:
should one fail, the VM row, its domain (defined again without the volumes that are
gone) and the storage that remains still belong together, and a retry finishes.
"""

from __future__ import annotations

from flask import current_app
from sqlalchemy import select

from vmapi.errors import ApiError, HypervisorTimedOut
from vmapi.extensions import db
from vmapi.hypervisor import DomainNotFound, HypervisorError, PoolNotFound, VolumeNotFound
from vmapi.models import Storage, StorageType, VirtMethod, Vm
from vmapi.models.catalog import RBD
from vmapi.services.nodes.domains import hypervisor_failure, record_state
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.storage.ceph import remove_rbd_volume
from vmapi.services.vms.specs import domain_spec


def delete_volume(storage: Storage, host: Host | None = None) -> bool:
    """Delete the row's volume where the row says it is; False if it was already gone
    (or never made: a create that died before the volume existed, or even before its
    pool did: a pool the node does not have holds nothing of ours). An RBD image goes
    through the API host's Ceph client, whatever node the VM is on."""
    if storage.volume_name is None:
        return False
    storage_type = db.session.get(StorageType, storage.storage_type_id)
    if storage_type is not None and storage_type.backend == RBD:
        return remove_rbd_volume(storage_type, storage.volume_name)
    host = host or Host.of(storage.node_id)
    try:
        hypervisor().delete_volume(host.uri, storage.pool, storage.volume_name)
    except (VolumeNotFound, PoolNotFound):
        return False
    return True


def storage_rows(vm_id: int) -> list[Storage]:
    return list(
        db.session.scalars(select(Storage).where(Storage.vm_id == vm_id).order_by(Storage.id))
    )


def delete_vm_volumes(vm: Vm, host: Host) -> list[str]:
    """Delete every volume of the VM and its row, the domain powered off first (a volume
    in use may not go, or would vanish under the guest). The domain stays defined; the
    caller removes it next. Notes for the answer come back.

    On a failure the domain is defined again without the volumes already gone (it keeps
    the others), its state recorded, and the error says what went and what is left.
    """
    rows = storage_rows(vm.id)
    if not rows:
        return []
    driver = hypervisor()
    step = "powering off the domain before deleting its volumes"
    try:
        driver.destroy(host.uri, vm.domain_name)
        has_domain = True
    except DomainNotFound:
        has_domain = False
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    gone: list[int] = []
    notes = []
    for storage in rows:
        step = f"deleting the volume of storage {storage.id}"
        try:
            if not delete_volume(storage, host):
                notes.append(f"The volume of storage {storage.id} was already gone.")
        except HypervisorError as exc:
            raise _part_way(exc, step, vm, host, has_domain, gone) from exc
        db.session.delete(storage)
        db.session.commit()
        gone.append(storage.id)
    return notes


def _part_way(
    exc: HypervisorError, step: str, vm: Vm, host: Host, has_domain: bool, gone: list[int]
) -> ApiError:
    """The error of a removal that stopped at ``step``, after putting the domain back in
    line with the rows that are left."""
    db.session.rollback()
    left = [storage.id for storage in storage_rows(vm.id)]
    error = hypervisor_failure(exc, step, host)
    kept = f"vm-{vm.id}"
    if has_domain:
        try:
            method = db.session.get(VirtMethod, vm.virt_method_id)
            driver = hypervisor()
            driver.define(host.uri, domain_spec(vm, method, host.node, current_app.config))
            record_state(vm, driver.domain(host.uri, vm.domain_name))
            kept += " and its domain (powered off, defined with the storage left)"
        except HypervisorError:
            db.session.rollback()
            kept += " and its domain (powered off; its definition may still name deleted volumes)"
    reason = (
        f"did not answer in time while {step}"
        if isinstance(error, HypervisorTimedOut)
        else f"failed while {step}: {exc.reason}"
    )
    error.message = (
        f"Node {host.node.fqdn} {reason}. Deleted already: storage {gone or 'none'}; "
        f"kept: {kept}, storage {left}. Retry the delete to finish."
    )
    error.data = {**(error.data or {}), "deleted_storage": gone, "storage": left}
    return error
