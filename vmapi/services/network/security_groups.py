"""/security_group and /security_group_rule: named sets of allow rules that interfaces use
(API.md "Network protection"; the filters they become on the nodes are
vmapi.services.network.protection's).

Ownership is the image catalog's: a group belongs to a customer, or with ``customer_id``
null is an admin group. A customer reads its own groups and the admin groups (it may give
those to its interfaces), with their rules, and changes only its own (an admin group
answers 403: it can see it, so a 404 would lie); another customer's groups and rules
answer 404 as if absent. A rule's group is named when the rule is made and never changes,
nor does a group's owner.

Every change of a group's rules is followed, once committed, by
:func:`~vmapi.services.network.protection.groups_changed`, whose notes join the answer's
``message``. Creates count against the owner's ``max_security_groups`` and
``max_security_rules`` under the quota row's lock (:mod:`vmapi.services.quotas`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, or_, select

from vmapi import error_ids
from vmapi.auth import Principal
from vmapi.error_ids import SECURITY_GROUP_NOT_FOUND
from vmapi.errors import Conflict, Forbidden, NotFound, ValidationError
from vmapi.extensions import db
from vmapi.models import InterfaceSecurityGroup, SecurityGroup, SecurityGroupRule
from vmapi.models.security import PORT_PROTOCOLS
from vmapi.services.crud import IN_USE_SAMPLE, CrudService, Outcome
from vmapi.services.network.protection import groups_changed
from vmapi.services.ownership import usable_security_groups
from vmapi.services.quotas import check_security_quota

#: the one ethertype each ICMP protocol goes with
ICMP_ETHERTYPES = {"icmp": "ipv4", "icmpv6": "ipv6"}
VERSIONS = {"ipv4": 4, "ipv6": 6}


def usable_groups(ids: Sequence[int], customer_id: int | None) -> list[int]:
    """``ids`` (in their order, each once) if each names a group an interface of
    ``customer_id`` may use: one of that customer's, or an admin group (``customer_id``
    null; the only ones for a VM without a customer). Otherwise 404
    ``security_group/not_found`` naming the first id that is not."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return []
    found = set(
        db.session.scalars(usable_security_groups(customer_id).where(SecurityGroup.id.in_(wanted)))
    )
    for ident in wanted:
        if ident not in found:
            raise NotFound(
                f"No security_group with id {ident} that this interface's owner may use "
                "(its own groups, or admin groups).",
                error_id=SECURITY_GROUP_NOT_FOUND,
                data={"security_group": {"id": ident}},
            )
    return wanted


def check_may_change(group: SecurityGroup, principal: Principal) -> None:
    """Customers change their own groups (and their rules) only; admin groups are for
    admins to change (others' groups they do not even see)."""
    if not principal.is_admin and group.customer_id != principal.customer_id:
        raise Forbidden(
            f"security_group {group.id} is an admin group; only admins change it or its rules.",
            data={"security_group": {"id": group.id}},
        )


class SecurityGroupService(CrudService[SecurityGroup]):
    def __init__(self) -> None:
        super().__init__(SecurityGroup, "security_group")

    def customer_scope(self, stmt: Select, customer_id: int | None) -> Select:
        return stmt.where(
            or_(SecurityGroup.customer_id.is_(None), SecurityGroup.customer_id == customer_id)
        )

    def create(self, data: dict[str, Any], principal: Principal) -> SecurityGroup:
        data = dict(data)
        if not principal.is_admin:
            if data.get("customer_id") not in (None, principal.customer_id):
                raise Forbidden(
                    "A customer token may make security groups only for its own customer id."
                )
            data["customer_id"] = principal.customer_id
        check_security_quota(data.get("customer_id"), groups=1, rules=0)
        return super().create(data, principal)

    def update(
        self, obj: SecurityGroup, data: dict[str, Any], principal: Principal
    ) -> SecurityGroup:
        check_may_change(obj, principal)
        if "customer_id" in data:
            raise ValidationError(
                data={"customer_id": ["Cannot be changed: a group keeps its owner."]}
            )
        return super().update(obj, data, principal)

    def check_unique(self, obj: SecurityGroup) -> None:
        """Names are unique per owner; among admin groups too (the table's unique
        constraint leaves those to a partial index, which the generic check cannot see)."""
        super().check_unique(obj)
        if obj.customer_id is not None or obj.name is None:
            return
        stmt = select(SecurityGroup.id).where(
            SecurityGroup.customer_id.is_(None), SecurityGroup.name == obj.name
        )
        if obj.id is not None:
            stmt = stmt.where(SecurityGroup.id != obj.id)
        with db.session.no_autoflush:
            other = db.session.scalars(stmt.limit(1)).first()
        if other is not None:
            raise Conflict(
                f"Another admin security_group (id {other}) already has name={obj.name!r}.",
                error_id=error_ids.duplicate(self.resource),
                data={"id": other, "fields": ["customer_id", "name"]},
            )

    def delete(self, obj: SecurityGroup, principal: Principal, options: dict[str, Any]) -> None:
        """A group no interface uses goes with its rules (each a delete event)."""
        check_may_change(obj, principal)
        self.check_in_use(obj)
        rules = select(SecurityGroupRule).where(SecurityGroupRule.security_group_id == obj.id)
        for rule in db.session.scalars(rules).all():
            db.session.delete(rule)
        db.session.flush()
        db.session.delete(obj)
        db.session.flush()

    def check_in_use(self, obj: SecurityGroup) -> None:
        """409 ``security_group/in_use`` while interfaces use it (their ids in ``data``)."""
        stmt = (
            select(InterfaceSecurityGroup.interface_id)
            .where(InterfaceSecurityGroup.security_group_id == obj.id)
            .order_by(InterfaceSecurityGroup.interface_id)
            .limit(IN_USE_SAMPLE)
        )
        using = list(db.session.scalars(stmt))
        if using:
            raise Conflict(
                f"security_group {obj.id} is used by interfaces {', '.join(map(str, using))}; "
                "take it off them first (UPDATE /interface).",
                error_id=error_ids.in_use(self.resource),
                data={"interface": using},
            )


def rule_problems(rule: SecurityGroupRule) -> dict[str, list[str]]:
    """What is wrong with a rule's fields together (each field is valid on its own)."""
    problems: dict[str, list[str]] = {}
    if rule.protocol not in PORT_PROTOCOLS:
        for name in ("port_min", "port_max"):
            if getattr(rule, name) is not None:
                problems[name] = [
                    f"Only tcp and udp rules have ports, not {rule.protocol}; send null."
                ]
    elif rule.port_min is None and rule.port_max is not None:
        problems["port_min"] = ["Give port_min with port_max: the range is port_min to port_max."]
    elif rule.port_min is not None and rule.port_max < rule.port_min:
        problems["port_max"] = [f"Must not be below port_min ({rule.port_min})."]
    wanted = ICMP_ETHERTYPES.get(rule.protocol)
    if wanted is not None and rule.ethertype != wanted:
        other = next(p for p, e in ICMP_ETHERTYPES.items() if e == rule.ethertype)
        problems["protocol"] = [
            f"{rule.protocol} goes with ethertype {wanted}; use {other} for {rule.ethertype}."
        ]
    version = VERSIONS[rule.ethertype]
    if rule.remote_cidr is not None and ipaddress.ip_network(rule.remote_cidr).version != version:
        problems["remote_cidr"] = [
            f"Must be an IPv{version} network: the rule's ethertype is {rule.ethertype}."
        ]
    return problems


class SecurityGroupRuleService(CrudService[SecurityGroupRule]):
    def __init__(self) -> None:
        super().__init__(SecurityGroupRule, "security_group_rule")

    def customer_scope(self, stmt: Select, customer_id: int | None) -> Select:
        return stmt.where(
            SecurityGroupRule.security_group_id.in_(usable_security_groups(customer_id))
        )

    @staticmethod
    def group_to_change(group_id: int, principal: Principal) -> SecurityGroup:
        """The group whose rules the principal changes: 400 when it does not exist (or is
        another customer's: as if absent), 403 when it is an admin group and the principal
        a customer."""
        group = db.session.get(SecurityGroup, group_id)
        if group is None or not (
            principal.is_admin or group.customer_id in (None, principal.customer_id)
        ):
            missing = [f"No security_group with id {group_id}."]
            raise ValidationError(data={"security_group": missing})
        check_may_change(group, principal)
        return group

    # ------------------------------------------------------------------ one rule
    def create(self, data: dict[str, Any], principal: Principal) -> SecurityGroupRule:
        group = self.group_to_change(data["security_group_id"], principal)
        check_security_quota(group.customer_id, groups=0, rules=1)
        return super().create(data, principal)

    def update(
        self, obj: SecurityGroupRule, data: dict[str, Any], principal: Principal
    ) -> SecurityGroupRule:
        if "security_group_id" in data:
            raise ValidationError(
                data={
                    "security_group": [
                        "Cannot be changed: a rule stays in its group; make it in the other."
                    ]
                }
            )
        self.group_to_change(obj.security_group_id, principal)
        return super().update(obj, data, principal)

    def complete(self, obj: SecurityGroupRule, data: dict[str, Any], principal: Principal) -> None:
        """The rule as it will be stored: one port when only port_min is given, checked as
        a whole, its network written canonically."""
        if obj.port_min is not None and obj.port_max is None:
            obj.port_max = obj.port_min
        problems = rule_problems(obj)
        if problems:
            raise ValidationError(data=problems)
        if obj.remote_cidr is not None:
            obj.remote_cidr = str(ipaddress.ip_network(obj.remote_cidr))

    def delete(self, obj: SecurityGroupRule, principal: Principal, options: dict[str, Any]) -> None:
        self.group_to_change(obj.security_group_id, principal)
        super().delete(obj, principal, options)

    # ------------------------------------------------------------------ batches
    # Once committed, the groups whose rules changed are applied on the nodes.
    def create_all(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome[SecurityGroupRule]:
        return self.applied(super().create_all(items, principal, indexed))

    def update_all(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[SecurityGroupRule]:
        return self.applied(super().update_all(items, principal, indexed, options))

    def delete_all(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[SecurityGroupRule]:
        return self.applied(super().delete_all(ids, principal, options, indexed))

    @staticmethod
    def applied(outcome: Outcome[SecurityGroupRule]) -> Outcome[SecurityGroupRule]:
        groups = sorted({rule.security_group_id for rule in outcome.objects})
        outcome.messages.extend(groups_changed(groups))
        return outcome
