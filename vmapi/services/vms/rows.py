"""The VMs a principal may see, read as ORM rows: what every VM use case reads a VM by
(a customer's own VMs only, others answer 404). The writes are :class:`VmService`'s
(:mod:`vmapi.services.vms.service`); modules the writes depend on (consoles, moves) read
VMs through this one, so nothing points back at the writes."""

from __future__ import annotations

from sqlalchemy.orm import joinedload, selectinload

from vmapi.models import Vm
from vmapi.services.crud import CrudService


class VmRows(CrudService[Vm]):
    def __init__(self) -> None:
        super().__init__(Vm, "vm")

    def load_options(self) -> list:
        return [selectinload(Vm.interfaces)]

    def get_options(self) -> list:
        return [joinedload(Vm.interfaces)]

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(Vm.customer_id == customer_id)
