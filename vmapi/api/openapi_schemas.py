"""JSON Schema of what the server validates, for the OpenAPI document: fields, bodies and
query parameters.

Each field is described as it is checked: its type and bounds (an ``Int`` fits in 64 bits),
its validators' keywords (marshmallow's own, and the ``json_schema`` a custom validator
carries), text that PostgreSQL can store, references as ``{"id": N}``. Limits that come
from the configuration (``MAX_BATCH``, page sizes, ``STORAGE_MAX_SIZE``) are read from the
app's, so the document of an app tells that app's truth.

Rules that JSON Schema cannot state are said in words: a reference must name an existing
row, a gateway must lie inside its network, a network must have no host bits set.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema

from vmapi.api.resource import RESOURCES, ResourceApi
from vmapi.config import INTERFACE_MODES
from vmapi.schemas.base import (
    INT64_MAX,
    INT64_MIN,
    TEXT_PATTERN,
    TEXT_RULE,
    Bool,
    Float,
    Int,
    Ref,
    RefList,
    Str,
)

ID = {"type": "integer", "format": "int64", "minimum": 1, "maximum": INT64_MAX}
REF = {
    "type": "object",
    "properties": {"id": ID},
    "required": ["id"],
    "additionalProperties": False,
    "description": 'A reference: {"id": N} of an existing object (400 if there is none).',
}
#: Python's finite floats (a larger number reads as infinity, which is refused)
FLOAT_MAX = 1.7976931348623157e308


def component_name(resource: str) -> str:
    return "".join(part.capitalize() for part in resource.split("_"))


def _validated(self: Any, field: Any, ret: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Bounds and patterns of the strict fields and of custom validators."""
    extra: dict[str, Any] = {}
    if isinstance(field, Int):
        extra = {"format": "int64", "minimum": ret.get("minimum", INT64_MIN),
                 "maximum": ret.get("maximum", INT64_MAX)}  # fmt: skip
    for source in (field, *field.validators):
        extra.update(getattr(source, "json_schema", None) or {})
    limit = field.metadata.get("maximum_from")
    if limit is not None:
        extra["maximum"] = self.app_config[limit]
    described = {**ret, **extra}
    if isinstance(field, Str) and not {"enum", "format"} & set(described):
        # a pattern of a field's own (a name, a path) lets neither through already
        extra.setdefault("pattern", described.get("pattern", TEXT_PATTERN))
        extra["description"] = " ".join(filter(None, [described.get("description"), TEXT_RULE]))
    return extra


def _reference(self: Any, field: Any, **kwargs: Any) -> dict[str, Any]:
    """References as ``{"id": N}`` (or ``{"name": ...}`` where a field takes a name)."""
    if isinstance(field, RefList):
        if not field.dump_only:
            return {"type": "array", "items": copy.deepcopy(REF), "uniqueItems": True,
                    "maxItems": field.max_items}  # fmt: skip
        return {"type": "array", "items": copy.deepcopy(REF), "readOnly": True}
    if not isinstance(field, Ref):
        return {}
    ref: dict[str, Any] = copy.deepcopy(REF)
    by_name = getattr(field, "by_name", None)
    if by_name is not None:
        named = {"type": "object", "properties": by_name, "required": list(by_name),
                 "additionalProperties": False}  # fmt: skip
        ref = {"oneOf": [ref, named], "description": f"A {field.resource}: by id, or by name."}
    if field.allow_none:
        ref["nullable"] = True
    if field.dump_only:
        ref["readOnly"] = True
    return ref


def install(plugin: MarshmallowPlugin, config: Mapping[str, Any]) -> None:
    """Teach the plugin's converter our fields (after ``spec`` has initialised it)."""
    plugin.converter.app_config = config
    plugin.converter.add_attribute_function(_validated)
    plugin.converter.add_attribute_function(_reference)


def properties(plugin: MarshmallowPlugin, schema: type[Schema]) -> dict[str, dict[str, Any]]:
    return {name: plugin.converter.field2property(field) for name, field in schema().fields.items()}


# ---------------------------------------------------------------------- answers
def answer_component(plugin: MarshmallowPlugin, res: ResourceApi) -> dict[str, Any]:
    """An object as answered: a reference is ``{"id": N}``, or with ``nest=`` the whole
    object (a list of references, a list of them)."""
    props = properties(plugin, res.schema_class)
    for name, field in res.nestable.items():
        target = {"$ref": f"#/components/schemas/{component_name(field.resource)}"}
        either = {"anyOf": [copy.deepcopy(REF), target]}
        if isinstance(field, RefList):
            props[name] = {"type": "array", "items": either, "readOnly": True}
        else:
            props[name] = {**either, "readOnly": True} if field.dump_only else either
            if field.allow_none:
                props[name]["nullable"] = True
    answered = {name: prop for name, prop in props.items() if not res.schema.fields[name].load_only}
    return {"type": "object", "properties": answered, "additionalProperties": False}


# ---------------------------------------------------------------------- bodies
def _writable(
    plugin: MarshmallowPlugin, schema: type[Schema], verb: str
) -> tuple[dict[str, Any], list[str]]:
    """The properties a ``verb`` ("create" or "update") takes, and those POST requires."""
    instance = schema()
    props: dict[str, Any] = {}
    for name, prop in properties(plugin, schema).items():
        field = instance.fields[name]
        if field.dump_only or field.metadata.get(f"on_{verb}", True) is False:
            continue
        props[name] = prop
    required = [n for n, f in instance.fields.items() if f.required and n in props]
    return props, required


def create_body(
    plugin: MarshmallowPlugin, schema: type[Schema], nested: bool = False
) -> dict[str, Any]:
    """One object of a POST (``nested``: a new object inside another, which has no
    ``id``). A field may take the fields of a new object instead of a reference (virt_node's
    node): both are described."""
    props, required = _writable(plugin, schema, "create")
    for name, field in schema().fields.items():
        new = getattr(field, "or_new", None)
        if name in props and new is not None:
            new_object = create_body(plugin, RESOURCES[new].schema_class, nested=True)
            props[name] = {
                "oneOf": [copy.deepcopy(REF), new_object],
                "description": f"An existing {new} by id, or the fields of a new one.",
            }
    ignored = {} if nested else {"id": {"description": "Ignored, whatever it is."}}
    shapes = [s for s in getattr(schema, "SHAPES", ()) if set(s) <= set(props)]
    if len(shapes) > 1:
        return {
            "oneOf": [
                {"type": "object", "properties": {**ignored, **{k: props[k] for k in shape}},
                 "required": list(shape), "additionalProperties": False}
                for shape in shapes
            ]
        }  # fmt: skip
    if shapes:
        required = list(shapes[0])
        props = {k: props[k] for k in shapes[0]}
    body = {"type": "object", "properties": {**ignored, **props}, "additionalProperties": False}
    if required:
        body["required"] = required
    return body


def change_body(plugin: MarshmallowPlugin, schema: type[Schema], with_id: bool) -> dict[str, Any]:
    """The fields an UPDATE changes; with the object's ``id`` on a collection. On an item an
    ``id`` is refused unless it repeats the URL's, so the document leaves it out."""
    props, _required = _writable(plugin, schema, "update")
    body: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if with_id:
        body["properties"] = {"id": ID, **props}
        body["required"] = ["id"]
    return body


ID_ONLY = {"type": "object", "properties": {"id": ID}, "required": ["id"],
           "additionalProperties": False}  # fmt: skip


def one_or_many(items: list[dict[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """A body of one object or an array of 1..MAX_BATCH of one kind."""
    arrays = [
        {"type": "array", "items": item, "minItems": 1, "maxItems": config["MAX_BATCH"]}
        for item in items
    ]
    return {"oneOf": [*items, *arrays]}


# ---------------------------------------------------------------------- query
def query_schema(field: Any) -> dict[str, Any]:
    """A filter's value: parsed as the field's type, never checked against its validators
    (a value that cannot exist matches nothing)."""
    if isinstance(field, Ref):
        return dict(ID)
    if isinstance(field, Int):
        return {"type": "integer", "format": "int64", "minimum": INT64_MIN, "maximum": INT64_MAX}
    if isinstance(field, Float):
        return {"type": "number", "minimum": -FLOAT_MAX, "maximum": FLOAT_MAX}
    if isinstance(field, Bool):
        return {"type": "boolean"}
    return {"type": "string", "maxLength": 1024, "pattern": TEXT_PATTERN,
            "description": TEXT_RULE}  # fmt: skip


def list_parameters(res: ResourceApi, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """limit, after, nest and the filters of a list."""
    paging = [
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": config["PAGE_MAX_LIMIT"],
                    "default": config["PAGE_DEFAULT_LIMIT"]}},
        {"name": "after", "in": "query", "required": False,
         "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": INT64_MAX},
         "description": "Keyset paging: objects with a larger id. See the Link header."},
    ]  # fmt: skip
    filters = [
        {"name": key, "in": "query", "required": False, "schema": query_schema(f),
         "description": f"Only objects whose {key} equals this."}
        for key, (_col, f) in sorted(res.filters.items())
    ]  # fmt: skip
    return [*paging, *nest_parameter(res), *filters]


def nest_parameter(res: ResourceApi) -> list[dict[str, Any]]:
    """``nest=a,b``: the references to inline (none where the resource has none)."""
    if not res.nestable:
        return []
    return [
        {
            "name": "nest",
            "in": "query",
            "required": False,
            "style": "form",
            "explode": False,
            "schema": {
                "type": "array",
                "items": {"type": "string", "enum": list(res.nestable)},
                "minItems": 1,
            },
            "description": "References to inline as whole objects (comma-separated); a "
            "resource the token may not read is 403.",
        }
    ]


def option_parameters(plugin: MarshmallowPlugin, schema: type[Schema] | None) -> list[dict]:
    """Query options of a verb's option schema (e.g. ``force``, ``cascade``)."""
    if schema is None:
        return []
    summary = (schema.__doc__ or "").strip().splitlines()[0]
    return [
        {"name": key, "in": "query", "required": False, "description": summary,
         "schema": _query_option(plugin.converter.field2property(f))}
        for key, f in schema().fields.items()
    ]  # fmt: skip


def _query_option(prop: dict[str, Any]) -> dict[str, Any]:
    # a query option is text that the option schema reads as its type; "true"/"false" for
    # a boolean, which is how a boolean query parameter is written
    return {k: v for k, v in prop.items() if k not in ("readOnly", "writeOnly", "nullable")}


# ---------------------------------------------------------------------- the ENC answer
def _object(props: dict[str, Any], nullable: tuple[str, ...] = ()) -> dict[str, Any]:
    for name in nullable:
        props[name] = {**props[name], "nullable": True}
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}  # fmt: skip


_TEXT = {"type": "string"}
_INT = {"type": "integer"}
_TEXTS = {"type": "array", "items": _TEXT}
_NIC = {
    "interface_id": _INT, "mac": _TEXT, "device": _TEXT, "vlan": _INT, "ipv4": _TEXTS,
    "ipv4_gateway": _TEXT, "ipv6": _TEXTS, "ipv6_gateway": _TEXT,
}  # fmt: skip
_NIC_NULLABLE = ("device", "vlan", "ipv4_gateway", "ipv6_gateway")
_DEVICES = {"type": "object", "additionalProperties": _object({"vm": _TEXT, **_NIC}, _NIC_NULLABLE)}
#: a bridge of one NIC, or one that NICs share (a template without {suffix}, e.g. br0)
_BRIDGES = {
    "type": "object",
    "additionalProperties": {
        "oneOf": [
            _DEVICES["additionalProperties"],
            _object({"shared": {"type": "boolean", "enum": [True]},
                     "interfaces": {"type": "array", "items": _DEVICES["additionalProperties"]}}),
        ]
    },
}  # fmt: skip
_VM = _object(
    {"id": _INT, "name": _TEXT, "uuid": _TEXT, "cores": _INT, "ram": _INT, "state": _TEXT,
     "customer_id": _INT,
     "interfaces": {"type": "array", "items": _object(dict(_NIC), _NIC_NULLABLE)}},
    ("state", "customer_id"),
)  # fmt: skip
_NODE_TEXTS = ("node_state", "ipv4_addr_ext", "ipv6_addr_ext", "ipv4_gw_ext", "ipv6_gw_ext",
               "bond_interfaces")  # fmt: skip
#: ``GET /node/<fqdn>/enc`` (vmapi.services.enc): YAML, which reads as this object
ENC_ANSWER = _object(
    {
        "classes": _object(
            {
                "vmapi::hypervisor": _object(
                    {
                        "interface_mode": {"type": "string", "enum": list(INTERFACE_MODES)},
                        "vms": {"type": "object", "additionalProperties": _VM},
                        "bridges": _BRIDGES,
                        "taps": _DEVICES,
                        "vlans": {"type": "array", "items": _INT},
                        "addresses": _object({"ipv4": _TEXTS, "ipv6": _TEXTS}),
                    }
                )
            }
        ),
        "parameters": _object(
            {
                "vmapi_node_id": _INT,
                **{f"vmapi_{key}": _TEXT for key in _NODE_TEXTS},
            },
            ("vmapi_node_state", "vmapi_bond_interfaces"),
        ),
    }
)
