"""Schema of /image (the catalog; the file itself travels as application/octet-stream)."""

from __future__ import annotations

from marshmallow import fields, validate

from vmapi.models.image import FORMATS, KINDS, STATES
from vmapi.schemas.base import (
    BaseSchema,
    Bool,
    Int,
    Str,
    UtcDateTime,
    non_negative,
    text_field,
)


class ImageSchema(BaseSchema):
    id = Int(dump_only=True)
    name = text_field(required=True)
    format = Str(
        validate=validate.OneOf(FORMATS),
        metadata={
            "description": "qcow2 (the default) or raw; the file must be this.",
            "on_update": False,  # image/immutable_field
        },
    )
    size = Int(dump_only=True, allow_none=True, metadata={"description": "The file's bytes."})
    virtual_size = Int(
        dump_only=True, allow_none=True, metadata={"description": "The disk's size in bytes."}
    )
    checksum = Str(
        allow_none=True,
        validate=validate.Regexp(r"^[0-9a-f]{64}$", error="Must be a sha256 in lowercase hex."),
        metadata={
            "description": "sha256 of the file; when given, the upload must match it.",
            "on_update": False,
        },
    )
    state = Str(
        dump_only=True,
        validate=validate.OneOf(STATES),
        metadata={
            "description": "queued (no file yet), saving (being saved from a disk), active, "
            "or error."
        },
    )
    kind = Str(
        dump_only=True,
        validate=validate.OneOf(KINDS),
        metadata={
            "description": "upload (its file was uploaded), snapshot (saved from a VM's or a "
            "volume's disk by POST /vm/<id>/image or /storage/<id>/image) or backup (saved "
            "by flask vmapi backup run)."
        },
    )
    source = fields.Dict(
        dump_only=True,
        allow_none=True,
        metadata={
            "description": "What a saved image was saved from: {vm: {id}} (a root disk) or "
            "{storage: {id}} (a volume); null for an upload."
        },
    )
    customer_id = Int(allow_none=True, validate=non_negative(), metadata={"on_update": False})
    min_ram = Int(allow_none=True, validate=non_negative())
    description = text_field(allow_none=True)
    created_at = UtcDateTime(dump_only=True)


class SaveImageSchema(BaseSchema):
    """The body of ``POST /vm/<id>/image`` and ``POST /storage/<id>/image``."""

    name = text_field(required=True)
    description = text_field(allow_none=True, load_default=None)
    quiesce = Bool(
        load_default=False,
        metadata={
            "description": "Freeze the guest's file systems through its guest agent for the "
            "copy (409 vm/no_guest_agent when none answers); false: a crash-consistent "
            "copy of a running VM."
        },
    )
