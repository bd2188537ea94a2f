"""Schemas of /security_group and /security_group_rule.

A field is checked here on its own; what a rule's fields say together (ports only for tcp
and udp, in order; icmp with ipv4, icmpv6 with ipv6; a remote network of the rule's
ethertype) is checked by the service on the rule as it will be stored, since an UPDATE
sends only what changes (vmapi.services.network.security_groups).
"""

from __future__ import annotations

import ipaddress

from marshmallow import ValidationError, validate

from vmapi.models.security import DIRECTIONS, ETHERTYPES, PROTOCOLS
from vmapi.schemas.base import (
    IPV4_PATTERN,
    IPV6_PATTERN,
    BaseSchema,
    Int,
    Ref,
    Str,
    json_schema,
    non_negative,
    prefix_pattern,
    text_field,
)

PORT = validate.Range(min=1, max=65535)
EXAMPLES = "e.g. 198.51.100.0/24 or 2001:db8::/32"


@json_schema(
    pattern=f"^(?:{IPV4_PATTERN}/{prefix_pattern(0, 32)}|{IPV6_PATTERN}/{prefix_pattern(0, 128)})$"
)
def validate_network(value: str) -> None:
    """An IPv4 or IPv6 network with its prefix and no host bits set (strict: a host
    address with a prefix is refused, not read as its network)."""
    _address, slash, prefix = value.rpartition("/")
    try:
        if not (slash and prefix.isascii() and prefix.isdigit()):
            raise ValueError(value)
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValidationError(f"Not a valid network with its prefix, {EXAMPLES}.") from None
    if loose.network_address != ipaddress.ip_interface(value).ip:
        raise ValidationError(f"Has host bits set: the network is {loose}.")


class SecurityGroupSchema(BaseSchema):
    id = Int(dump_only=True)
    name = text_field(required=True, metadata={"description": "Unique per owner."})
    description = text_field(1000, allow_none=True)
    customer_id = Int(
        allow_none=True,
        validate=non_negative(),
        metadata={
            "on_update": False,  # a group keeps its owner
            "description": "The owner; null: an admin group, which every customer may read "
            "and use but only admins change. A customer's own on POST (admins: any).",
        },
    )


class SecurityGroupRuleSchema(BaseSchema):
    id = Int(dump_only=True)
    security_group = Ref(
        "security_group",
        attribute="security_group_id",
        required=True,
        metadata={"on_update": False},  # a rule stays in its group
    )
    direction = Str(
        required=True,
        validate=validate.OneOf(DIRECTIONS),
        metadata={"description": "ingress: what the guest may receive; egress: what it may "
                  "send (once any group of the interface has an egress rule)."},
    )  # fmt: skip
    ethertype = Str(required=True, validate=validate.OneOf(ETHERTYPES))
    protocol = Str(
        required=True,
        validate=validate.OneOf(PROTOCOLS),
        metadata={"description": "icmp only with ethertype ipv4, icmpv6 only with ipv6; "
                  "any: every protocol of the ethertype."},
    )  # fmt: skip
    port_min = Int(
        allow_none=True,
        validate=PORT,
        metadata={"description": "tcp and udp only; null: every port. Given without "
                  "port_max, the range is this one port."},
    )  # fmt: skip
    port_max = Int(
        allow_none=True,
        validate=PORT,
        metadata={"description": "tcp and udp only, with port_min and not below it."},
    )
    remote_cidr = Str(
        allow_none=True,
        validate=validate_network,
        metadata={"description": "The peer's network, of the rule's ethertype, with no host "
                  f"bits set ({EXAMPLES}); null: any address."},
    )  # fmt: skip
