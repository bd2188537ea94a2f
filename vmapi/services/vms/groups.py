"""/server_group, and which group a new VM may join (API.md "/server_group").

A group belongs to a customer, or with ``customer_id`` null is an admin group; a customer
sees and changes only its own (others' answer 404 as if absent). A VM joins a group of its
own customer (a VM without a customer, an admin group) when it is made, and stays in it.

The policy is the scheduler's (:mod:`vmapi.scheduler.filters`), enforced under the group
row's lock (:func:`vmapi.scheduler.claims.lock_group`). A change of ``policy`` or
``customer_id`` and a delete take the same lock and are refused while the group has VMs
(409 ``server_group/in_use`` listing them): a claim into the group and such a change never
interleave.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select

from vmapi import error_ids
from vmapi.auth import Principal
from vmapi.errors import Conflict, Forbidden, ValidationError
from vmapi.extensions import db
from vmapi.models import ServerGroup, Vm
from vmapi.services.crud import IN_USE_SAMPLE, CrudService

#: what a change may not touch while the group has members
FIXED_WITH_MEMBERS = ("policy", "customer_id")


def missing(group_id: int) -> ValidationError:
    """400 naming ``server_group``: no group of that id the VM may join."""
    return ValidationError(data={"server_group": [f"No server_group with id {group_id}."]})


def check_joinable(group_id: int, customer_id: int | None, principal: Principal) -> None:
    """A new VM of ``customer_id`` may join the group: one of that customer's (a VM
    without a customer: an admin group). 400 ``general/validation`` naming
    ``server_group`` otherwise; a customer is not told of a group it may not see."""
    group = db.session.get(ServerGroup, group_id)
    if group is None or not (principal.is_admin or group.customer_id == principal.customer_id):
        raise missing(group_id)
    if group.customer_id != customer_id:
        owner = group.customer_id
        whose = "an admin group" if owner is None else f"customer {owner}'s group"
        why = "a VM joins a group of its own customer (a VM without a customer, an admin group)"
        raise ValidationError(data={"server_group": [f"Is {whose}: {why}."]})


class ServerGroupService(CrudService[ServerGroup]):
    def __init__(self) -> None:
        super().__init__(ServerGroup, "server_group")

    def customer_scope(self, stmt: Select, customer_id: int | None) -> Select:
        return stmt.where(ServerGroup.customer_id == customer_id)

    def create(self, data: dict[str, Any], principal: Principal) -> ServerGroup:
        data = dict(data)
        if not principal.is_admin:
            if data.get("customer_id") not in (None, principal.customer_id):
                raise Forbidden("A customer token may make server groups only for its own "
                                "customer id.")  # fmt: skip
            data["customer_id"] = principal.customer_id
        return super().create(data, principal)

    def update(self, obj: ServerGroup, data: dict[str, Any], principal: Principal) -> ServerGroup:
        if not principal.is_admin and data.get("customer_id", obj.customer_id) != obj.customer_id:
            raise Forbidden("A customer token may not give a server group to another customer.")
        changed = [k for k in FIXED_WITH_MEMBERS if k in data and data[k] != getattr(obj, k)]
        if changed:
            self.lock(obj)
            members = self.members(obj)
            if members:
                raise Conflict(
                    f"server_group {obj.id} has VMs {', '.join(map(str, members))}; its "
                    f"{' and '.join(changed)} cannot change while it has any.",
                    error_id=error_ids.in_use(self.resource),
                    data={"vm": members},
                )
        return super().update(obj, data, principal)

    def delete(self, obj: ServerGroup, principal: Principal, options: dict[str, Any]) -> None:
        """A group without VMs goes; one with VMs is 409 ``server_group/in_use`` (the
        generic check, which lists them)."""
        self.lock(obj)
        super().delete(obj, principal, options)

    @staticmethod
    def lock(obj: ServerGroup) -> None:
        """The group's row lock, as a claim into the group takes it: no VM joins while
        this transaction checks and changes the group."""
        db.session.execute(select(ServerGroup.id).where(ServerGroup.id == obj.id).with_for_update())

    @staticmethod
    def members(obj: ServerGroup) -> list[int]:
        stmt = select(Vm.id).where(Vm.server_group_id == obj.id).order_by(Vm.id)
        return list(db.session.scalars(stmt.limit(IN_USE_SAMPLE)))
