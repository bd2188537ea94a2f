"""A VM's life after its create: changes (checked here, applied by
:mod:`vmapi.services.vms.changes`), reboot and delete, each on a VM its caller read and
holds the lock of (:class:`vmapi.services.vms.service.VmService`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vmapi.auth import Principal
from vmapi.error_ids import (
    VM_HAS_STORAGE,
    VM_IMMUTABLE_FIELD,
    VM_STATE_CONFLICT,
    VM_STATE_NOT_SETTABLE,
)
from vmapi.errors import ApiError, Conflict, Forbidden, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import RUNNING, DomainNotFound, HypervisorError, OperationInvalid
from vmapi.models import Storage, Vm, VmState
from vmapi.node_detail import NodeNote
from vmapi.services.consoles.log import delete_console_log
from vmapi.services.network.protection import prune_after
from vmapi.services.nodes.domains import (
    forget,
    hypervisor_failure,
    node_detail,
    record_state,
    remove_domain,
)
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.storage.volumes import delete_vm_volumes
from vmapi.services.vms.changes import ADMIN_FIELDS, IMMUTABLE, SETTABLE_STATES, UpdatePlan
from vmapi.services.vms.cloud_init import delete_seed


# ---------------------------------------------------------------------- change
def plan_update(vm: Vm, data: dict[str, Any], principal: Principal) -> UpdatePlan:
    """Check a change of ``vm`` (nothing changed yet): what it may change, and to which
    state."""
    fixed = [name for key, name in IMMUTABLE.items() if key in data]
    if fixed:
        raise ValidationError(
            f"{', '.join(fixed)} cannot change; moving a VM is a separate operation.",
            error_id=VM_IMMUTABLE_FIELD,
            data={name: ["Cannot be changed."] for name in fixed},
        )
    if not principal.is_admin and "customer_id" in data and data["customer_id"] != vm.customer_id:
        raise Forbidden("A customer token may not change the customer of a VM.")
    if "customer_id" in data and data["customer_id"] != vm.customer_id and vm.server_group_id:
        raise ValidationError(
            data={"customer_id": [f"vm-{vm.id} is in server_group {vm.server_group_id}, of its "
                                  "customer: it cannot change customer while in a group."]}
        )  # fmt: skip
    if not principal.is_admin:
        chosen = [k for k in ADMIN_FIELDS if k in data and data[k] != getattr(vm, k)]
        if chosen:
            raise Forbidden(f"A customer token may not change {', '.join(chosen)}; admins "
                            "choose backups and high availability.")  # fmt: skip
    target = None
    if "vm_state_id" in data:
        row = db.session.get(VmState, data.pop("vm_state_id"))
        if row is None:
            raise ValidationError(data={"vm_state": ["No such vm_state."]})
        if row.name not in SETTABLE_STATES:
            raise ValidationError(
                f"vm_state {row.name!r} cannot be set; use running, shutoff or paused.",
                error_id=VM_STATE_NOT_SETTABLE,
                data={"vm_state": {"id": row.id, "name": row.name}},
            )
        target = row.name
    return UpdatePlan(vm.id, data, target)


# ---------------------------------------------------------------------- delete
def check_delete(vm: Vm, cascade: bool) -> None:
    """Refuse to delete ``vm`` (nothing deleted yet) while it has data volumes and no
    cascade, or when its host does not answer."""
    volumes = storage_of(vm.id)  # data volumes: the root disk goes anyway
    if volumes and not cascade:
        raise Conflict(
            f"vm-{vm.id} still has storage {volumes}; delete it first or send ?cascade=storage.",
            error_id=VM_HAS_STORAGE,
            data={"storage": volumes},
        )
    check_host(vm)


def delete_vms(vms: list[Vm], indexed: bool) -> list[str]:
    """Delete the (checked) VMs, their volumes, seeds and logs and their domains, in
    order; the notes for the answer. A failure names the VMs already deleted."""
    messages: list[str] = []
    for index, vm in enumerate(vms):
        host = Host.of(vm.node_id)
        step = "removing the domain"
        try:
            # the volumes first, each row with its volume: a failure part-way leaves
            # the VM, its domain and the storage left consistent (services/storage/volumes.py);
            # without cascade there is at most the root disk
            messages += delete_vm_volumes(vm, host)
            existed = remove_domain(host, vm.domain_name)
            delete_seed(vm, host)
            messages += delete_console_log(vm, host)
        except (HypervisorError, ApiError) as exc:
            error = exc if isinstance(exc, ApiError) else hypervisor_failure(exc, step, host)
            done = [v.id for v in vms[:index]]
            if done:
                error.message += f" VMs {done} of this request were already deleted."
            if indexed:
                error.with_index(index)
            raise error from exc
        forget(vm)
        messages += prune_after(host)
        if not existed:
            messages.append(
                NodeNote(
                    f"vm-{vm.id} had no domain on its node any more; "
                    "it was removed from the inventory.",
                    f"node {host.node.fqdn}",
                )
            )
    return messages


def check_host(vm: Vm) -> None:
    """Refuse early (nothing deleted) when the VM's host does not answer."""
    host = Host.of(vm.node_id)
    try:
        hypervisor().domain(host.uri, vm.domain_name)
    except DomainNotFound:
        return
    except HypervisorError as exc:
        raise hypervisor_failure(exc, "checking the domain before deleting", host) from exc


def storage_of(vm_id: int) -> list[int]:
    """The VM's data volumes (its root disk, if any, is not counted: it goes with the VM)."""
    stmt = select(Storage.id).where(Storage.vm_id == vm_id, Storage.boot.is_(False))
    return list(db.session.scalars(stmt.order_by(Storage.id)))


# ---------------------------------------------------------------------- reboot
def reboot_vm(vm: Vm) -> None:
    """Reboot a running VM's domain and record the state it reports."""
    host = Host.of(vm.node_id)
    driver = hypervisor()
    step = "reading the domain's state"
    try:
        info = driver.domain(host.uri, vm.domain_name)
        if info.state != RUNNING:
            raise Conflict(
                f"vm-{vm.id} is {info.state}; only a running VM can be rebooted.",
                error_id=VM_STATE_CONFLICT,
            )
        step = "rebooting"
        driver.reboot(host.uri, vm.domain_name)
        info = driver.domain(host.uri, vm.domain_name)
    except OperationInvalid as exc:
        raise Conflict(
            f"vm-{vm.id} cannot reboot in its present state.",
            error_id=VM_STATE_CONFLICT,
            data=node_detail(exc, host),
        ) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    record_state(vm, info)
