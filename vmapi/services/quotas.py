"""Quotas: checked in the same transaction as the capacity claim (or the insert of a
security group or rule), under the quota row's lock, so concurrent creates and resizes of
one customer can never pass a limit together.
"""

from __future__ import annotations

from sqlalchemy import func, select

from vmapi.error_ids import (
    SECURITY_GROUP_QUOTA_EXCEEDED,
    STORAGE_QUOTA_EXCEEDED,
    VM_QUOTA_EXCEEDED,
)
from vmapi.errors import Forbidden
from vmapi.extensions import db
from vmapi.models import Image, Quota, SecurityGroup, SecurityGroupRule, Storage, Vm
from vmapi.services.crud import CrudService


def locked_quota(customer_id: int | None) -> Quota | None:
    if customer_id is None:
        return None
    stmt = select(Quota).where(Quota.customer_id == customer_id).with_for_update()
    return db.session.scalars(stmt).first()


def _exceeded(error_id: str, what: str, limit: int, usage: int, requested: int) -> Forbidden:
    return Forbidden(
        f"This would pass the customer's {what} quota: {usage} used + {requested} asked > {limit}.",
        error_id=error_id,
        data={"quota": what, "limit": limit, "usage": usage, "requested": requested},
    )


def check_vm_quota(customer_id: int | None, vms: int, cores: int, ram: int) -> None:
    """403 ``vm/quota_exceeded`` if adding this would pass a limit (call before commit)."""
    quota = locked_quota(customer_id)
    if quota is None:
        return
    count, used_cores, used_ram = db.session.execute(
        select(func.count(Vm.id), func.coalesce(func.sum(Vm.cores), 0),
               func.coalesce(func.sum(Vm.ram), 0)).where(Vm.customer_id == customer_id)
    ).one()  # fmt: skip
    for what, limit, usage, requested in (
        ("max_vms", quota.max_vms, count, vms),
        ("max_cores", quota.max_cores, used_cores, cores),
        ("max_ram", quota.max_ram, used_ram, ram),
    ):
        if limit is not None and requested > 0 and usage + requested > limit:
            raise _exceeded(VM_QUOTA_EXCEEDED, what, limit, int(usage), requested)


def storage_usage(customer_id: int | None) -> int:
    """Bytes counted against ``max_storage``: the customer's volumes and the files of
    its own images (public images count for nobody)."""
    volumes = db.session.scalar(
        select(func.coalesce(func.sum(Storage.size), 0))
        .join(Vm, Vm.id == Storage.vm_id)
        .where(Vm.customer_id == customer_id)
    )
    images = db.session.scalar(
        select(func.coalesce(func.sum(Image.size), 0)).where(Image.customer_id == customer_id)
    )
    return int(volumes) + int(images)


def check_storage_quota(
    customer_id: int | None, size: int, error_id: str = STORAGE_QUOTA_EXCEEDED
) -> None:
    """403 ``error_id`` if ``size`` more bytes would pass the limit."""
    quota = locked_quota(customer_id)
    if quota is None or quota.max_storage is None or size <= 0:
        return
    used = storage_usage(customer_id)
    if used + size > quota.max_storage:
        raise _exceeded(error_id, "max_storage", quota.max_storage, used, size)


def storage_room(customer_id: int | None) -> int | None:
    """Bytes the customer may still store (None: no limit). Read without a lock: an
    early answer for a request that will check again under the lock."""
    if customer_id is None:
        return None
    limit = db.session.scalar(select(Quota.max_storage).where(Quota.customer_id == customer_id))
    if limit is None:
        return None
    return max(0, limit - storage_usage(customer_id))


def storage_quota_exceeded(customer_id: int | None, requested: int, error_id: str) -> Forbidden:
    """The refusal of ``requested`` bytes, with the limit and usage as they are now."""
    limit = db.session.scalar(select(Quota.max_storage).where(Quota.customer_id == customer_id))
    return _exceeded(error_id, "max_storage", limit or 0, storage_usage(customer_id), requested)


def check_security_quota(customer_id: int | None, groups: int, rules: int) -> None:
    """403 ``security_group/quota_exceeded`` if ``groups`` more security groups or ``rules``
    more rules would pass the customer's limits (admin groups, customer null, count for
    nobody). Call in the transaction that inserts them, before they are added: the quota
    row stays locked until it ends, and what it inserted before is counted."""
    quota = locked_quota(customer_id)
    if quota is None:
        return
    if groups > 0 and quota.max_security_groups is not None:
        used = db.session.scalar(
            select(func.count(SecurityGroup.id)).where(SecurityGroup.customer_id == customer_id)
        )
        if used + groups > quota.max_security_groups:
            raise _exceeded(SECURITY_GROUP_QUOTA_EXCEEDED, "max_security_groups",
                            quota.max_security_groups, used, groups)  # fmt: skip
    if rules > 0 and quota.max_security_rules is not None:
        used = db.session.scalar(
            select(func.count(SecurityGroupRule.id))
            .join(SecurityGroup, SecurityGroup.id == SecurityGroupRule.security_group_id)
            .where(SecurityGroup.customer_id == customer_id)
        )
        if used + rules > quota.max_security_rules:
            raise _exceeded(SECURITY_GROUP_QUOTA_EXCEEDED, "max_security_rules",
                            quota.max_security_rules, used, rules)  # fmt: skip


class QuotaService(CrudService[Quota]):
    """Admins set quotas; a customer reads its own."""

    def __init__(self) -> None:
        super().__init__(Quota, "quota")

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(Quota.customer_id == customer_id)
