"""Blueprint of /event: the audit trail, read-only (admins: all; customers: their own).

A customer reads its events as it reads its objects: the fields its answers show of each
resource. What lives on the node side (where a VM runs, its seed's pool and path, a
volume's pool, path and node, an image's file in the store, the paths of a move) stays in
the trail for admins only.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import inspect

from vmapi.api.resource import ALL_ROLES, RESOURCES, ResourceApi, principal
from vmapi.schemas.event import EventSchema
from vmapi.services.events import EventService

#: node-side keys a customer's answers do show or never had as a column: a VM's node
#: (an admin-only resource), and the volume paths a move records
NODE_SIDE = {"vm": frozenset({"node_id", "storage"})}


@cache
def customer_hidden(resource: str) -> frozenset[str]:
    """The keys of ``resource``'s events a customer does not see: the model's columns
    that the resource's answers leave out, and the node-side keys above."""
    target = RESOURCES.get(resource)
    if target is None:
        return frozenset()
    columns = {attr.key for attr in inspect(target.service.model).column_attrs}
    shown = {f.attribute or name for name, f in target.schema.dump_fields.items()}
    return frozenset(columns - shown) | NODE_SIDE.get(resource, frozenset())


def customer_view(data: dict[str, Any]) -> dict[str, Any]:
    hidden = customer_hidden(data["resource"])
    for side in ("before", "after"):
        if isinstance(data.get(side), dict):
            data[side] = {k: v for k, v in data[side].items() if k not in hidden}
    return data


class EventApi(ResourceApi):
    def dump(self, obj: Any, nest=(), seen: dict | None = None) -> dict[str, Any]:
        data = super().dump(obj, nest, seen)
        return data if principal().is_admin else customer_view(data)


event = EventApi(
    "event",
    EventSchema,
    EventService(),
    read_roles=ALL_ROLES,
    collection_methods=["GET"],
    item_methods=["GET"],
    summary="The audit trail: who changed what, when, the fields before and after, and the "
    "outcome. Written in the same transaction as each change; failed changes too. A "
    "customer sees the fields its answers show, without the node side.",
)
