"""VM use cases, synchronously and all-or-nothing: the service the /vm routes call.

Its parts: reading a VM (:mod:`.rows`), creating (:mod:`.create`, with the steps a
single create and an array share in :mod:`.placed` and the array in :mod:`.arrays`),
changing (:mod:`.lifecycle` checks, :mod:`.changes` applies), rebooting and deleting
(:mod:`.lifecycle`). The domain on its host, failure translation and undo are in
:mod:`vmapi.services.nodes.domains` and :mod:`vmapi.services.undo`. A change, reboot or
delete holds the VMs' locks (:mod:`vmapi.services.locks`).
"""

from __future__ import annotations

from typing import Any

from vmapi.auth import Principal
from vmapi.errors import at_index
from vmapi.models import Vm
from vmapi.node_detail import prefixed
from vmapi.services.crud import Outcome
from vmapi.services.locks import vm_locks
from vmapi.services.undo import Undo, all_or_nothing
from vmapi.services.vms.abandoned import remove_abandoned
from vmapi.services.vms.changes import UpdatePlan, apply_update
from vmapi.services.vms.cloud_init import SeedVolume, delete_retired
from vmapi.services.vms.create import create_vms
from vmapi.services.vms.lifecycle import check_delete, delete_vms, plan_update, reboot_vm
from vmapi.services.vms.rows import VmRows


class VmService(VmRows):
    def create_all(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome[Vm]:
        """Create every VM or none (:func:`vmapi.services.vms.create.create_vms`)."""
        return Outcome(create_vms(items, principal, indexed))

    def remove_abandoned(self, ids: list[int]) -> None:
        """The VMs a dead request left ``building`` (:mod:`.abandoned`)."""
        remove_abandoned(ids)

    def update_locks(self, items: list[tuple[int, dict[str, Any]]]) -> list[int]:
        return [ident for ident, _data in items]

    def update_all(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[Vm]:
        force = options.get("force", False)
        plans: list[UpdatePlan] = []
        retired: list[SeedVolume] = []  # seeds replaced, deleted once every item is done

        def check(item: tuple[int, dict[str, Any]]) -> UpdatePlan:
            ident, data = item
            plans.append(plan_update(self.get(ident, principal), data, principal))
            return plans[-1]

        def apply(plan: UpdatePlan, undo: Undo) -> Vm:
            return apply_update(plan, force, undo, retired)

        vms = all_or_nothing(items, indexed, check, apply)
        messages = [
            prefixed(f"vm-{plan.vm_id}: " if indexed else "", message)
            for plan in plans
            for message in plan.messages
        ] + delete_retired(retired)
        return Outcome(self.loaded(vms), messages)

    def delete_locks(self, ids: list[int]) -> list[int]:
        return ids

    def delete_all(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[Vm]:
        """Delete the VMs and their domains. Every host is checked before anything goes."""
        vms: list[Vm] = []
        cascade = options.get("cascade") == "storage"
        for index, ident in enumerate(ids):
            with at_index(index if indexed else None):
                vms.append(self.get(ident, principal))
                check_delete(vms[-1], cascade)
        return Outcome(vms, delete_vms(vms, indexed))

    def reboot(self, ident: int, principal: Principal) -> Outcome[Vm]:
        with vm_locks([ident]):
            vm = self.get(ident, principal)
            reboot_vm(vm)
            return Outcome(self.loaded([vm]))
