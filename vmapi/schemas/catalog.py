"""Schemas of the catalog resources.

node_state, vm_state, virt_method, storage_type and cache_option.
"""

from __future__ import annotations

import re

from marshmallow import ValidationError, fields, validate

from vmapi.models.catalog import (
    CACHE_MODES,
    DOMAIN_TYPES,
    STORAGE_BACKENDS,
    STORAGE_FORMATS,
)
from vmapi.schemas.base import (
    _LABEL,
    IPV4_PATTERN,
    IPV6_PATTERN,
    BaseSchema,
    Bool,
    Int,
    Str,
    json_schema,
    name_field,
    text_field,
)

#: 1 to 65535
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
MONITOR_PATTERN = rf"^(?:{IPV4_PATTERN}|\[{IPV6_PATTERN}\]|{_LABEL}(?:\.{_LABEL})*):{_PORT}$"
MAX_MONITORS = 16


@json_schema(pattern=MONITOR_PATTERN, maxLength=261)
def validate_monitor(value: str) -> None:
    if len(value) > 261 or not re.fullmatch(MONITOR_PATTERN, value):
        raise ValidationError(
            "Must be host:port (an IPv4 address, [an IPv6 address] or a host name, and the "
            "monitor's msgr v1 port, usually 6789)."
        )


#: a cephx user's id, without its type ("client."): no dot, so the type cannot slip in
CEPH_USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class NodeStateSchema(BaseSchema):
    id = Int(dump_only=True)
    name = name_field()
    schedulable = Bool()


class VmStateSchema(BaseSchema):
    id = Int(dump_only=True)
    name = name_field()


class VirtMethodSchema(BaseSchema):
    id = Int(dump_only=True)
    name = name_field()
    domain_type = Str(required=True, validate=validate.OneOf(DOMAIN_TYPES))


class StorageTypeSchema(BaseSchema):
    id = Int(dump_only=True)
    name = name_field()
    description = text_field(required=True)
    pool = name_field(max_length=255)
    format = Str(required=True, validate=validate.OneOf(STORAGE_FORMATS))
    #: every node sees the pool at the same path: a moved VM's volumes stay where they are
    shared = Bool()
    #: dir: files in the libvirt pool's directory on each node; rbd: images in a Ceph
    #: pool (the fields below; the user's key comes from VMAPI_CEPH_KEY_DIR, never here)
    backend = Str(
        validate=validate.OneOf(STORAGE_BACKENDS),
        metadata={
            "description": "dir (the default): files in the libvirt pool's directory on "
            "each node, no Ceph field. rbd: RBD images of a Ceph pool; then ceph_monitors, "
            "ceph_pool and ceph_user are required, format is raw and shared true (its "
            "default), and the user's key must be in the API host's VMAPI_CEPH_KEY_DIR."
        },
    )
    ceph_monitors = fields.List(
        Str(validate=validate_monitor),
        allow_none=True,
        validate=validate.Length(min=1, max=MAX_MONITORS),
        metadata={"description": "rbd only: the monitors, host:port (the msgr v1 port)."},
    )
    ceph_pool = name_field(
        max_length=255,
        required=False,
        allow_none=True,
        metadata={"description": "rbd only: the Ceph pool of the type's images."},
    )
    ceph_user = Str(
        metadata={
            "description": "rbd only: the cephx user, without client.; its key is read from "
            "client.<user>.key in VMAPI_CEPH_KEY_DIR, never given through the API."
        },
        allow_none=True,
        validate=[
            validate.Length(min=1, max=255),
            validate.Regexp(
                CEPH_USER_PATTERN,
                error='Use letters, digits, "_" and "-" only: the user without "client.".',
            ),
        ],
    )
    #: the libvirt secret holding the user's key on every node; vmapi makes it
    ceph_secret_uuid = Str(
        dump_only=True,
        allow_none=True,
        metadata={
            "description": "rbd only: the libvirt secret holding the user's key on every "
            "node, made by vmapi (one per Ceph user)."
        },
    )


class CacheOptionSchema(BaseSchema):
    id = Int(dump_only=True)
    name = Str(required=True, validate=validate.OneOf(CACHE_MODES))
    description = text_field(required=True)
