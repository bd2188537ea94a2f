"""Blueprints of /security_group and /security_group_rule (admins, and customers for their
own groups; admin groups are read by all and changed by admins)."""

from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.security import SecurityGroupRuleSchema, SecurityGroupSchema
from vmapi.services.network.security_groups import (
    SecurityGroupRuleService,
    SecurityGroupService,
)

security_group = ResourceApi(
    "security_group",
    SecurityGroupSchema,
    SecurityGroupService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    summary="Security groups: named sets of allow rules that interfaces use; a customer's "
    "own, or admin groups (customer_id null) that every customer may read and use.",
)
security_group_rule = ResourceApi(
    "security_group_rule",
    SecurityGroupRuleSchema,
    SecurityGroupRuleService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    summary="The rules of security groups: each allows traffic of one direction, "
    "ethertype, protocol, port range and remote network; a change applies to every "
    "running guest using the group at once.",
)
