"""Schema of /quota."""

from vmapi.schemas.base import BaseSchema, Int, non_negative


class QuotaSchema(BaseSchema):
    id = Int(dump_only=True)
    customer_id = Int(required=True, validate=non_negative())
    max_vms = Int(allow_none=True, validate=non_negative())
    max_cores = Int(allow_none=True, validate=non_negative())
    max_ram = Int(allow_none=True, validate=non_negative())
    max_storage = Int(allow_none=True, validate=non_negative())
    #: the customer's security groups, and the rules of all of them together
    max_security_groups = Int(allow_none=True, validate=non_negative())
    max_security_rules = Int(allow_none=True, validate=non_negative())
