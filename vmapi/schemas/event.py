"""Schema of /event (read-only: the audit trail)."""

from marshmallow import fields

from vmapi.schemas.base import BaseSchema, Int, Str, UtcDateTime


class EventSchema(BaseSchema):
    id = Int(dump_only=True)
    at = UtcDateTime(dump_only=True)
    request_id = Str(dump_only=True, allow_none=True)
    actor = Str(dump_only=True)
    token_id = Int(dump_only=True, allow_none=True)
    customer_id = Int(dump_only=True, allow_none=True)
    resource = Str(dump_only=True)
    object_id = Int(dump_only=True, allow_none=True)
    action = Str(dump_only=True)
    before = fields.Dict(dump_only=True, allow_none=True)
    after = fields.Dict(dump_only=True, allow_none=True)
    outcome = Str(dump_only=True)
    status = Int(dump_only=True, allow_none=True)
