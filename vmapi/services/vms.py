"""VM use cases: create, change, delete and reboot, synchronously and all-or-nothing.

The order of every write (DESIGN.md): claim capacity and commit, talk to libvirt with
no row lock held, then record what libvirt reports — or undo the claim. Each step
that changed something pushes its inverse on an undo stack; any failure runs the stack
backwards, so a request (or a whole array) leaves nothing half done: no domain, no
claim, no row. A worker killed between two steps leaves a ``building`` row that
``flask vmapi reconcile --fix`` cleans.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from vmapi.auth import Principal
from vmapi.errors import (
    ApiError,
    Conflict,
    Forbidden,
    HypervisorFailure,
    NotFound,
    ValidationError,
    at_index,
)
from vmapi.errors import HypervisorTimeout as HypervisorTimeoutError
from vmapi.extensions import db
from vmapi.hypervisor import (
    PAUSED,
    RUNNING,
    SHUTOFF,
    DomainInfo,
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    OperationInvalid,
)
from vmapi.models import Node, VirtMethod, Vm, VmState
from vmapi.scheduler import (
    Defaults,
    NoValidHost,
    PlacementRequest,
    claim,
    release,
    select_and_claim,
    unsuitable_reasons,
)
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.designer import domain_spec
from vmapi.services.hosts import hypervisor, node_uri

log = logging.getLogger(__name__)

BUILDING = "building"
SETTABLE_STATES = (RUNNING, SHUTOFF, PAUSED)
IMMUTABLE = {"uuid": "uuid", "node_id": "node", "virt_method_id": "virt_method"}
SIZE_FIELDS = ("cores", "ram", "cputime_limit")

Undo = list[Callable[[], None]]


def scheduler_defaults() -> Defaults:
    cooloff = timedelta(seconds=current_app.config["LIBVIRT_COOLOFF"])
    return Defaults(down_since=datetime.now(UTC) - cooloff)


def state_id(name: str) -> int:
    return db.session.scalars(select(VmState.id).where(VmState.name == name)).one()


def run_undo(undo: Undo) -> None:
    """Run the inverses of what was done, newest first; keep going past failures."""
    while undo:
        step = undo.pop()
        try:
            step()
        except Exception:  # an undo that fails must not hide the original error
            db.session.rollback()
            log.exception("undo step failed; reconcile will find what is left")


@dataclass
class Host:
    """A VM's node and how to reach it."""

    node: Node
    uri: str

    @classmethod
    def of(cls, node_id: int) -> Host:
        node = db.session.get(Node, node_id)
        return cls(node, node_uri(node.fqdn, node.libvirt_uri))


@dataclass
class UpdatePlan:
    vm_id: int
    changes: dict[str, Any]
    target_state: str | None
    messages: list[str] = field(default_factory=list)


class VmService(CrudService[Vm]):
    def __init__(self) -> None:
        super().__init__(Vm, "vm")

    # ------------------------------------------------------------------ reading
    def scope(self, stmt, principal: Principal):
        """Customers see only their own VMs; others' answer 404 as if absent."""
        if principal.is_admin:
            return stmt
        return stmt.where(Vm.customer_id == principal.customer_id)

    # ------------------------------------------------------------------ errors
    def failure(self, exc: HypervisorError, step: str, host: Host) -> ApiError:
        """A hypervisor failure as the API answers it; marks the node down when unreachable."""
        data = {"step": step, "node": {"id": host.node.id}}
        if isinstance(exc, HypervisorUnavailable | HypervisorTimeout):
            self.note_host_failure(host.node.id)
        if isinstance(exc, HypervisorTimeout):
            return HypervisorTimeoutError(
                f"Node {host.node.fqdn} did not answer within {exc.timeout:g} s while "
                f"{step}; the request was undone.",
                error_id="vm/hypervisor_timeout",
                data=data,
            )
        return HypervisorFailure(
            f"Node {host.node.fqdn} failed while {step}: {exc.reason}",
            error_id="vm/hypervisor_error",
            data=data,
        )

    @staticmethod
    def note_host_failure(node_id: int) -> None:
        """Remember that the node's libvirt failed, so the scheduler skips it for a while."""
        try:
            db.session.rollback()
            db.session.execute(
                update(Node).where(Node.id == node_id).values(libvirt_failed_at=datetime.now(UTC))
            )
            db.session.commit()
        except Exception:
            db.session.rollback()
            log.exception("could not record the failure of node %s", node_id)

    # ------------------------------------------------------------------ create
    def create_many(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome[Vm]:
        """Create every VM or none: a failure undoes the VMs already made."""
        prepared = []
        for index, data in enumerate(items):
            with at_index(index if indexed else None):
                prepared.append(self.prepare_create(data, principal))
        undo: Undo = []
        made = []
        for index, data in enumerate(prepared):
            try:
                with at_index(index if indexed else None):
                    made.append(self.create_one(data, undo))
            except BaseException:
                run_undo(undo)
                raise
        return Outcome(made)

    def prepare_create(self, data: dict[str, Any], principal: Principal) -> dict[str, Any]:
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
        if db.session.get(VirtMethod, data["virt_method_id"]) is None:
            raise ValidationError(
                data={"virt_method": [f"No virt_method with id {data['virt_method_id']}."]}
            )
        if data.get("node_id") is not None and db.session.get(Node, data["node_id"]) is None:
            raise NotFound(
                f"No node with id {data['node_id']}.",
                error_id="vm/node_not_found",
                data={"node": {"id": data["node_id"]}},
            )
        data["uuid"] = data.get("uuid") or str(uuidlib.uuid4())
        return data

    def claim_node(self, data: dict[str, Any], request: PlacementRequest) -> int:
        """Claim capacity on the requested node, or on the node the scheduler picks."""
        defaults = scheduler_defaults()
        node_id = data.get("node_id")
        if node_id is None:
            try:
                return select_and_claim(request, defaults, current_app.config["SCHEDULER_WEIGHER"])
            except NoValidHost as exc:
                raise Conflict(
                    "No node can take this VM; data.removed_by_filter says why.",
                    error_id="vm/no_valid_host",
                    data=exc.details,
                ) from exc
        reasons = unsuitable_reasons(node_id, request, defaults)
        if "uuid_free" in reasons:
            raise Conflict(
                f"Node {node_id} already holds a domain with UUID {request.uuid}.",
                error_id="vm/uuid_conflict",
                data={"node": {"id": node_id}, "uuid": request.uuid},
            )
        if not reasons and not claim(node_id, request.cores, request.ram):
            reasons = ["enough_cores", "enough_ram"]  # taken by a concurrent request
        if reasons:
            raise Conflict(
                f"Node {node_id} cannot take this VM: {', '.join(reasons)}.",
                error_id="vm/node_unsuitable",
                data={"node": {"id": node_id}, "reasons": reasons},
            )
        return node_id

    def create_one(self, data: dict[str, Any], undo: Undo) -> Vm:
        """Claim, record as building, define, start, record the state libvirt reports."""
        request = PlacementRequest(data["cores"], data["ram"], data["virt_method_id"], data["uuid"])
        try:
            node_id = self.claim_node(data, request)
            vm = Vm(
                cores=data["cores"],
                ram=data["ram"],
                customer_id=data.get("customer_id"),
                cputime_limit=data.get("cputime_limit"),
                uuid=data["uuid"],
                node_id=node_id,
                virt_method_id=data["virt_method_id"],
                vm_state_id=state_id(BUILDING),
                created_at=datetime.now(UTC),
            )
            db.session.add(vm)
            db.session.commit()
        except IntegrityError as exc:  # a concurrent request took the UUID on that node
            db.session.rollback()
            raise Conflict(
                f"A VM with UUID {request.uuid} was placed on the same node concurrently.",
                error_id="vm/uuid_conflict",
            ) from exc
        except BaseException:
            db.session.rollback()
            raise
        host = Host.of(node_id)
        undo.append(lambda: self.forget(vm))
        spec = domain_spec(vm, db.session.get(VirtMethod, vm.virt_method_id), current_app.config)
        driver = hypervisor()
        step = "defining the domain"
        try:
            driver.define(host.uri, spec)
            undo.append(lambda: self.remove_domain(host, vm.name))
            step = "starting the domain"
            driver.start(host.uri, vm.name)
            step = "reading the domain's state"
            info = driver.domain(host.uri, vm.name)
        except HypervisorError as exc:
            raise self.failure(exc, step, host) from exc
        self.record_state(vm, info)
        return vm

    def remove_domain(self, host: Host, name: str) -> bool:
        """Destroy and undefine; False when there was no such domain."""
        driver = hypervisor()
        try:
            driver.destroy(host.uri, name)
            driver.undefine(host.uri, name)
        except DomainNotFound:
            return False
        return True

    def forget(self, vm: Vm) -> None:
        """Release the VM's claim and delete its row, in one transaction."""
        db.session.rollback()
        row = db.session.scalars(select(Vm).where(Vm.id == vm.id).with_for_update()).first()
        if row is None:
            return
        release(row.node_id, row.cores, row.ram)
        db.session.delete(row)
        db.session.commit()

    def record_state(self, vm: Vm, info: DomainInfo) -> None:
        vm.vm_state_id = state_id(info.state)
        db.session.commit()

    # ------------------------------------------------------------------ update
    def update_many(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[Vm]:
        plans = []
        for index, (ident, data) in enumerate(items):
            with at_index(index if indexed else None):
                plans.append(self.plan_update(ident, data, principal))
        undo: Undo = []
        messages: list[str] = []
        vms = []
        for index, plan in enumerate(plans):
            try:
                with at_index(index if indexed else None):
                    vms.append(self.apply_update(plan, options.get("force", False), undo))
            except BaseException:
                run_undo(undo)
                raise
            prefix = f"vm-{plan.vm_id}: " if indexed else ""
            messages += [prefix + m for m in plan.messages]
        return Outcome(vms, messages)

    def plan_update(self, ident: int, data: dict[str, Any], principal: Principal) -> UpdatePlan:
        vm = self.get(ident, principal)
        fixed = [name for key, name in IMMUTABLE.items() if key in data]
        if fixed:
            raise ValidationError(
                f"{', '.join(fixed)} cannot change; moving a VM is a separate operation.",
                error_id="vm/immutable_field",
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
                    error_id="vm/state_not_settable",
                    data={"vm_state": {"id": row.id, "name": row.name}},
                )
            target = row.name
        return UpdatePlan(vm.id, data, target)

    def apply_update(self, plan: UpdatePlan, force: bool, undo: Undo) -> Vm:
        host = Host.of(db.session.get(Vm, plan.vm_id).node_id)  # a VM never changes node
        driver = hypervisor()
        name = f"vm-{plan.vm_id}"
        # Pushed first, so it runs last when undoing: once the inverses are done, store
        # the state libvirt reports.
        undo.append(lambda: self.record_state(vm, driver.domain(host.uri, name)))
        vm, old = self.change_row(plan, undo)
        method = db.session.get(VirtMethod, vm.virt_method_id)
        sized = [k for k in SIZE_FIELDS if k in plan.changes and plan.changes[k] != old[k]]
        step = "redefining the domain"
        try:
            if sized:
                old_spec = domain_spec(_with(vm, old), method, current_app.config)
                driver.define(host.uri, domain_spec(vm, method, current_app.config))
                undo.append(lambda: driver.define(host.uri, old_spec))
                step = "applying the change to the running domain"
                if driver.domain(host.uri, vm.name).state in (RUNNING, PAUSED):
                    self.apply_live(vm, host, sized, old, plan.messages, undo)
            if plan.target_state:
                step = f"changing the state to {plan.target_state}"
                self.transition(vm, host, plan.target_state, force, undo, plan.messages)
            step = "reading the domain's state"
            info = driver.domain(host.uri, vm.name)
        except OperationInvalid as exc:
            raise Conflict(
                f"vm-{vm.id} cannot do that in its present state: {exc.reason}",
                error_id="vm/state_conflict",
            ) from exc
        except HypervisorError as exc:
            raise self.failure(exc, step, host) from exc
        self.record_state(vm, info)
        return vm

    def change_row(self, plan: UpdatePlan, undo: Undo) -> tuple[Vm, dict[str, Any]]:
        """Lock the row, claim (or release) the size difference, store the new values."""
        try:
            vm = db.session.scalars(select(Vm).where(Vm.id == plan.vm_id).with_for_update()).one()
            old = {k: getattr(vm, k) for k in (*SIZE_FIELDS, "customer_id")}
            cores = plan.changes.get("cores", vm.cores) - vm.cores
            ram = plan.changes.get("ram", vm.ram) - vm.ram
            if (cores > 0 or ram > 0) and not claim(vm.node_id, max(cores, 0), max(ram, 0)):
                reasons = [n for n, d in (("enough_cores", cores), ("enough_ram", ram)) if d > 0]
                raise Conflict(
                    f"Node {vm.node_id} has no room to grow vm-{vm.id}: {', '.join(reasons)}.",
                    error_id="vm/node_unsuitable",
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

        undo.append(restore)
        return vm, old

    def apply_live(
        self,
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
                driver.set_vcpus_live(host.uri, vm.name, value)
            elif key == "ram":
                driver.set_memory_live(host.uri, vm.name, value)
            else:
                quota = value if value is not None else -1
                driver.set_cputune_live(host.uri, vm.name, period, quota)

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
                undo.append(lambda key=key: set_live(key, old[key]))

    def transition(
        self, vm: Vm, host: Host, target: str, force: bool, undo: Undo, messages: list[str]
    ) -> None:
        """Drive the domain to ``target``; a state it is already in is a no-op."""
        driver = hypervisor()
        uri, name = host.uri, vm.name
        current = driver.domain(uri, name).state
        if target == RUNNING:
            if current == PAUSED:
                driver.resume(uri, name)
                undo.append(lambda: driver.suspend(uri, name))
            elif current != RUNNING:
                driver.start(uri, name)
                undo.append(lambda: driver.destroy(uri, name))
        elif target == PAUSED:
            if current == RUNNING:
                driver.suspend(uri, name)
                undo.append(lambda: driver.resume(uri, name))
            elif current != PAUSED:
                raise Conflict(
                    f"vm-{vm.id} is {current}; only a running VM can be paused.",
                    error_id="vm/state_conflict",
                )
        elif current in (RUNNING, PAUSED):  # target shutoff
            if force:
                driver.destroy(uri, name)
            else:
                if current == PAUSED:
                    driver.resume(uri, name)  # a paused guest cannot see the ACPI button
                driver.shutdown(uri, name)
                if not self.wait_for(host, name, SHUTOFF):
                    messages.append(
                        f"vm-{vm.id} was asked to shut down but had not powered off after "
                        f"{current_app.config['SHUTDOWN_TIMEOUT']:g} s; it may still be "
                        "shutting down, or send ?force=true to power it off."
                    )
                    return
            undo.append(lambda: driver.start(uri, name))

    @staticmethod
    def wait_for(host: Host, name: str, state: str) -> bool:
        deadline = time.monotonic() + float(current_app.config["SHUTDOWN_TIMEOUT"])
        while True:
            if hypervisor().domain(host.uri, name).state == state:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    # ------------------------------------------------------------------ delete
    def delete_many(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[Vm]:
        """Delete the VMs and their domains. Every host is checked before anything goes."""
        vms: list[Vm] = []
        for index, ident in enumerate(ids):
            with at_index(index if indexed else None):
                vms.append(self.get(ident, principal))
                self.check_host(vms[-1])
        messages = []
        for index, vm in enumerate(vms):
            host = Host.of(vm.node_id)
            try:
                existed = self.remove_domain(host, vm.name)
            except HypervisorError as exc:
                error = self.failure(exc, "removing the domain", host)
                done = [v.id for v in vms[:index]]
                if done:
                    error.message += f" VMs {done} of this request were already deleted."
                if indexed:
                    error.with_index(index)
                raise error from exc
            self.forget(vm)
            if not existed:
                messages.append(
                    f"vm-{vm.id} had no domain on {host.node.fqdn} any more; "
                    "it was removed from the inventory."
                )
        return Outcome(vms, messages)

    def check_host(self, vm: Vm) -> None:
        """Refuse early (nothing deleted) when the VM's host does not answer."""
        host = Host.of(vm.node_id)
        try:
            hypervisor().domain(host.uri, vm.name)
        except DomainNotFound:
            return
        except HypervisorError as exc:
            raise self.failure(exc, "checking the domain before deleting", host) from exc

    # ------------------------------------------------------------------ actions
    def reboot(self, ident: int, principal: Principal) -> Outcome[Vm]:
        vm = self.get(ident, principal)
        host = Host.of(vm.node_id)
        driver = hypervisor()
        step = "reading the domain's state"
        try:
            info = driver.domain(host.uri, vm.name)
            if info.state != RUNNING:
                raise Conflict(
                    f"vm-{vm.id} is {info.state}; only a running VM can be rebooted.",
                    error_id="vm/state_conflict",
                )
            step = "rebooting"
            driver.reboot(host.uri, vm.name)
            info = driver.domain(host.uri, vm.name)
        except OperationInvalid as exc:
            raise Conflict(
                f"vm-{vm.id} cannot reboot: {exc.reason}", error_id="vm/state_conflict"
            ) from exc
        except HypervisorError as exc:
            raise self.failure(exc, step, host) from exc
        self.record_state(vm, info)
        return Outcome([vm])


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
    )
    for key, value in values.items():
        setattr(copy, key, value)
    return copy
