"""VM use cases: create, change, delete and reboot, synchronously and all-or-nothing.

(Changes to existing VMs are in :mod:`vmapi.services.vms.changes`; the domain on its
host, failure translation and undo in :mod:`vmapi.services.nodes.domains`.)

The order of every write (DESIGN.md): claim capacity and commit, talk to libvirt with
no row lock held, then record what libvirt reports — or undo the claim. Each step
that changed something pushes its inverse on an undo stack; any failure runs the stack
backwards, so a request (or a whole array) leaves nothing half done: no domain, no
claim, no row. A worker killed between two steps leaves a ``building`` row that
``flask vmapi reconcile --fix`` cleans.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from vmapi.auth import Principal
from vmapi.error_ids import (
    VM_HAS_STORAGE,
    VM_IMMUTABLE_FIELD,
    VM_NO_VALID_HOST,
    VM_NODE_NOT_FOUND,
    VM_NODE_UNSUITABLE,
    VM_STATE_CONFLICT,
    VM_STATE_NOT_SETTABLE,
    VM_UUID_CONFLICT,
)
from vmapi.errors import (
    ApiError,
    Conflict,
    Forbidden,
    NotFound,
    ValidationError,
    at_index,
)
from vmapi.extensions import db
from vmapi.hypervisor import (
    RUNNING,
    DomainInfo,
    DomainNotFound,
    HypervisorError,
    NameTaken,
    OperationInvalid,
)
from vmapi.models import Node, Storage, VirtMethod, Vm, VmState
from vmapi.node_detail import NodeNote, prefixed
from vmapi.scheduler import (
    Defaults,
    NoValidHost,
    PlacementRequest,
    claim,
    select_and_claim,
    unsuitable_reasons,
)
from vmapi.services.consoles.log import delete_console_log, ensure_console_log, log_remover
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.locks import with_vm_locks
from vmapi.services.names import domain_name
from vmapi.services.network.allocation import NewInterface, add_interface
from vmapi.services.nodes.domains import (
    BUILDING,
    forget,
    hypervisor_failure,
    name_taken,
    node_detail,
    record_state,
    remove_domain,
    state_id,
)
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.quotas import check_vm_quota
from vmapi.services.storage.volumes import delete_vm_volumes
from vmapi.services.undo import Undo, all_or_nothing, apply_all, check_all
from vmapi.services.vms.arrays import create_array
from vmapi.services.vms.boot import (
    Boot,
    add_root_disk,
    check_image,
    forget_root_disk,
    make_root_disk,
    plan_boot,
)
from vmapi.services.vms.changes import IMMUTABLE, SETTABLE_STATES, UpdatePlan, apply_update
from vmapi.services.vms.cloud_init import (
    SeedVolume,
    delete_retired,
    delete_seed,
    refresh_seed,
    wanted,
)
from vmapi.services.vms.specs import domain_spec, new_nic_specs
from vmapi.telemetry import PLACEMENT_SECONDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewVm:
    """A VM to create, checked: its fields, its virt_method row (read once; the domain is
    defined with it) and, when it boots from an image, that image and its root disk."""

    data: dict[str, Any]
    method: VirtMethod
    boot: Boot | None = None


@dataclass(frozen=True)
class Placed:
    """A new VM after the first half of its create: its row committed as building with
    its claim and interface (and its root disk's row), and its host."""

    vm: Vm
    host: Host
    interface: NewInterface  # with the addresses it holds: the domain's NICs come from it
    root: Storage | None = None


def scheduler_defaults() -> Defaults:
    cooloff = timedelta(seconds=current_app.config["LIBVIRT_COOLOFF"])
    return Defaults(down_since=datetime.now(UTC) - cooloff)


class VmService(CrudService[Vm]):
    def __init__(self) -> None:
        super().__init__(Vm, "vm")

    # ------------------------------------------------------------------ reading
    def load_options(self) -> list:
        return [selectinload(Vm.interfaces)]

    def get_options(self) -> list:
        return [joinedload(Vm.interfaces)]

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(Vm.customer_id == customer_id)

    # ------------------------------------------------------------------ errors
    # ------------------------------------------------------------------ create
    def create_many(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome[Vm]:
        """Create every VM or none: a failure undoes the VMs already made. An array of
        VMs without an image calls its nodes at once (:mod:`vmapi.services.vms.arrays`)."""
        checked = check_all(items, indexed, lambda data: self.prepare_create(data, principal))
        if indexed and len(checked) > 1 and all(new.boot is None for new in checked):
            return Outcome(create_array(checked, self.place, finish))
        return Outcome(apply_all(checked, indexed, self.create_one))

    def prepare_create(self, data: dict[str, Any], principal: Principal) -> NewVm:
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
        boot = plan_boot(data)
        return NewVm(data, method, boot)

    def claim_node(self, data: dict[str, Any], request: PlacementRequest) -> Node:
        """Claim capacity on the requested node, or on the node the scheduler picks; the
        node as the claim left it."""
        defaults = scheduler_defaults()
        node_id = data.get("node_id")
        if node_id is None:
            try:
                with PLACEMENT_SECONDS.time():
                    weigher = current_app.config["SCHEDULER_WEIGHER"]
                    return select_and_claim(request, defaults, weigher)
            except NoValidHost as exc:
                raise Conflict(
                    "No node can take this VM; data.removed_by_filter says why.",
                    error_id=VM_NO_VALID_HOST,
                    data=exc.details,
                ) from exc
        reasons = unsuitable_reasons(node_id, request, defaults)
        if "uuid_free" in reasons:
            raise Conflict(
                f"Node {node_id} already holds a domain with UUID {request.uuid}.",
                error_id=VM_UUID_CONFLICT,
                data={"node": {"id": node_id}, "uuid": request.uuid},
            )
        node = None if reasons else claim(node_id, request.cores, request.ram)
        if node is None:
            reasons = reasons or ["enough_cores", "enough_ram"]  # a concurrent request won
            raise Conflict(
                f"Node {node_id} cannot take this VM: {', '.join(reasons)}.",
                error_id=VM_NODE_UNSUITABLE,
                data={"node": {"id": node_id}, "reasons": reasons},
            )
        return node

    def place(self, new: NewVm, undo: Undo, commit: bool = True) -> Placed:
        """The first half of a create, in the request's session: check the quota (and the
        image), claim a node, insert the row as building with its interface (and root
        disk row), commit; its undo (the claim, the row) goes on ``undo``. An array
        commits its elements together (``commit=False``): a failure rolls them all back."""
        data, boot = new.data, new.boot
        request = PlacementRequest(data["cores"], data["ram"], data["virt_method_id"], data["uuid"],
                                   image_id=data.get("image_id"))  # fmt: skip
        root = None
        try:
            check_vm_quota(data.get("customer_id"), 1, data["cores"], data["ram"])
            if boot is not None:
                check_image(boot, data.get("customer_id"))
            node = self.claim_node(data, request)
            # the claimed row, still in the session (no query); a node whose stored URI
            # may not be opened fails here, before anything is written (409)
            host = Host.of(node.id)
            vm = Vm(
                cores=data["cores"],
                ram=data["ram"],
                customer_id=data.get("customer_id"),
                cputime_limit=data.get("cputime_limit"),
                hostname=data.get("hostname"),
                ssh_keys=data.get("ssh_keys", []),
                user_data=data.get("user_data"),
                uuid=data["uuid"],
                node_id=node.id,
                virt_method_id=data["virt_method_id"],
                vm_state_id=state_id(BUILDING),
                created_at=datetime.now(UTC),
                image_id=data.get("image_id"),
            )
            db.session.add(vm)
            db.session.flush()
            # stored before the domain is made, so whatever happens next, the row names it
            vm.domain_name = domain_name(vm.id)
            vm.hostname = vm.hostname or vm.name
            made = add_interface(vm)
            if boot is not None:
                root = add_root_disk(vm, boot)
            if commit:
                db.session.commit()
        except IntegrityError as exc:  # a concurrent request took the UUID on that node
            db.session.rollback()
            raise Conflict(
                f"A VM with UUID {request.uuid} was placed on the same node concurrently.",
                error_id=VM_UUID_CONFLICT,
            ) from exc
        except BaseException:
            db.session.rollback()
            raise
        undo.append(lambda: forget(vm))
        return Placed(vm, host, made, root)

    def create_one(self, new: NewVm, undo: Undo) -> Vm:
        """Claim, record as building, define, start, record the state libvirt reports."""
        placed = self.place(new, undo)
        vm, host, root, boot = placed.vm, placed.host, placed.root, new.boot
        try:
            # recorded on the row with the domain's state (record_state commits it)
            ensure_console_log(vm, host, commit=False)
        except HypervisorError as exc:
            raise hypervisor_failure(exc, "preparing the console log", host) from exc
        undo.append(log_remover(vm, host))
        if root is not None:
            root_id = root.id
            undo.append(lambda: forget_root_disk(root_id))
            make_root_disk(vm, root, boot, host, undo)
            # what the guest is told: a VM booted from an image gets a cloud-init seed
            if wanted(vm):
                refresh_seed(vm, host, undo)
        # a new VM without an image has no storage yet: no need to read its disks
        with db.session.no_autoflush:  # the log's path is written with the state, below
            nics = new_nic_specs([placed.interface], host.node, current_app.config)
            spec = domain_spec(
                vm, new.method, host.node, current_app.config, disks=root is not None, nics=nics
            )
        driver = hypervisor()
        step = "defining the domain"
        try:
            driver.define(host.uri, spec)
            undo.append(lambda: remove_domain(host, vm.domain_name))
            step = "starting the domain"
            driver.start(host.uri, vm.domain_name)
            step = "reading the domain's state"
            info = driver.domain(host.uri, vm.domain_name)
        except NameTaken as exc:
            raise name_taken(exc, vm.domain_name, host) from exc
        except HypervisorError as exc:
            raise hypervisor_failure(exc, step, host) from exc
        return finish(placed, info)

    # ------------------------------------------------------------------ update
    @with_vm_locks(lambda items: [ident for ident, _data in items])
    def update_many(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[Vm]:
        force = options.get("force", False)

        plans: list[UpdatePlan] = []
        retired: list[SeedVolume] = []  # seeds replaced, deleted once every item is done

        def check(item: tuple[int, dict[str, Any]]) -> UpdatePlan:
            plans.append(self.plan_update(*item, principal))
            return plans[-1]

        def apply(plan: UpdatePlan, undo: Undo) -> Vm:
            return apply_update(plan, force, undo, retired)

        vms = all_or_nothing(items, indexed, check, apply)
        messages = [
            prefixed(f"vm-{plan.vm_id}: " if indexed else "", message)
            for plan in plans
            for message in plan.messages
        ] + delete_retired(retired)
        return Outcome(self.loaded(vms), messages)

    def plan_update(self, ident: int, data: dict[str, Any], principal: Principal) -> UpdatePlan:
        vm = self.get(ident, principal)
        fixed = [name for key, name in IMMUTABLE.items() if key in data]
        if fixed:
            raise ValidationError(
                f"{', '.join(fixed)} cannot change; moving a VM is a separate operation.",
                error_id=VM_IMMUTABLE_FIELD,
                data={name: ["Cannot be changed."] for name in fixed},
            )
        if (
            not principal.is_admin
            and "customer_id" in data
            and data["customer_id"] != vm.customer_id
        ):
            raise Forbidden("A customer token may not change the customer of a VM.")
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

    # ------------------------------------------------------------------ delete
    @with_vm_locks(lambda ids: ids)
    def delete_many(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[Vm]:
        """Delete the VMs and their domains. Every host is checked before anything goes."""
        vms: list[Vm] = []
        cascade = options.get("cascade") == "storage"
        for index, ident in enumerate(ids):
            with at_index(index if indexed else None):
                vms.append(self.get(ident, principal))
                volumes = storage_of(vms[-1].id)  # data volumes: the root disk goes anyway
                if volumes and not cascade:
                    raise Conflict(
                        f"vm-{ident} still has storage {volumes}; delete it first or send "
                        "?cascade=storage.",
                        error_id=VM_HAS_STORAGE,
                        data={"storage": volumes},
                    )
                self.check_host(vms[-1])
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
            if not existed:
                messages.append(
                    NodeNote(
                        f"vm-{vm.id} had no domain on its node any more; "
                        "it was removed from the inventory.",
                        f"node {host.node.fqdn}",
                    )
                )
        return Outcome(vms, messages)

    def check_host(self, vm: Vm) -> None:
        """Refuse early (nothing deleted) when the VM's host does not answer."""
        host = Host.of(vm.node_id)
        try:
            hypervisor().domain(host.uri, vm.domain_name)
        except DomainNotFound:
            return
        except HypervisorError as exc:
            raise hypervisor_failure(exc, "checking the domain before deleting", host) from exc

    # ------------------------------------------------------------------ actions
    @with_vm_locks(lambda ident: [ident])
    def reboot(self, ident: int, principal: Principal) -> Outcome[Vm]:
        vm = self.get(ident, principal)
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
        return Outcome(self.loaded([vm]))


def finish(placed: Placed, info: DomainInfo, commit: bool = True) -> Vm:
    """The last step of a create: record the state its domain reports (commits, unless
    an array commits its elements together)."""
    record_state(placed.vm, info, commit)
    # What the answer shows, known without reading it back: the one new interface.
    set_committed_value(placed.vm, "interfaces", [placed.interface.row])
    return placed.vm


def storage_of(vm_id: int) -> list[int]:
    """The VM's data volumes (its root disk, if any, is not counted: it goes with the VM)."""
    stmt = select(Storage.id).where(Storage.vm_id == vm_id, Storage.boot.is_(False))
    return list(db.session.scalars(stmt.order_by(Storage.id)))
