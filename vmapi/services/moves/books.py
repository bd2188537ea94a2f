"""A move of a VM between nodes: its books (the move itself is services/moves/move.py;
services/moves/migrate.py puts the steps in order; services/moves/volumes.py prepares the
target; evacuation and reconcile use some).

- :func:`claim_target`: capacity on the target, claimed through the scheduler (the same
  filters as a create; the VM's own node fails ``uuid_free``, so it is never the
  target), committed together with the VM's marker ``migration_node_id``;
- :func:`record`: one transaction says where the VM, its volumes and its console log
  are, releases the source's claim, clears the marker, ends the VM's console tokens,
  and lists what the source keeps as leftovers (deleted next, or by reconcile);
- :func:`settle`: a marker found set (its process died mid-move) is resolved by where
  libvirt says the domain is: recorded there, or undone.
"""

from __future__ import annotations

import time
from typing import Any

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from vmapi.error_ids import (
    VM_BUSY,
    VM_NO_VALID_HOST,
    VM_NODE_NOT_FOUND,
    VM_NODE_UNSUITABLE,
)
from vmapi.errors import Conflict, NotFound, ServiceUnavailable
from vmapi.extensions import db
from vmapi.hypervisor import PAUSED, RUNNING, SHUTOFF, DomainNotFound
from vmapi.models import Node, Storage, StorageType, Vm, VmState
from vmapi.models.catalog import RBD
from vmapi.models.leftover import DOMAIN, LOG, VOLUME
from vmapi.scheduler import (
    NoValidHost,
    PlacementRequest,
    release,
    select_and_claim,
)
from vmapi.services import audit
from vmapi.services.consoles.tokens import invalidate_console_tokens
from vmapi.services.leftovers import (
    delete_listed_log,
    delete_listed_volume,
    drop_leftover,
    leftovers_on,
    note_leftover,
)
from vmapi.services.moves.move import EVACUATE, LIVE, Move, moved_volumes
from vmapi.services.moves.volumes import remove_source_leftovers
from vmapi.services.names import console_log_name
from vmapi.services.nodes.domains import state_id
from vmapi.services.nodes.hosts import Host, checked_uri, hypervisor, node_uri
from vmapi.services.nodes.placement import claim_named, scheduler_defaults
from vmapi.telemetry import PLACEMENT_SECONDS


def migration_uri(node: Node) -> str:
    """How the source's libvirtd reaches ``node``: its migration_uri, else its own URI."""
    if node.migration_uri:
        return checked_uri(node.fqdn, node.migration_uri, "migration_uri")
    return node_uri(node.fqdn, node.libvirt_uri)


# ---------------------------------------------------------------------- the target's claim
def claim_target(vm: Vm, node_id: int | None) -> Node:
    """Claim the VM's cores and RAM on ``node_id`` (or the node the scheduler picks) and
    mark the VM as moving there, in one commit. A target recorded as unable to reach the
    Ceph cluster of one of the VM's rbd volumes is unsuitable (``reaches_ceph``). A VM of
    a server group goes where its policy allows, itself not counted among the members
    (the claim holds the group's row lock until the marker is committed)."""
    request = PlacementRequest(vm.cores, vm.ram, vm.virt_method_id, vm.uuid,
                               rbd_type_ids=rbd_types(vm.id),
                               server_group_id=vm.server_group_id, vm_id=vm.id)  # fmt: skip
    defaults = scheduler_defaults()
    try:
        if node_id is None:
            try:
                with PLACEMENT_SECONDS.time():
                    weigher = current_app.config["SCHEDULER_WEIGHER"]
                    node = select_and_claim(request, defaults, weigher)
            except NoValidHost as exc:
                raise Conflict(
                    f"No other node can take vm-{vm.id}; data.removed_by_filter says why (its "
                    "own node counts under uuid_free).",
                    error_id=VM_NO_VALID_HOST,
                    data=exc.details,
                ) from exc
        else:
            node = _claim_named(vm, node_id, request, defaults)
        db.session.execute(
            update(Vm).where(Vm.id == vm.id).values(migration_node_id=node.id)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return node


def rbd_types(vm_id: int) -> tuple[int, ...]:
    """The rbd storage types the VM's volumes are on."""
    stmt = (
        select(StorageType.id).distinct()
        .join(Storage, Storage.storage_type_id == StorageType.id)
        .where(Storage.vm_id == vm_id, StorageType.backend == RBD)
        .order_by(StorageType.id)
    )  # fmt: skip
    return tuple(db.session.scalars(stmt))


def _claim_named(vm: Vm, node_id: int, request: PlacementRequest, defaults: Any) -> Node:
    if db.session.get(Node, node_id) is None:
        raise NotFound(f"No node with id {node_id}.", error_id=VM_NODE_NOT_FOUND,
                       data={"node": {"id": node_id}})  # fmt: skip
    if node_id == vm.node_id:
        raise Conflict(f"vm-{vm.id} is on node {node_id} already.", error_id=VM_NODE_UNSUITABLE,
                       data={"node": {"id": node_id}, "reasons": ["source"]})  # fmt: skip
    return claim_named(node_id, request, defaults, f"vm-{vm.id}")


def release_target(vm: Vm, node_id: int) -> None:
    """Undo :func:`claim_target`: give the capacity back and clear the marker."""
    db.session.rollback()
    release(node_id, vm.cores, vm.ram)
    db.session.execute(
        update(Vm).where(Vm.id == vm.id).values(migration_node_id=None)
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    db.session.commit()


# ---------------------------------------------------------------------- the record
def record(move: Move, state: str | None) -> None:
    """Say where the VM and its volumes are now, in one transaction (retried once: the
    domain has moved whatever the database does). ``state``: libvirt's on the target
    (None: keep the stored one). 503 when the database cannot take it: the marker stays,
    and the next move of the VM or reconcile records it."""
    for attempt in (1, 2):
        try:
            _record_once(move, state)
            return
        except OperationalError as exc:
            db.session.rollback()
            if attempt == 2:
                raise ServiceUnavailable(
                    f"vm-{move.vm.id} moved to {move.target.node.fqdn}, but the database could "
                    "not record it; the next move of the VM or `flask vmapi reconcile --fix` "
                    "records it there.",
                    data={"step": "recording the move", "node": {"id": move.target.node.id},
                          "moved": True},
                ) from exc  # fmt: skip


def _record_once(move: Move, state: str | None) -> None:
    vm, source, target = move.vm, move.source.node, move.target.node
    values: dict[str, Any] = {"node_id": target.id, "migration_node_id": None}
    if state is not None:
        values["vm_state_id"] = state_id(state)
    release(source.id, vm.cores, vm.ram)
    db.session.execute(
        update(Vm).where(Vm.id == vm.id).values(**values)
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    moved = {}
    how = "evacuation" if move.kind == EVACUATE else "move"
    for volume in move.volumes:
        storage = db.session.get(Storage, volume.storage.id, populate_existing=True)
        moved[str(storage.id)] = {"from": storage.path, "to": volume.target_path}
        if not volume.shared:
            note_leftover(source.id, VOLUME, storage.volume_name,
                          f"left by the {how} of vm-{vm.id} to {target.fqdn}", vm.id,
                          storage.pool)  # fmt: skip
            drop_leftover(target.id, VOLUME, storage.volume_name, storage.pool)
        storage.node_id, storage.path = target.id, volume.target_path
    if move.kind == EVACUATE:  # the dead node keeps its domain until reconcile removes it
        note_leftover(source.id, DOMAIN, vm.domain_name,
                      f"left by the evacuation of vm-{vm.id} to {target.fqdn}", vm.id)  # fmt: skip
    if move.console_log is not None:
        log = console_log_name(vm.domain_name)
        db.session.execute(
            update(Vm).where(Vm.id == vm.id).values(console_log_path=move.console_log)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
        note_leftover(source.id, LOG, log, f"left by the {how} of vm-{vm.id} to {target.fqdn}",
                      vm.id, vm.console_log_pool)  # fmt: skip
        drop_leftover(target.id, LOG, log, vm.console_log_pool)
    if move.seed_volume is not None:
        pool, name = move.seed_volume
        move.old_seed = (vm.seed_pool, vm.seed_volume)
        db.session.execute(
            update(Vm).where(Vm.id == vm.id)
            .values(seed_pool=pool, seed_volume=name, seed_path=move.seed_path)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
        note_leftover(source.id, VOLUME, vm.seed_volume,
                      f"left by the {how} of vm-{vm.id} to {target.fqdn}", vm.id,
                      vm.seed_pool)  # fmt: skip
        drop_leftover(target.id, VOLUME, name, pool)
    invalidate_console_tokens(vm.id)
    seconds = round(time.monotonic() - move.started, 3)
    after: dict[str, Any] = {"node_id": target.id, "kind": move.kind, "seconds": seconds}
    if move.downtime is not None:
        after["downtime_ms"] = round(move.downtime * 1000, 1)
    if moved:
        after["storage"] = moved
    action = "evacuate" if move.kind == EVACUATE else "migrate"
    audit.record(db.session, "vm", vm.id, action, {"node_id": source.id}, after,
                 customer_id=vm.customer_id)  # fmt: skip
    db.session.commit()
    db.session.refresh(
        vm, ["node_id", "migration_node_id", "vm_state_id", "console_log_path", "seed_pool",
             "seed_volume", "seed_path"]
    )  # fmt: skip


# ---------------------------------------------------------------------- after a crash
def settle(vm: Vm, source_dead: bool = False) -> str:
    """Resolve a move whose process died (the VM's marker is set), by where libvirt says
    the domain is: on the target only, the move is recorded there; otherwise it is
    undone (the claim released, the volumes made on the target deleted). Call it
    holding the VM's lock. ``source_dead``: the source was fenced (an evacuation's or an
    HA restart's), so only the target is asked; a domain found there defined but not
    started (the process died between the two) is started when the VM was running or
    paused, as the evacuation would have. What was done."""
    target = Host.of(vm.migration_node_id)
    source = Host.of(vm.node_id)
    on_target = _there(target, vm)
    on_source = False if source_dead else _there(source, vm)
    move = Move(vm, source, target, LIVE, moved_volumes(vm.id), deadline=time.monotonic())
    if on_target and on_source:
        raise Conflict(
            f"vm-{vm.id} has a domain on {source.node.fqdn} and on {target.node.fqdn}: its "
            "move may still be running in libvirt. Retry when it has ended.",
            error_id=VM_BUSY, data={"vm": {"id": vm.id}},
        )  # fmt: skip
    driver = hypervisor()
    made = [left for left in leftovers_on(target.node.id) if left.vm_id == vm.id]
    if on_target:
        volumes = {v.storage.volume_name for v in move.volumes}
        for volume in move.volumes:
            volume.target_path = (volume.storage.path if volume.shared else driver.volume(
                target.uri, volume.storage.pool, volume.storage.volume_name)[0])  # fmt: skip
        if vm.console_log_pool is not None:
            directory = driver.pool_dir(target.uri, vm.console_log_pool,
                                        current_app.config["CONSOLE_LOG_DIR"])  # fmt: skip
            move.console_log = f"{directory.rstrip('/')}/{console_log_name(vm.domain_name)}"
        for left in made:  # the seed made for the move: the volume that is no storage's
            if left.kind == VOLUME and left.name not in volumes and vm.seed_volume is not None:
                move.seed_volume = (left.pool, left.name)
                move.seed_path = driver.volume(target.uri, left.pool, left.name)[0]
        state, started = driver.domain(target.uri, vm.domain_name).state, []
        if source_dead and state == SHUTOFF and _stored_state(vm) in (RUNNING, PAUSED):
            driver.start(target.uri, vm.domain_name)
            state, started = driver.domain(target.uri, vm.domain_name).state, ["(and started)"]
        record(move, state)
        notes = remove_source_leftovers(move)
        done = f"an interrupted move to {target.node.fqdn} was recorded"
        return " ".join([done, *started, *notes])
    for left in made:  # what the move made on the target
        if left.kind == VOLUME:
            delete_listed_volume(target, left.pool, left.name)
        elif left.kind == LOG:
            delete_listed_log(target, left.pool, left.name)
    release_target(vm, target.node.id)
    db.session.refresh(vm, ["migration_node_id"])
    return f"an interrupted move to {target.node.fqdn} was undone"


def _stored_state(vm: Vm) -> str:
    return db.session.get(VmState, vm.vm_state_id).name


def _there(host: Host, vm: Vm) -> bool:
    try:
        hypervisor().domain(host.uri, vm.domain_name)
    except DomainNotFound:
        return False
    return True
