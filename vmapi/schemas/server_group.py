"""Schema of /server_group."""

from __future__ import annotations

from marshmallow import validate

from vmapi.models.server_group import POLICIES
from vmapi.schemas.base import BaseSchema, Int, Str, non_negative, text_field


class ServerGroupSchema(BaseSchema):
    id = Int(dump_only=True)
    name = text_field(required=True)
    policy = Str(
        required=True,
        validate=validate.OneOf(POLICIES),
        metadata={
            "description": "How the scheduler places its VMs: anti-affinity, never two on one "
            "node; affinity, all on the node of the first; soft-anti-affinity, on the nodes "
            "with the fewest of them first. Cannot change while the group has VMs.",
        },
    )
    customer_id = Int(
        allow_none=True,
        validate=non_negative(),
        metadata={
            "description": "The owner; null: an admin group, for VMs without a customer. A "
            "customer's own on POST (admins: any). Cannot change while the group has VMs.",
        },
    )
