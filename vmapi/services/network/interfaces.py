"""/interface: read by the VM's owner; an admin may put it on a VLAN (or take it off) and
give it other free addresses.

libvirt cannot tag bridge (without Open vSwitch), ethernet or user interfaces, so the
VLAN is recorded in the database and in the domain's vmapi metadata for the host's
configuration management (the Puppet ENC), and the answer says so.

Other addresses (``{ipv4: [{id}], ipv6: [{id}]}``, free ones only) replace those the
interface holds, which are released; the domain is redefined (its metadata and, with a
bridge template using ``{vlan}``, its bridge) and the guest's cloud-init seed rebuilt
(services/vms/cloud_init.py), all or nothing: every step pushes its inverse.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from vmapi.auth import Principal
from vmapi.errors import Forbidden, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import PAUSED, RUNNING, HypervisorError
from vmapi.models import Interface, VirtMethod, Vlan, Vm
from vmapi.services import audit
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.network.allocation import FAMILIES, move_addresses
from vmapi.services.network.filters import groups_of, set_groups
from vmapi.services.network.protection import filters_on, follow_live, nic_of, prune_after
from vmapi.services.network.security_groups import usable_groups
from vmapi.services.nodes.domains import hypervisor_failure
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.ownership import own_interfaces
from vmapi.services.undo import Undo, all_or_nothing
from vmapi.services.vms.cloud_init import (
    SeedVolume,
    delete_retired,
    rebuilt_message,
    refresh_seed,
    wanted,
)
from vmapi.services.vms.specs import bridge_template, domain_spec, interface_mode, nic_specs

#: The field of an interface's groups (``[{id}]`` in, a list of ids here).
GROUPS = "security_groups"
#: What an UPDATE may change.
WRITABLE = {"vlan_id", "spoof_guard", GROUPS, *FAMILIES}
#: ... and of that, what only admins may change
ADMIN_ONLY = {"vlan_id", "spoof_guard", *FAMILIES}


class InterfaceService(CrudService[Interface]):
    def __init__(self) -> None:
        super().__init__(Interface, "interface")

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(Interface.id.in_(own_interfaces(customer_id)))

    def load_options(self) -> list:
        return [
            selectinload(Interface.ipv4),
            selectinload(Interface.ipv6),
            selectinload(Interface.security_groups),
        ]

    def update_locks(self, items: list[tuple[int, dict[str, Any]]]) -> Iterable[int]:
        return db.session.scalars(
            select(Interface.vm_id).where(Interface.id.in_([i for i, _d in items]))
        )

    def update_all(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[Interface]:
        retired: list[SeedVolume] = []  # seeds replaced, deleted once every item is done
        messages: list[str] = []

        def check(item: tuple[int, dict[str, Any]]) -> tuple[Interface, dict[str, Any]]:
            ident, data = item
            iface = self.get(ident, principal)
            self.check_fields(data)
            if not principal.is_admin and set(data) & ADMIN_ONLY:
                raise Forbidden(
                    "A customer token may change only the security groups of its interfaces.",
                    data={key: ["Admins only."] for key in sorted(set(data) & ADMIN_ONLY)},
                )
            self.check_references(data)
            self.check_addresses(data)
            if GROUPS in data:
                vm = db.session.get(Vm, iface.vm_id)
                data = {**data, GROUPS: usable_groups(data[GROUPS], vm.customer_id)}
            return iface, data

        def apply(plan: tuple[Interface, dict[str, Any]], undo: Undo) -> Interface:
            iface, data = plan
            return self.change(iface, data, principal, undo, retired, messages)

        ifaces = all_or_nothing(items, indexed, check, apply)
        messages += delete_retired(retired)
        for node_id in sorted({db.session.get(Vm, i.vm_id).node_id for i in ifaces}):
            messages += prune_after(Host.of(node_id))  # the groups no NIC there uses now
        for iface in ifaces:
            if iface.vlan_id is not None:
                node = Host.of(db.session.get(Vm, iface.vm_id).node_id).node
                mode = interface_mode(node, current_app.config)
                messages.append(
                    f"Interface {iface.id} is on VLAN {db.session.get(Vlan, iface.vlan_id).tag}: "
                    "recorded for the host's configuration management, as libvirt cannot tag "
                    f"{mode} interfaces."
                )
        return Outcome(self.loaded(ifaces), messages)

    def change(
        self,
        iface: Interface,
        data: dict[str, Any],
        principal: Principal,
        undo: Undo,
        retired: list[SeedVolume],
        messages: list[str],
    ) -> Interface:
        """Store the change (VLAN, addresses), rebuild the seed if the addresses changed,
        then rewrite the persistent definition; each step pushes its inverse."""
        data = dict(data)
        addresses = {family: data.pop(family) for family in FAMILIES if family in data}
        groups = data.pop(GROUPS, None)
        vm = db.session.get(Vm, iface.vm_id)
        host = Host.of(vm.node_id)
        method = db.session.get(VirtMethod, vm.virt_method_id)
        config = current_app.config
        old_spec = domain_spec(vm, method, host.node, config)  # as it is defined now
        old_filters = filters_on(host, [vm.id])
        old = {key: getattr(iface, key) for key in data}
        old_groups = groups_of([iface.id])[iface.id]
        try:
            self.update(iface, data, principal)
            held = move_addresses(iface.id, addresses)
            if groups is not None and sorted(set(groups)) != old_groups:
                set_groups(iface.id, groups)
                audit.record(db.session, "interface", iface.id, "update",
                             {GROUPS: old_groups}, {GROUPS: sorted(set(groups))})  # fmt: skip
            db.session.commit()
        except IntegrityError as exc:  # the VLAN went meanwhile
            db.session.rollback()
            raise self.integrity_error(exc) from exc
        except BaseException:
            db.session.rollback()
            raise

        def restore() -> None:
            row = db.session.get(Interface, iface.id)
            for key, value in old.items():
                setattr(row, key, value)
            move_addresses(iface.id, held)  # (one another request took since: logged)
            if groups is not None:
                set_groups(iface.id, old_groups)
            db.session.commit()

        undo.push(f"restoring interface {iface.id} and its addresses", restore)
        # the NIC as the database has it now (its NICs only: the disks are read once,
        # for the definition below)
        mode, bridge = interface_mode(host.node, config), bridge_template(host.node, config)
        now = next(n for n in nic_specs(vm.id, mode, bridge) if n.mac == iface.mac)
        before, after = nic_of(old_spec, iface.mac), now
        follow_live(host, vm.id, vm.domain_name, before, after, old_filters, undo)
        what = "new addresses" if addresses else "VLAN" if "vlan_id" in data else "change"
        step = f"recording the {what} in the domain"
        driver = hypervisor()
        try:
            seeded = bool(addresses) and wanted(vm) and refresh_seed(vm, host, undo, retired)
            # written after the seed was rebuilt: the definition names the new one
            driver.define(host.uri, domain_spec(vm, method, host.node, config))
            undo.push(f"redefining {vm.domain_name} with its interfaces as they were",
                      lambda: driver.define(host.uri, old_spec))  # fmt: skip
            if seeded:
                step = "reading the domain's state"
                running = driver.domain(host.uri, vm.domain_name).state in (RUNNING, PAUSED)
                messages.append(rebuilt_message(vm, running))
        except HypervisorError as exc:
            raise hypervisor_failure(exc, step, host) from exc
        return iface

    @staticmethod
    def check_fields(data: dict[str, Any]) -> None:
        if set(data) - WRITABLE:
            raise ValidationError(data={k: ["Read-only."] for k in set(data) - WRITABLE})

    @staticmethod
    def check_addresses(data: dict[str, Any]) -> None:
        """Every address named exists (400 otherwise; whether it is free is seen when it
        is taken: 409)."""
        problems: dict[str, list[str]] = {}
        for family, model in FAMILIES.items():
            for ident in data.get(family, ()):
                if db.session.get(model, ident) is None:
                    problems.setdefault(family, []).append(f"No {family} with id {ident}.")
        if problems:
            raise ValidationError(data=problems)

    def update(self, obj: Interface, data: dict[str, Any], principal: Principal) -> Interface:
        self.check_fields(data)
        kept = {k: v for k, v in data.items() if k not in FAMILIES and k != GROUPS}
        return super().update(obj, kept, principal)
