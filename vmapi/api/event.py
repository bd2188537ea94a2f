"""Blueprint of /event: the audit trail, read-only (admins: all; customers: their own)."""

from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.event import EventSchema
from vmapi.services.events import EventService

event = ResourceApi(
    "event",
    EventSchema,
    EventService(),
    read_roles=ALL_ROLES,
    collection_methods=["GET"],
    item_methods=["GET"],
    summary="The audit trail: who changed what, when, the fields before and after, and the "
    "outcome. Written in the same transaction as each change; failed changes too.",
)

APIS = [event]
