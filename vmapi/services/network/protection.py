"""Network protection on the nodes: the guard and the security groups as libvirt network
filters (API.md "Network protection"). Being written (issue 23)."""

from __future__ import annotations

from collections.abc import Collection


def groups_changed(group_ids: Collection[int]) -> list[str]:
    """Called after a commit that changed these groups' rules: re-defines each group's
    filter on every node that has an interface using it (libvirt applies it to the running
    guests at once). Answers notes for the answer's ``message`` (a node that could not be
    reached gets it when it answers)."""
    return []
