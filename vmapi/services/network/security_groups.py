"""Security groups (placeholder until the /security_group resources land)."""

from __future__ import annotations


def usable_groups(ids: list[int], customer_id: int | None) -> list[int]:
    return list(ids)
