"""/storage_type: the catalog's generic rules, and a pool and format fixed while in use.

A volume's pool is recorded on its storage row when it is made, but the type still says
what its volumes are: changing ``pool`` or ``format`` while volumes of the type exist
would make it lie about them (and a new volume of the type would land elsewhere than
its siblings). So that is refused, naming the storage that uses it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vmapi import error_ids
from vmapi.auth import Principal
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.models import Storage, StorageType
from vmapi.services.crud import IN_USE_SAMPLE, CrudService

FIXED_WHILE_USED = ("pool", "format")


class StorageTypeService(CrudService[StorageType]):
    def __init__(self) -> None:
        super().__init__(StorageType, "storage_type")

    def update(self, obj: StorageType, data: dict[str, Any], principal: Principal) -> StorageType:
        changing = [
            key for key in FIXED_WHILE_USED if key in data and data[key] != getattr(obj, key)
        ]
        if changing:
            # The row lock orders this against a volume being made of the type (it reads
            # the type under a share lock and commits its row before making the volume).
            db.session.scalars(
                select(StorageType.id).where(StorageType.id == obj.id).with_for_update()
            ).one()
            stmt = (
                select(Storage.id)
                .where(Storage.storage_type_id == obj.id)
                .order_by(Storage.id)
                .limit(IN_USE_SAMPLE)
            )
            used = list(db.session.scalars(stmt))
            if used:
                raise Conflict(
                    f"storage_type {obj.id} cannot change its {' and '.join(changing)} while "
                    f"storage {', '.join(map(str, used))} uses it; make a new storage type "
                    "instead.",
                    error_id=error_ids.in_use("storage_type"),
                    data={"storage": used, "fields": changing},
                )
        return super().update(obj, data, principal)
