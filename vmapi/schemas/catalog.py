"""Schemas of the catalog resources.

node_state, vm_state, virt_method, storage_type and cache_option.
"""

from __future__ import annotations

from marshmallow import validate

from vmapi.models.catalog import CACHE_MODES, DOMAIN_TYPES, STORAGE_FORMATS
from vmapi.schemas.base import BaseSchema, Bool, Int, Str, name_field, text_field


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


class CacheOptionSchema(BaseSchema):
    id = Int(dump_only=True)
    name = Str(required=True, validate=validate.OneOf(CACHE_MODES))
    description = text_field(required=True)
