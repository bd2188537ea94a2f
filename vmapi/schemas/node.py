"""Schemas of /node and /virt_node."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from flask import current_app, has_app_context
from marshmallow import ValidationError, validate

from vmapi.bridges import template_problem
from vmapi.config import INTERFACE_MODES
from vmapi.hypervisor.uri import (
    MIGRATION_ADDRESS_PATTERN,
    URI_PATTERN,
    UriPolicy,
    validate_libvirt_uri,
    validate_migration_address,
)
from vmapi.models.catalog import DOMAIN_TYPES
from vmapi.schemas.base import (
    INT32_MAX,
    IPV6_PATTERN,
    BaseSchema,
    Float,
    Int,
    Ref,
    Str,
    UtcDateTime,
    address_validator,
    interface_validator,
    json_schema,
    name_field,
    non_negative,
    positive,
    text_field,
    validate_hostname,
)
from vmapi.services.ha.agents import AGENT_PATTERN
from vmapi.services.nodes.hosts import POLICY_KEY

#: What the pattern cannot say, in words (docs/API.md, "libvirt URIs").
URI_DIRECTORIES = (
    "The test driver's node files (test:///<path>, other than test:///default) must lie "
    "under the configured TEST_DRIVER_DIR, and keyfile, known_hosts and pkipath under "
    "LIBVIRT_CREDENTIAL_DIRS."
)


@json_schema(pattern=URI_PATTERN)
def validate_uri(value: str) -> None:
    # the app's policy (its configured directories); outside an app, the strictest
    policy = current_app.extensions[POLICY_KEY] if has_app_context() else UriPolicy()
    try:
        validate_libvirt_uri(value, policy)
    except ValueError as exc:
        raise ValidationError(f"Not an acceptable libvirt URI: {exc}.") from exc


@json_schema(pattern=MIGRATION_ADDRESS_PATTERN)
def migration_address(value: str) -> None:
    try:
        validate_migration_address(value)
    except ValueError as exc:
        raise ValidationError(f"Not a migration address: {exc}.") from exc


@json_schema(anyOf=[{"format": "ipv4"}, {"format": "ipv6"}])
def ip_address(value: str) -> None:
    """A plain IPv4 or IPv6 address, written canonically (QEMU binds the display to it)."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValidationError("Not a valid IPv4 or IPv6 address.") from exc
    if str(addr) != value:
        raise ValidationError(f"Write it in canonical form: {addr}.")


# Which brace pairs are placeholders is said in words (the description): JSON Schema tools
# rewrite a pattern naming them into one they cannot read.
@json_schema(pattern=r"^[A-Za-z0-9_.{}-]+$", maxLength=64)
def bridge_template(value: str) -> None:
    problem = template_problem(value)
    if problem:
        raise ValidationError(problem)


@json_schema(pattern=AGENT_PATTERN, maxLength=64)
def fence_agent_name(value: str) -> None:
    """The name's form; whether it is installed is the service's (NodeService.complete)."""
    if len(value) > 64 or not re.fullmatch(AGENT_PATTERN, value):
        raise ValidationError("Must be a fence agent's name: fence_ and letters, digits or "
                              "'_', e.g. fence_ipmilan.")  # fmt: skip


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A power controller's address: a host name (one label or more), an IPv4 or IPv6 address
FENCE_ADDRESS_PATTERN = rf"^(?:{_LABEL}(?:\.{_LABEL})*|{IPV6_PATTERN})$"


@json_schema(pattern=FENCE_ADDRESS_PATTERN, maxLength=253)
def fence_address(value: str) -> None:
    if len(value) > 253 or not re.fullmatch(FENCE_ADDRESS_PATTERN, value):
        raise ValidationError("Must be a host name or an IP address, e.g. bmc1.example.com.")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError as exc:
            raise ValidationError("Not a valid IPv6 address.") from exc


FENCE_USER_PATTERN = r"^[A-Za-z0-9_.@+\\-]{1,255}$"


@json_schema(pattern=FENCE_USER_PATTERN, maxLength=255)
def fence_user(value: str) -> None:
    if not re.fullmatch(FENCE_USER_PATTERN, value):
        raise ValidationError("Use 1 to 255 letters, digits and _ . @ + \\ - only.")


class NodeSchema(BaseSchema):
    id = Int(dump_only=True)
    fqdn = Str(required=True, validate=validate_hostname)
    ipv4_addr_ext = Str(required=True, validate=interface_validator(4))
    ipv6_addr_ext = Str(required=True, validate=interface_validator(6))
    ipv4_gw_ext = Str(required=True, validate=address_validator(4))
    ipv6_gw_ext = Str(required=True, validate=address_validator(6))
    location = text_field(allow_none=True)
    bond_interfaces = text_field(allow_none=True)
    node_state = Ref("node_state", attribute="node_state_id", required=True)
    libvirt_uri = Str(allow_none=True, validate=[validate.Length(min=1, max=1024), validate_uri],
                      metadata={"description": URI_DIRECTORIES})  # fmt: skip
    cores = Int(allow_none=True, validate=positive(1 << 20))
    ram = Int(allow_none=True, validate=positive())
    cpu_allocation_ratio = Float(allow_none=True, validate=validate.Range(min=0.01, max=1000))
    ram_allocation_ratio = Float(allow_none=True, validate=validate.Range(min=0.01, max=1000))
    reserved_ram = Int(allow_none=True, validate=non_negative())
    interface_mode = Str(allow_none=True, validate=validate.OneOf(INTERFACE_MODES))
    #: the bridge NICs in bridge mode join: a template ({suffix}, {vlan}); null:
    #: BRIDGE_TEMPLATE
    bridge = Str(
        allow_none=True,
        validate=[validate.Length(min=1, max=64), bridge_template],
        metadata={"description": "{suffix}: the interface's device suffix (a bridge per NIC); "
                  "{vlan}: its VLAN tag or nothing; e.g. br0 for one shared bridge."},
    )  # fmt: skip
    #: where VM displays listen (null: CONSOLE_ADDRESS); the console proxy must reach it
    console_address = Str(allow_none=True, validate=ip_address)
    #: how another node's libvirtd reaches this one for a move (null: libvirt_uri)
    migration_uri = Str(allow_none=True, validate=[validate.Length(min=1, max=1024), validate_uri],
                        metadata={"description": URI_DIRECTORIES})  # fmt: skip
    #: where QEMU's migration stream to this node connects (null: its host name)
    migration_address = Str(allow_none=True, validate=migration_address)
    #: High availability (README): the fence agent that powers the node off (one found in
    #: HA_FENCE_AGENT_DIRS), its power controller and the user there; the password only
    #: from HA_FENCE_PASSWORD_DIR
    fence_agent = Str(
        allow_none=True,
        validate=fence_agent_name,
        metadata={"description": "An installed fence agent (fence-agents: fence_ipmilan, "
                  "fence_redfish, ...) that powers the node off; null: the node cannot be "
                  "fenced, so nothing of it is restarted elsewhere by itself."},
    )  # fmt: skip
    fence_address = Str(
        allow_none=True,
        validate=fence_address,
        metadata={"description": "The power controller's address (the agent's ip)."},
    )
    fence_user = Str(
        allow_none=True,
        validate=fence_user,
        metadata={"description": "The user on the power controller (the agent's username); "
                  "its password is never given through the API."},
    )  # fmt: skip
    allocated_cores = Int(dump_only=True)
    allocated_ram = Int(dump_only=True)
    #: host health, kept by ``flask vmapi node check``
    last_seen_at = UtcDateTime(dump_only=True, allow_none=True)
    last_error = Str(dump_only=True, allow_none=True)
    unreachable_since = UtcDateTime(dump_only=True, allow_none=True)
    #: what ``flask vmapi ha watch`` made of the node (vmapi.models.node.HA_STATES)
    ha_state = Str(dump_only=True)


class NodeOrRef(Ref):
    """``{"id": N}`` for an existing node, or on POST the full fields of a new one (dict)."""

    #: the resource whose new object a POST may give instead of a reference
    or_new = "node"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("node", **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int | dict:
        if isinstance(value, dict) and set(value) == {"id"}:
            return super()._deserialize(value, attr, data, **kwargs)
        if isinstance(value, dict):
            return NodeSchema().load(value)
        raise ValidationError('Must be {"id": N} or the fields of a new node.')


#: A libvirt domain type, in any case: the names that create a virt_method if none has it.
DOMAIN_TYPE_NAME = (
    "^(?:"
    + "|".join("".join(f"[{c.lower()}{c.upper()}]" for c in name) for name in DOMAIN_TYPES)
    + ")$"
)


class MethodRef(Ref):
    """``{"id": N}`` or ``{"name": "KVM"}`` (an unknown name creates the method)."""

    #: the names documented are those that always work: a domain type (an existing
    #: method's name works too, but which exist is not the document's to say)
    by_name = {"name": {"type": "string", "pattern": DOMAIN_TYPE_NAME}}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("virt_method", **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int | str:
        if isinstance(value, dict) and set(value) == {"id"}:
            return super()._deserialize(value, attr, data, **kwargs)
        if isinstance(value, dict) and set(value) == {"name"}:
            return name_field().deserialize(value["name"])
        raise ValidationError(
            'Must be {"id": N} or {"name": "..."}; a new name must be one of libvirt\'s '
            f"domain types ({', '.join(DOMAIN_TYPES)})."
        )


class VirtNodeSchema(BaseSchema):
    id = Int(dump_only=True)
    node = NodeOrRef(attribute="node_id", required=True)
    virt_method = MethodRef(attribute="virt_method_id", required=True)
    local_storage_gb = Int(allow_none=True, validate=non_negative(INT32_MAX))
    vg_name = name_field(max_length=255, allow_none=True, required=False)
    local_storage_path = Str(
        allow_none=True,
        validate=[
            validate.Length(min=1, max=1024),
            validate.Regexp(r"^/[^\x00]*$", error="Must be an absolute path."),
        ],
    )
