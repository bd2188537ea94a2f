"""What a customer owns: its VMs, and through them their interfaces; and the security
groups it may use (its own, and admin groups) (subqueries)."""

from __future__ import annotations

from sqlalchemy import Select, or_, select

from vmapi.models import Interface, SecurityGroup, Vm


def own_vms(customer_id: int | None) -> Select:
    return select(Vm.id).where(Vm.customer_id == customer_id)


def own_interfaces(customer_id: int | None) -> Select:
    return select(Interface.id).where(Interface.vm_id.in_(own_vms(customer_id)))


def usable_security_groups(customer_id: int | None) -> Select:
    """The groups of ``customer_id`` and the admin groups (``customer_id`` null), which
    every customer may read and give its interfaces."""
    return select(SecurityGroup.id).where(
        or_(SecurityGroup.customer_id.is_(None), SecurityGroup.customer_id == customer_id)
    )
