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
from sqlalchemy.orm import selectinload

from vmapi.auth import Principal
from vmapi.errors import ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Interface, VirtMethod, Vlan, Vm
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.designer import domain_spec, interface_mode
from vmapi.services.domains import Host, hypervisor_failure
from vmapi.services.hosts import hypervisor
from vmapi.services.locks import with_vm_locks
from vmapi.services.ownership import own_interfaces


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
        before = {ident: self.get(ident, principal).vlan_id for ident, _data in items}
        outcome = super().update_many(items, principal, indexed, options)
        messages = []
        done: list[Interface] = []
        for iface in outcome.objects:
            host = Host.of(db.session.get(Vm, iface.vm_id).node_id)
            try:  # rewrite the persistent definition so its metadata carries the VLAN
                self.redefine(iface, host)
            except HypervisorError as exc:
                self.restore(outcome.objects, before, done)
                raise hypervisor_failure(exc, "recording the VLAN in the domain", host) from exc
            done.append(iface)
            if iface.vlan_id is not None:
                tag = db.session.get(Vlan, iface.vlan_id).tag
                mode = interface_mode(host.node, current_app.config)
                messages.append(
                    f"Interface {iface.id} is on VLAN {tag}: recorded for the host's "
                    f"configuration management, as libvirt cannot tag {mode} interfaces."
                )
        outcome.messages += messages
        return outcome

    @staticmethod
    def redefine(iface: Interface, host: Host) -> None:
        vm = db.session.get(Vm, iface.vm_id)
        method = db.session.get(VirtMethod, vm.virt_method_id)
        hypervisor().define(host.uri, domain_spec(vm, method, host.node, current_app.config))

    def restore(self, ifaces: list[Interface], before: dict[int, int | None], done: list) -> None:
        """Put the VLANs back and redefine the domains already changed (best effort)."""
        for iface in ifaces:
            iface.vlan_id = before[iface.id]
        db.session.commit()
        for iface in done:
            # If this fails too the metadata lags behind; nothing depends on it.
            with contextlib.suppress(HypervisorError):
                self.redefine(iface, Host.of(db.session.get(Vm, iface.vm_id).node_id))

    def update(self, obj: Interface, data: dict[str, Any], principal: Principal) -> Interface:
        if set(data) - {"vlan_id"}:
            raise ValidationError(data={k: ["Read-only."] for k in set(data) - {"vlan_id"}})
        return super().update(obj, data, principal)
