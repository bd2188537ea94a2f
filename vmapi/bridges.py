"""Bridge templates: which Linux bridge a NIC in ``bridge`` mode is attached to.

A node's ``bridge`` field (else the configured ``BRIDGE_TEMPLATE``) is a template with
two placeholders:

- ``{suffix}``: the interface's device suffix (:mod:`vmapi.services.names`, at most 12
  characters), so each NIC gets a bridge of its own (the default ``br-{suffix}``, what
  configuration management makes on the host: the ``br-<vm>-<interface>`` of API.md, kept
  within Linux's 15 characters);
- ``{vlan}``: the interface's VLAN tag, or nothing for an interface on no VLAN (e.g.
  ``br{vlan}``: ``br120`` for VLAN 120, ``br`` untagged).

A template without ``{suffix}`` names a bridge that NICs share (``br0``: one bridge
for every VM of the host). Rendering replaces the two placeholders literally (never
``str.format``: a template is input, and a format string can reach attributes), and a
template is accepted only if every name it can render is a valid Linux device name,
so a name computed later never fails. Plain Python: the schema, the configuration and
the services share it.
"""

from __future__ import annotations

import re

#: Linux's IFNAMSIZ less the terminating NUL.
MAX_DEVICE_NAME = 15
#: The longest device suffix an interface has (12: names made before installation ids).
LONGEST_SUFFIX = 12
PLACEHOLDERS = ("{suffix}", "{vlan}")
DEFAULT_TEMPLATE = "br-{suffix}"
#: Characters a device name may hold here (Linux forbids '/', ':' and white space).
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_BRACES = re.compile(r"\{[^{}]*\}")


def bridge_name(template: str, suffix: str, vlan: int | None) -> str:
    """The bridge an interface is attached to."""
    return template.replace("{suffix}", suffix).replace("{vlan}", "" if vlan is None else str(vlan))


def shared(template: str) -> bool:
    """Whether NICs share the bridges the template names (no ``{suffix}`` in it)."""
    return "{suffix}" not in template


def template_problem(template: str) -> str | None:
    """Why ``template`` is not acceptable, or None."""
    if not isinstance(template, str) or not template:
        return "Must be a non-empty string."
    unknown = [part for part in _BRACES.findall(template) if part not in PLACEHOLDERS]
    stripped = _BRACES.sub("", template)
    if unknown or "{" in stripped or "}" in stripped:
        return "The only placeholders are {suffix} and {vlan}."
    longest = bridge_name(template, "x" * LONGEST_SUFFIX, 4094)
    if len(longest) > MAX_DEVICE_NAME:
        return (
            f"Names a bridge of up to {len(longest)} characters (a {LONGEST_SUFFIX}-character "
            f"suffix, VLAN 4094); Linux allows {MAX_DEVICE_NAME}."
        )
    for name in (longest, bridge_name(template, "x", None)):
        if not _NAME.fullmatch(name) or name in (".", ".."):
            return "A bridge name is letters, digits, '_', '.' and '-' (at least one of them)."
    return None
