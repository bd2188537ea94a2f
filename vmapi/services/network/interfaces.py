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
from vmapi.errors import ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import PAUSED, RUNNING, HypervisorError
from vmapi.models import Interface, VirtMethod, Vlan, Vm
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.network.allocation import FAMILIES, move_addresses
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
from vmapi.services.vms.specs import domain_spec, interface_mode

#: What an UPDATE may change.
WRITABLE = {"vlan_id", *FAMILIES}


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
            self.check_references(data)
            self.check_addresses(data)
            return iface, data

        def apply(plan: tuple[Interface, dict[str, Any]], undo: Undo) -> Interface:
            iface, data = plan
            return self.change(iface, data, principal, undo, retired, messages)

        ifaces = all_or_nothing(items, indexed, check, apply)
        messages += delete_retired(retired)
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
        vm = db.session.get(Vm, iface.vm_id)
        host = Host.of(vm.node_id)
        method = db.session.get(VirtMethod, vm.virt_method_id)
        config = current_app.config
        old_spec = domain_spec(vm, method, host.node, config)  # as it is defined now
        old = {key: getattr(iface, key) for key in data}
        try:
            self.update(iface, data, principal)
            held = move_addresses(iface.id, addresses)
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
            db.session.commit()

        undo.push(f"restoring interface {iface.id} and its addresses", restore)
        step = f"recording the {'new addresses' if addresses else 'VLAN'} in the domain"
        driver = hypervisor()
        try:
            seeded = bool(addresses) and wanted(vm) and refresh_seed(vm, host, undo, retired)
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
        return super().update(obj, {k: v for k, v in data.items() if k not in FAMILIES}, principal)
