"""Base schema (unknown fields raise) and strict field types shared by every resource.

JSON has one number type and Python's ``bool`` is an ``int``; without these fields
``true`` would pass as ``1`` and ``1e400`` or ``2**70`` would reach the database.
"""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import UTC, datetime
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_LABEL = re.compile(rf"^{_LABEL}$")
#: Names of catalog rows: a word a script can use unquoted.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
#: Text PostgreSQL can store (see :class:`Str`), for the OpenAPI document: no NUL. No lone
#: surrogate either (JSON's unpaired "\ud800"), which a pattern cannot say portably (Rust's
#: regex, which schemathesis validates with, has no surrogates): TEXT_RULE says it in words.
TEXT_PATTERN = r"^[^\x00]*$"
TEXT_RULE = "Text without NUL characters or lone surrogates."
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_HEX = r"[0-9A-Fa-f]{1,4}"
#: IPv6 in any of its spellings but the ones with an embedded IPv4 address or a zone.
IPV6_PATTERN = (
    "(?:"
    + "|".join(
        [rf"(?:{_HEX}:){{7}}{_HEX}", rf"(?:{_HEX}:){{1,7}}:", rf"(?:{_HEX}:){{1,6}}:{_HEX}"]
        + [rf"(?:{_HEX}:){{1,{n}}}(?::{_HEX}){{1,{7 - n}}}" for n in (5, 4, 3, 2)]
        + [rf"{_HEX}:(?::{_HEX}){{1,6}}", rf":(?:(?::{_HEX}){{1,7}}|:)"]
    )
    + ")"
)


def prefix_pattern(low: int, high: int) -> str:
    """A prefix length from ``low`` to ``high``, as a regular expression."""
    return "(?:" + "|".join(str(n) for n in range(high, low - 1, -1)) + ")"


def json_schema(**keywords: Any):
    """Attach to a validator the JSON Schema keywords it enforces, for the OpenAPI document
    (``pattern``, ``format``, ``minimum``, ``multipleOf``...): what it lets through must be
    exactly what they describe."""

    def attach(validator):
        validator.json_schema = keywords
        return validator

    return attach


class BaseSchema(Schema):
    """Every request and response shape: unknown fields are an error, never ignored."""

    class Meta:
        unknown = RAISE


class Int(fields.Integer):
    """A JSON integer (never a bool, a float or a string) that fits in 64 bits."""

    default_error_messages = {
        "invalid": "Not a valid integer.",
        "range": "Must fit in a signed 64-bit integer.",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        if not INT64_MIN <= value <= INT64_MAX:
            raise self.make_error("range")
        return value

    def parse_query(self, raw: str) -> int:
        """The value of ``?field=raw`` as this field's type."""
        if not re.fullmatch(r"-?\d{1,19}", raw):
            raise ValidationError("Not a valid integer.")
        return self._deserialize(int(raw), None, None)


class Float(fields.Float):
    """A finite JSON number (never a bool or a string)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        result = float(value)
        if not math.isfinite(result):
            raise self.make_error("special")
        return result

    def parse_query(self, raw: str) -> float:
        try:
            return self._deserialize(float(raw), None, None)
        except ValueError as exc:
            raise ValidationError("Not a valid number.") from exc


class Bool(fields.Boolean):
    """A JSON ``true`` or ``false``; ``1`` or ``"yes"`` are not booleans."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value

    def parse_query(self, raw: str) -> bool:
        if raw not in ("true", "false"):
            raise ValidationError("Use true or false.")
        return raw == "true"


class UtcDateTime(fields.DateTime):
    """A stored time, always written with its zone: every time vmapi stores is UTC, and
    SQLite hands them back without one."""

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> Any:
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return super()._serialize(value, attr, obj, **kwargs)


class Str(fields.String):
    """A string of text PostgreSQL can store: no NUL, no lone surrogates (JSON's \\ud800).

    As a filter, any value is a value: one that cannot exist matches nothing.
    """

    default_error_messages = {"text": "Must be text without NUL characters or lone surrogates."}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        result = super()._deserialize(value, attr, data, **kwargs)
        _check_text(result, self.make_error("text"))
        return result

    def parse_query(self, raw: str) -> str:
        if len(raw) > 1024:
            raise ValidationError("Longer than 1024 characters.")
        _check_text(raw, ValidationError(self.default_error_messages["text"]))
        return raw


def _check_text(value: str, error: ValidationError) -> None:
    if "\x00" in value:
        raise error
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise error from None


class Ref(fields.Field):
    """A reference to another object: ``{"id": N}`` in and out; loads as the id.

    ``resource`` names the referenced resource (for ``nest=``, links and the OpenAPI
    document). Declare it with ``attribute="<name>_id"`` so dumping needs no join.
    """

    default_error_messages = {
        "invalid": 'Must be a reference {{"id": <positive integer>}}.',
    }

    def __init__(self, resource: str, **kwargs: Any) -> None:
        self.resource = resource
        super().__init__(**kwargs)

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> Any:
        if value is None:
            return None
        return {"id": value if isinstance(value, int) else value.id}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, dict) or set(value) != {"id"}:
            raise self.make_error("invalid")
        ident = value["id"]
        if isinstance(ident, bool) or not isinstance(ident, int) or not 0 < ident <= INT64_MAX:
            raise self.make_error("invalid")
        return ident

    def parse_query(self, raw: str) -> int:
        if not re.fullmatch(r"\d{1,19}", raw) or not 0 < int(raw) <= INT64_MAX:
            raise ValidationError("Not a valid id.")
        return int(raw)


class RefList(fields.Field):
    """A list of references: ``[{"id": N}, ...]`` from a relationship; read-only unless
    ``writable`` (it then loads as the list of ids, each once, at most ``max_items``).

    ``resource`` names the referenced resource, as for :class:`Ref` (``nest=`` inlines
    the whole objects)."""

    default_error_messages = {
        "invalid": 'Must be a list of references [{{"id": <positive integer>}}, ...].',
        "twice": "Names an object twice.",
        "too_many": "At most {max_items} references.",
    }

    def __init__(
        self, resource: str, writable: bool = False, max_items: int = 16, **kwargs: Any
    ) -> None:
        self.resource = resource
        self.max_items = max_items
        super().__init__(dump_only=not writable, **kwargs)

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> list[dict[str, int]]:
        return [{"id": item.id} for item in value or ()]

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[int]:
        if not isinstance(value, list):
            raise self.make_error("invalid")
        if len(value) > self.max_items:
            raise self.make_error("too_many", max_items=self.max_items)
        ids = [Ref(self.resource).deserialize(item) for item in value]
        if len(set(ids)) != len(ids):
            raise self.make_error("twice")
        return ids


def positive(maximum: int = INT64_MAX) -> validate.Range:
    return validate.Range(min=1, max=maximum)


def non_negative(maximum: int = INT64_MAX) -> validate.Range:
    return validate.Range(min=0, max=maximum)


def name_field(max_length: int = 64, **kwargs: Any) -> Str:
    kwargs.setdefault("required", True)
    return Str(
        validate=[
            validate.Length(min=1, max=max_length),
            validate.Regexp(NAME_PATTERN, error="Use letters, digits, '.', '_' and '-' only."),
        ],
        **kwargs,
    )


def text_field(max_length: int = 255, **kwargs: Any) -> Str:
    return Str(validate=validate.Length(min=1, max=max_length), **kwargs)


@json_schema(pattern=rf"^{_LABEL}(?:\.{_LABEL})+\.*$", maxLength=253)
def validate_hostname(value: str) -> None:
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or len(labels) < 2 or not all(_HOSTNAME_LABEL.match(x) for x in labels):
        raise ValidationError("Must be a fully qualified host name, e.g. node1.example.com.")


def interface_validator(version: int):
    """An address with prefix of one IP family, e.g. ``192.0.2.10/24``."""
    address, high = (IPV4_PATTERN, 32) if version == 4 else (IPV6_PATTERN, 128)

    @json_schema(pattern=f"^{address}/{prefix_pattern(0, high)}$")
    def check(value: str) -> None:
        if "/" not in value:
            raise ValidationError(f"Must be an IPv{version} address with a prefix, e.g. x/24.")
        try:
            iface = ipaddress.ip_interface(value)
        except ValueError as exc:
            raise ValidationError(f"Not a valid IPv{version} interface address.") from exc
        if iface.version != version:
            raise ValidationError(f"Must be an IPv{version} address, not IPv{iface.version}.")

    return check


def address_validator(version: int, canonical: bool = False):
    """A plain address of one IP family, e.g. ``192.0.2.1``; with ``canonical`` it must be
    written as Python's ipaddress writes it (pool addresses are compared as text)."""

    @json_schema(format=f"ipv{version}")
    def check(value: str) -> None:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValidationError(f"Not a valid IPv{version} address.") from exc
        if addr.version != version:
            raise ValidationError(f"Must be an IPv{version} address, not IPv{addr.version}.")
        if canonical and str(addr) != value:
            raise ValidationError(f"Write it in canonical form: {addr}.")

    return check


class IdSchema(BaseSchema):
    """``{"id": N}``: the body of DELETE on a collection."""

    id = Int(required=True, validate=positive())
