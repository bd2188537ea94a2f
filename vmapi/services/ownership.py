"""What a customer owns: its VMs, and through them their interfaces (subqueries)."""

from __future__ import annotations

from sqlalchemy import Select, select

from vmapi.models import Interface, Vm


def own_vms(customer_id: int | None) -> Select:
    return select(Vm.id).where(Vm.customer_id == customer_id)


def own_interfaces(customer_id: int | None) -> Select:
    return select(Interface.id).where(Interface.vm_id.in_(own_vms(customer_id)))
