"""/interface: read by the VM's owner; an admin may put it on a VLAN (or take it off).

libvirt cannot tag bridge (without Open vSwitch), ethernet or user interfaces, so the
VLAN is recorded in the database and in the domain's vmapi metadata for the host's
configuration management (the Puppet ENC), and the answer says so.
"""

from __future__ import annotations

import contextlib
from typing import Any

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from vmapi.auth import Principal
from vmapi.errors import ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Interface, VirtMethod, Vlan, Vm
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.domains import Host, hypervisor_failure
from vmapi.services.hosts import hypervisor
from vmapi.services.locks import with_vm_locks
from vmapi.services.ownership import own_interfaces
from vmapi.services.specs import domain_spec, interface_mode
from vmapi.services.undo import Undo, all_or_nothing


class InterfaceService(CrudService[Interface]):
    def __init__(self) -> None:
        super().__init__(Interface, "interface")

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(Interface.id.in_(own_interfaces(customer_id)))

    def load_options(self) -> list:
        return [selectinload(Interface.ipv4), selectinload(Interface.ipv6)]

    @with_vm_locks(
        lambda items: db.session.scalars(
            select(Interface.vm_id).where(Interface.id.in_([i for i, _d in items]))
        )
    )
    def update_many(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[Interface]:
        def check(item: tuple[int, dict[str, Any]]) -> tuple[Interface, dict[str, Any]]:
            ident, data = item
            iface = self.get(ident, principal)
            self.check_fields(data)
            self.check_references(data)
            return iface, data

        def apply(plan: tuple[Interface, dict[str, Any]], undo: Undo) -> Interface:
            iface, data = plan
            return self.change(iface, data, principal, undo)

        ifaces = all_or_nothing(items, indexed, check, apply)
        messages = []
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
        self, iface: Interface, data: dict[str, Any], principal: Principal, undo: Undo
    ) -> Interface:
        """Store the change, then rewrite the persistent definition so its metadata
        carries the VLAN; the inverse puts the row back and rewrites the definition again."""
        old = {key: getattr(iface, key) for key in data}
        try:
            self.update(iface, data, principal)
            db.session.commit()
        except IntegrityError as exc:  # the VLAN went meanwhile
            db.session.rollback()
            raise self.integrity_error(exc) from exc
        except BaseException:
            db.session.rollback()
            raise
        host = Host.of(db.session.get(Vm, iface.vm_id).node_id)

        def restore() -> None:
            row = db.session.get(Interface, iface.id)
            for key, value in old.items():
                setattr(row, key, value)
            db.session.commit()
            # If this fails too the metadata lags behind; nothing depends on it.
            with contextlib.suppress(HypervisorError):
                self.redefine(row, host)

        undo.append(restore)
        try:
            self.redefine(iface, host)
        except HypervisorError as exc:
            raise hypervisor_failure(exc, "recording the VLAN in the domain", host) from exc
        return iface

    @staticmethod
    def redefine(iface: Interface, host: Host) -> None:
        vm = db.session.get(Vm, iface.vm_id)
        method = db.session.get(VirtMethod, vm.virt_method_id)
        hypervisor().define(host.uri, domain_spec(vm, method, host.node, current_app.config))

    @staticmethod
    def check_fields(data: dict[str, Any]) -> None:
        if set(data) - {"vlan_id"}:
            raise ValidationError(data={k: ["Read-only."] for k in set(data) - {"vlan_id"}})

    def update(self, obj: Interface, data: dict[str, Any], principal: Principal) -> Interface:
        self.check_fields(data)
        return super().update(obj, data, principal)
