"""Creating VMs (POST /vm), synchronously and all-or-nothing.

The order of every write (DESIGN.md): claim capacity and commit, talk to libvirt with
no row lock held, then record what libvirt reports — or undo the claim. Each step
that changed something pushes its named inverse on an undo stack; any failure runs the
stack backwards, so a request (or a whole array) leaves nothing half done: no domain, no
claim, no row. A worker killed between two steps leaves a ``building`` row that
``flask vmapi reconcile --fix`` cleans. (An RBD root disk's clone needs no node and no
row lock: it starts before the claim, its undo on the stack from then on,
:func:`vmapi.services.vms.rbd_boot.early_clone`.)

The steps a single create and an array share are in :mod:`vmapi.services.vms.placed`;
an array of VMs without an image calls its nodes at once (:mod:`vmapi.services.vms.arrays`).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from vmapi.auth import Principal
from vmapi.error_ids import VM_NODE_NOT_FOUND
from vmapi.errors import Forbidden, NotFound, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, NameTaken
from vmapi.models import Node, VirtMethod, Vm
from vmapi.models.leftover import DOMAIN
from vmapi.services.consoles.log import ensure_console_log, push_log_remover
from vmapi.services.leftovers import Left
from vmapi.services.network.protection import ensure_for_vm
from vmapi.services.network.security_groups import usable_groups
from vmapi.services.nodes.domains import hypervisor_failure, name_taken, remove_domain
from vmapi.services.nodes.hosts import hypervisor
from vmapi.services.undo import Undo, apply_all, check_all
from vmapi.services.vms.arrays import create_array
from vmapi.services.vms.boot import forget_root_disk, make_root_disk, plan_boot
from vmapi.services.vms.changes import ADMIN_FIELDS
from vmapi.services.vms.cloud_init import refresh_seed, wanted
from vmapi.services.vms.groups import check_joinable
from vmapi.services.vms.placed import NewVm, finish, place, placed_spec
from vmapi.services.vms.rbd_boot import early_clone


def create_vms(items: list[dict[str, Any]], principal: Principal, indexed: bool) -> list[Vm]:
    """Create every VM or none: a failure undoes the VMs already made. An array of
    VMs without an image calls its nodes at once (:mod:`vmapi.services.vms.arrays`)."""
    checked = check_all(items, indexed, lambda data: prepare_create(data, principal))
    if indexed and len(checked) > 1 and all(new.boot is None for new in checked):
        return create_array(checked)
    return apply_all(checked, indexed, create_one)


def prepare_create(data: dict[str, Any], principal: Principal) -> NewVm:
    """The checks that need no lock: roles, references, the generated UUID."""
    data = dict(data)
    if "vm_state_id" in data:
        raise ValidationError(
            data={"vm_state": ["A new VM is always started; set its state with UPDATE."]}
        )
    if not principal.is_admin:
        if data.get("customer_id") not in (None, principal.customer_id):
            raise Forbidden("A customer token may create VMs only for its own customer id.")
        if data.get("node_id") is not None:
            raise Forbidden("A customer token may not choose the node of a VM.")
        chosen = [k for k, default in ADMIN_FIELDS.items() if data.get(k, default) != default]
        if chosen:
            raise Forbidden(f"A customer token may not set {', '.join(chosen)}; admins choose "
                            "backups and high availability.")  # fmt: skip
        data["customer_id"] = principal.customer_id
    method = db.session.get(VirtMethod, data["virt_method_id"])
    if method is None:
        raise ValidationError(
            data={"virt_method": [f"No virt_method with id {data['virt_method_id']}."]}
        )
    if data.get("node_id") is not None and db.session.get(Node, data["node_id"]) is None:
        raise NotFound(
            f"No node with id {data['node_id']}.",
            error_id=VM_NODE_NOT_FOUND,
            data={"node": {"id": data["node_id"]}},
        )
    data["uuid"] = data.get("uuid") or str(uuidlib.uuid4())
    if data.get("security_groups"):  # for its first NIC: the VM's customer's, or admins'
        data["security_groups"] = usable_groups(data["security_groups"], data.get("customer_id"))
    if data.get("server_group_id") is not None:  # the VM's customer's (an admin's: admins')
        check_joinable(data["server_group_id"], data.get("customer_id"), principal)
    boot = plan_boot(data)
    return NewVm(data, method, boot)


def create_one(new: NewVm, undo: Undo) -> Vm:
    """Claim, record as building, define, start, record the state libvirt reports. An
    RBD root disk's clone goes on meanwhile, from before the claim when it can."""
    with early_clone(new.boot, undo) as clone:
        placed = place(new, undo, clone=clone)
    vm, host, root, boot = placed.vm, placed.host, placed.root, new.boot
    try:
        # recorded on the row with the domain's state (record_state commits it)
        ensure_console_log(vm, host, commit=False)
    except HypervisorError as exc:
        raise hypervisor_failure(exc, "preparing the console log", host) from exc
    push_log_remover(undo, vm, host)
    ready = None  # (an RBD root disk's clone goes on meanwhile: waited for before the start)
    if root is not None:
        root_id = root.id
        undo.push(f"forgetting root disk storage {root_id}", lambda: forget_root_disk(root_id))
        ready = make_root_disk(vm, root, boot, host, undo, clone)
        # what the guest is told: a VM booted from an image gets a cloud-init seed
        if wanted(vm):
            refresh_seed(vm, host, undo)
    ensure_for_vm(host, vm.id, undo)
    spec = placed_spec(new, placed)
    driver = hypervisor()
    step = "defining the domain"
    try:
        driver.define(host.uri, spec)
        name = vm.domain_name
        undo.push(f"removing domain {name} from node {host.node.fqdn}",
                  lambda: remove_domain(host, name),
                  Left(host.node.id, DOMAIN, name, vm.id))  # fmt: skip
        if ready is not None:
            ready()
        step = "starting the domain"
        driver.start(host.uri, vm.domain_name)
        step = "reading the domain's state"
        info = driver.domain(host.uri, vm.domain_name)
    except NameTaken as exc:
        raise name_taken(exc, vm.domain_name, host) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    return finish(placed, info)
