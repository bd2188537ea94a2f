"""Blueprint of /quota (admins change; a customer reads its own)."""

from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.quota import QuotaSchema
from vmapi.services.quotas import QuotaService

quota = ResourceApi(
    "quota",
    QuotaSchema,
    QuotaService(),
    read_roles=ALL_ROLES,
    summary="Per-customer limits on VMs, vCPUs, RAM and storage bytes (null: unlimited).",
)
