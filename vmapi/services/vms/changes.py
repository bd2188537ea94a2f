"""Changing a VM that exists: resize (claimed, persistent, live where possible), what its
guest is told (the cloud-init seed is rebuilt: services/vms/cloud_init.py) and state.

Each step pushes its inverse on the request's undo stack, so a failure anywhere in an
UPDATE (or later in the same array) restores the row, the claim, the persistent
definition, live settings and the domain's state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from sqlalchemy import func, select

from vmapi.error_ids import VM_NODE_UNSUITABLE, VM_QUOTA_EXCEEDED, VM_STATE_CONFLICT
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.hypervisor import (
    PAUSED,
    RUNNING,
    SHUTOFF,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    OperationInvalid,
)
from vmapi.models import Storage, VirtMethod, Vm
from vmapi.scheduler import claim, release
from vmapi.services.consoles.log import ensure_console_log
from vmapi.services.consoles.tokens import invalidate_console_tokens
from vmapi.services.nodes.domains import hypervisor_failure, node_detail, record_state
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.quotas import check_storage_quota, check_vm_quota
from vmapi.services.undo import Undo
from vmapi.services.vms.cloud_init import (
    GUEST_FIELDS,
    SeedVolume,
    new_seed,
    rebuilt_message,
    upload_seed,
    wanted,
)
from vmapi.services.vms.specs import domain_spec

SETTABLE_STATES = (RUNNING, SHUTOFF, PAUSED)
# (a VM's security groups are given on POST; later they are its interface's: /interface)
IMMUTABLE = {"uuid": "uuid", "node_id": "node", "virt_method_id": "virt_method",
             "image_id": "image", "root_size": "root_size",
             "security_groups": "security_groups",
             "server_group_id": "server_group"}  # fmt: skip
SIZE_FIELDS = ("cores", "ram", "cputime_limit")
#: Fields only admins set (customers read them), with the value a new VM gets without
#: them: backups and high availability. They change nothing on the node.
ADMIN_FIELDS: dict[str, Any] = {"backup_keep": None, "ha": None, "ha_priority": 0,
                                "ha_local_disks": "leave"}  # fmt: skip


@dataclass
class UpdatePlan:
    vm_id: int
    changes: dict[str, Any]
    target_state: str | None
    messages: list[str] = field(default_factory=list)


def apply_update(plan: UpdatePlan, force: bool, undo: Undo, retired: list[SeedVolume]) -> Vm:
    """Row and claim, seed, persistent definition, live change, state; then record the
    state. A seed that was replaced goes to ``retired`` (deleted once the request is done).
    A change of admin fields alone is the row's: the node is not asked (a VM of a node
    that is lost can still be made HA)."""
    if plan.changes and not plan.target_state and plan.changes.keys() <= ADMIN_FIELDS.keys():
        return change_row(plan, undo)[0]
    row = db.session.get(Vm, plan.vm_id)
    host = Host.of(row.node_id)  # a VM never changes node
    driver = hypervisor()
    name = row.domain_name
    # Pushed first, so it runs last when undoing: once the inverses are done, store
    # the state libvirt reports.
    undo.push(
        f"recording the state of {name}",
        lambda: record_state(db.session.get(Vm, plan.vm_id), driver.domain(host.uri, name)),
    )
    vm, old = change_row(plan, undo)
    method = db.session.get(VirtMethod, vm.virt_method_id)
    sized = [k for k in SIZE_FIELDS if k in plan.changes and plan.changes[k] != old[k]]
    told = [k for k in GUEST_FIELDS if k in plan.changes and plan.changes[k] != old[k]]
    step = "redefining the domain"
    try:
        if sized or told:
            seed = new_seed(vm) if told and wanted(vm) else None
            if sized or seed:
                step = "preparing the console log"
                ensure_console_log(vm, host)  # a VM defined before logs were kept gets one now
                step = "redefining the domain"
                # the definition as it was: the row's old values, its seed not replaced yet
                old_spec = domain_spec(_with(vm, old), method, host.node, current_app.config)
                if seed is not None:
                    upload_seed(vm, host, seed, undo, retired)
                driver.define(host.uri, domain_spec(vm, method, host.node, current_app.config))
                undo.push(f"redefining {name} as it was before the change",
                          lambda: driver.define(host.uri, old_spec))  # fmt: skip
                step = "applying the change to the running domain"
                running = driver.domain(host.uri, vm.domain_name).state in (RUNNING, PAUSED)
                if sized and running:
                    apply_live(vm, host, sized, old, plan.messages, undo)
                if seed is not None:
                    plan.messages.append(rebuilt_message(vm, running))
        if plan.target_state:
            step = f"changing the state to {plan.target_state}"
            transition(vm, host, plan.target_state, force, undo, plan.messages)
        step = "reading the domain's state"
        info = driver.domain(host.uri, vm.domain_name)
    except OperationInvalid as exc:
        raise Conflict(
            f"vm-{vm.id} cannot do that in its present state.",
            error_id=VM_STATE_CONFLICT,
            data=node_detail(exc, host),
        ) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    record_state(vm, info)
    return vm


def change_row(plan: UpdatePlan, undo: Undo) -> tuple[Vm, dict[str, Any]]:
    """Lock the row, claim (or release) the size difference, store the new values."""
    try:
        vm = db.session.scalars(select(Vm).where(Vm.id == plan.vm_id).with_for_update()).one()
        old = {k: getattr(vm, k) for k in (*SIZE_FIELDS, "customer_id", *ADMIN_FIELDS,
                                           *GUEST_FIELDS)}  # fmt: skip
        cores = plan.changes.get("cores", vm.cores) - vm.cores
        ram = plan.changes.get("ram", vm.ram) - vm.ram
        owner = plan.changes.get("customer_id", vm.customer_id)
        if owner != vm.customer_id:  # the new customer takes the whole VM, disks too
            check_vm_quota(owner, 1, vm.cores + cores, vm.ram + ram)
            check_storage_quota(owner, disk_bytes(vm.id), VM_QUOTA_EXCEEDED)
            # the previous owner's consoles end with its ownership (sessions already open
            # stay until the browser leaves; their display password expires on its own)
            invalidate_console_tokens(vm.id)
        else:
            check_vm_quota(owner, 0, max(cores, 0), max(ram, 0))
        if (cores > 0 or ram > 0) and not claim(vm.node_id, max(cores, 0), max(ram, 0)):
            reasons = [n for n, d in (("enough_cores", cores), ("enough_ram", ram)) if d > 0]
            raise Conflict(
                f"Node {vm.node_id} has no room to grow vm-{vm.id}: {', '.join(reasons)}.",
                error_id=VM_NODE_UNSUITABLE,
                data={"node": {"id": vm.node_id}, "reasons": reasons},
            )
        if cores < 0 or ram < 0:
            release(vm.node_id, max(-cores, 0), max(-ram, 0))
        for key, value in plan.changes.items():
            setattr(vm, key, value)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise

    def restore() -> None:
        db.session.rollback()
        row = db.session.scalars(select(Vm).where(Vm.id == vm.id).with_for_update()).one()
        # The inverse is unconditional: what was ours to use is ours again.
        release(row.node_id, row.cores - old["cores"], row.ram - old["ram"])
        for key, value in old.items():
            setattr(row, key, value)
        db.session.commit()

    undo.push(f"restoring the row and claim of vm-{vm.id}", restore)
    return vm, old


def disk_bytes(vm_id: int) -> int:
    """Bytes of the VM's volumes (its root disk and data storage): what ``max_storage``
    counts for its owner."""
    stmt = select(func.coalesce(func.sum(Storage.size), 0)).where(Storage.vm_id == vm_id)
    return int(db.session.scalar(stmt))


def apply_live(
    vm: Vm,
    host: Host,
    sized: list[str],
    old: dict[str, Any],
    messages: list[str],
    undo: Undo,
) -> None:
    """Change the running domain where the hypervisor allows; say what waits a restart."""
    driver = hypervisor()
    period = current_app.config["CPU_PERIOD"]

    def set_live(key: str, value: Any) -> None:
        if key == "cores":
            driver.set_vcpus_live(host.uri, vm.domain_name, value)
        elif key == "ram":
            driver.set_memory_live(host.uri, vm.domain_name, value)
        else:
            quota = value if value is not None else -1
            driver.set_cputune_live(host.uri, vm.domain_name, period, quota)

    for key in sized:
        try:
            set_live(key, getattr(vm, key))
        except (HypervisorUnavailable, HypervisorTimeout):
            raise
        except HypervisorError as exc:
            messages.append(
                f"The new {key} of vm-{vm.id} is saved and takes effect at the next start; "
                f"the running domain could not change it ({exc.reason})."
            )
        else:
            undo.push(f"setting the {key} of the running {vm.domain_name} back",
                      lambda key=key: set_live(key, old[key]))  # fmt: skip


def transition(
    vm: Vm, host: Host, target: str, force: bool, undo: Undo, messages: list[str]
) -> None:
    """Drive the domain to ``target``; a state it is already in is a no-op."""
    driver = hypervisor()
    uri, name = host.uri, vm.domain_name
    current = driver.domain(uri, name).state
    if target == RUNNING:
        if current == PAUSED:
            driver.resume(uri, name)
            undo.push(f"pausing {name} again", lambda: driver.suspend(uri, name))
        elif current != RUNNING:
            driver.start(uri, name)
            undo.push(f"powering {name} off again", lambda: driver.destroy(uri, name))
    elif target == PAUSED:
        if current == RUNNING:
            driver.suspend(uri, name)
            undo.push(f"resuming {name}", lambda: driver.resume(uri, name))
        elif current != PAUSED:
            raise Conflict(
                f"vm-{vm.id} is {current}; only a running VM can be paused.",
                error_id=VM_STATE_CONFLICT,
            )
    elif current in (RUNNING, PAUSED):  # target shutoff
        if force:
            driver.destroy(uri, name)
        else:
            if current == PAUSED:
                driver.resume(uri, name)  # a paused guest cannot see the ACPI button
            driver.shutdown(uri, name)
            if not wait_for(host, name, SHUTOFF):
                messages.append(
                    f"vm-{vm.id} was asked to shut down but had not powered off after "
                    f"{current_app.config['SHUTDOWN_TIMEOUT']:g} s; it may still be "
                    "shutting down, or send ?force=true to power it off."
                )
                return
        undo.push(f"starting {name} again", lambda: driver.start(uri, name))


def wait_for(host: Host, name: str, state: str) -> bool:
    deadline = time.monotonic() + float(current_app.config["SHUTDOWN_TIMEOUT"])
    while True:
        if hypervisor().domain(host.uri, name).state == state:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _with(vm: Vm, values: dict[str, Any]) -> Vm:
    """A detached copy of ``vm`` with some values replaced (for the previous spec)."""
    copy = Vm(
        id=vm.id,
        cores=vm.cores,
        ram=vm.ram,
        cputime_limit=vm.cputime_limit,
        uuid=vm.uuid,
        node_id=vm.node_id,
        virt_method_id=vm.virt_method_id,
        domain_name=vm.domain_name,
        seed_pool=vm.seed_pool,
        seed_volume=vm.seed_volume,
        seed_path=vm.seed_path,
        console_log_pool=vm.console_log_pool,
        console_log_path=vm.console_log_path,
    )
    for key, value in values.items():
        setattr(copy, key, value)
    return copy
