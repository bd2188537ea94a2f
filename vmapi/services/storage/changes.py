"""A change of a volume (PUT /storage): grow it, move it to another VM of its node,
change its limits or cache; each step with its named inverse. Where the hypervisor
cannot change a running domain the persistent definition has it and the answer says it
takes effect at the next start."""

from __future__ import annotations

from typing import Any

from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Storage, Vm
from vmapi.services.nodes.domains import hypervisor_failure
from vmapi.services.nodes.hosts import hypervisor
from vmapi.services.quotas import check_storage_quota
from vmapi.services.storage.create import take_target
from vmapi.services.storage.disks import AttachedVolume, detach, grow, live
from vmapi.services.undo import Undo


def apply_update(storage: Storage, data: dict[str, Any], undo: Undo, messages: list[str]) -> None:
    before = AttachedVolume(storage)
    old = {k: getattr(storage, k) for k in data}
    moving = "vm_id" in data and data["vm_id"] != storage.vm_id
    if moving:
        data = {**data, "target": take_target(data["vm_id"])}
        old["target"] = storage.target
    try:
        owner = db.session.get(Vm, storage.vm_id).customer_id
        size = data.get("size", storage.size)
        new_owner = db.session.get(Vm, data["vm_id"]).customer_id if moving else owner
        if new_owner != owner:  # moved to another customer's VM: all of it is theirs now
            check_storage_quota(new_owner, size)
        elif size > storage.size:
            check_storage_quota(owner, size - storage.size)
        for key, value in data.items():
            setattr(storage, key, value)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise

    def restore() -> None:
        db.session.rollback()
        for key, value in old.items():
            setattr(storage, key, value)
        db.session.commit()

    undo.push(f"restoring the row of storage {storage.id}", restore)
    driver = hypervisor()
    after = AttachedVolume(storage)
    uri = after.host.uri
    step = "growing the volume"
    try:
        if "size" in data and data["size"] != old["size"]:
            grow(before, storage.size, messages)
        if moving:
            step = "detaching the disk"
            detach(before, messages, undo)
            driver.define(uri, before.domain(without=True))
            undo.push(f"redefining {before.vm.domain_name} with storage {storage.id} again",
                      lambda: driver.define(uri, before.domain()))  # fmt: skip
        step = "redefining the domain"
        previous = before.domain() if not moving else after.domain(without=True)
        driver.define(uri, after.domain())
        undo.push(f"redefining {after.vm.domain_name} as it was before the change",
                  lambda: driver.define(uri, previous))  # fmt: skip
        if not after.running():
            return
        step = "changing the running domain"
        name, label = after.vm.domain_name, f"The change to storage {storage.id}"
        if moving:
            if live(lambda: driver.attach_disk_live(uri, name, after.spec), messages, label):
                undo.push(f"detaching storage {storage.id} from {name}",
                          lambda: driver.detach_disk_live(uri, name, after.spec))  # fmt: skip
            return
        limits = [k for k in data if k.endswith("_limit")]
        if limits:
            live(lambda: driver.set_iotune_live(uri, name, storage.target, after.spec.iotune),
                 messages, f"The new I/O limits of storage {storage.id}")  # fmt: skip
        if "cache_option_id" in data and data["cache_option_id"] != old["cache_option_id"]:
            messages.append(
                f"The cache mode of storage {storage.id} takes effect at the next start."
            )
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, after.host) from exc
