"""The ledger of leftovers: what a node still has of this installation but should not.

A move records the volumes it makes on its target before making them (so a process that
dies mid-move leaves a list, not a mystery), and the source's volumes once the domain
has left them; an evacuation records everything it leaves on the dead node. Whoever
removes the thing drops its entry. ``flask vmapi reconcile --fix`` removes what is still
listed once the node answers (:func:`remove_leftover`), and only while no row owns it
there again: a VM may have moved back meanwhile. An undo step that was to remove
something from a node and failed lists it too, under the step's name
(:func:`note_failed_undo`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app
from sqlalchemy import delete, select

from vmapi.extensions import db
from vmapi.hypervisor import DomainNotFound, PoolNotFound, VolumeNotFound
from vmapi.models import Image, Leftover, Storage, Vm
from vmapi.models.image import SAVING
from vmapi.models.leftover import DOMAIN, LOG, VOLUME
from vmapi.services.names import installation_id, saved_image_id
from vmapi.services.nodes.domains import remove_domain
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.storage.ceph import rbd_type_of_pool, remove_rbd_volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Left:
    """Something on a node that a leftover entry names: a domain, or a volume or console
    log of ``pool``."""

    node_id: int
    kind: str
    name: str
    vm_id: int | None
    pool: str | None = None


def note_leftover(
    node_id: int, kind: str, name: str, reason: str, vm_id: int | None, pool: str | None = None
) -> None:
    """List ``name`` (a domain, or a volume of ``pool``) as a leftover on the node, once;
    the caller commits."""
    if find_leftover(node_id, kind, name, pool) is None:
        db.session.add(Leftover(node_id=node_id, kind=kind, pool=pool, name=name, vm_id=vm_id,
                                reason=reason[:255], created_at=datetime.now(UTC)))  # fmt: skip


def note_failed_undo(left: Left, step: str, error: Exception) -> None:
    """An undo step that was to remove ``left`` failed: list it as a leftover (an entry
    there already, as a move makes one before making the thing, gets the step's name),
    so reconcile shows which step failed and ``--fix`` removes it. Commits; a database
    that fails here too is logged, never raised (the request's own error goes on)."""
    reason = f"undo step failed: {step} ({getattr(error, 'reason', None) or error})"
    try:
        found = find_leftover(left.node_id, left.kind, left.name, left.pool)
        if found is None:
            note_leftover(left.node_id, left.kind, left.name, reason, left.vm_id, left.pool)
        else:
            found.reason = reason[:255]
        db.session.commit()
    except Exception:
        db.session.rollback()
        log.exception("could not list what the failed undo step %s left", step)


def find_leftover(node_id: int, kind: str, name: str, pool: str | None = None) -> Leftover | None:
    stmt = select(Leftover).where(
        Leftover.node_id == node_id,
        Leftover.kind == kind,
        Leftover.name == name,
        Leftover.pool.is_(None) if pool is None else Leftover.pool == pool,
    )
    return db.session.scalars(stmt).first()


def drop_leftover(node_id: int, kind: str, name: str, pool: str | None = None) -> None:
    """It is gone (or owned again): strike it off; the caller commits."""
    stmt = delete(Leftover).where(
        Leftover.node_id == node_id,
        Leftover.kind == kind,
        Leftover.name == name,
        Leftover.pool.is_(None) if pool is None else Leftover.pool == pool,
    )
    db.session.execute(stmt.execution_options(synchronize_session=False))


def delete_listed_volume(host: Host, pool: str, name: str) -> None:
    """Delete a volume of ours that is listed as a leftover on the host (gone already is
    fine), and strike it off."""
    rbd = rbd_type_of_pool(pool)
    if rbd is not None:  # an RBD image: through the API host, whatever the node's pool knows
        remove_rbd_volume(rbd, name)
    else:
        with contextlib.suppress(VolumeNotFound):
            hypervisor().delete_volume(host.uri, pool, name)
    drop_leftover(host.node.id, VOLUME, name, pool)
    db.session.commit()


def delete_listed_log(host: Host, pool: str, name: str) -> None:
    """Delete a console log of ours listed as a leftover on the host (and its rotated
    files), and strike it off."""
    with contextlib.suppress(PoolNotFound):
        hypervisor().delete_log(host.uri, pool, name)
    drop_leftover(host.node.id, LOG, name, pool)
    db.session.commit()


def leftovers_on(node_id: int) -> list[Leftover]:
    stmt = select(Leftover).where(Leftover.node_id == node_id).order_by(Leftover.id)
    return list(db.session.scalars(stmt))


def stale_before() -> datetime:
    """A ``saving`` image made before this is no save in flight any more: each is bounded
    by IMAGE_SAVE_TIMEOUT (and its worker dies with it)."""
    seconds = float(current_app.config["IMAGE_SAVE_TIMEOUT"])
    return datetime.now(UTC) - timedelta(seconds=2 * seconds + 60)


def save_in_flight(volume: str) -> bool:
    """Whether ``volume`` is the temporary copy of a save still in flight (a ``saving``
    image within its time): listed before it is made, but not to be removed yet."""
    image_id = saved_image_id(volume)
    if image_id is None:
        return False
    stmt = select(Image.id).where(Image.id == image_id, Image.state == SAVING,
                                  Image.created_at >= stale_before())  # fmt: skip
    return db.session.scalar(stmt) is not None


def owned_there(leftover: Leftover) -> bool:
    """Whether a row of the database owns the thing on that node again (a VM that moved
    back: its domain, volumes, seed and log carry the same names)."""
    if leftover.kind == DOMAIN:
        stmt = select(Vm.id).where(Vm.node_id == leftover.node_id, Vm.domain_name == leftover.name)
    elif leftover.kind == LOG:
        stmt = select(Vm.id).where(
            Vm.node_id == leftover.node_id,
            Vm.console_log_pool == leftover.pool,
            Vm.console_log_path.endswith(f"/{leftover.name}"),
        )
    else:
        stmt = select(Storage.id).where(
            Storage.node_id == leftover.node_id,
            Storage.pool == leftover.pool,
            Storage.volume_name == leftover.name,
        )
        seed = select(Vm.id).where(
            Vm.node_id == leftover.node_id,
            Vm.seed_pool == leftover.pool,
            Vm.seed_volume == leftover.name,
        )
        stmt = stmt.union_all(seed)
    return db.session.scalars(stmt).first() is not None


def remove_leftover(leftover: Leftover, host: Host) -> str:
    """Remove a listed leftover from its (answering) node and strike it off; what was
    done. The copy of a save in flight stays, and stays listed. A domain is removed only
    if it carries this installation's metadata (anything else of that name is not ours to
    touch). Hypervisor errors are the caller's."""
    where = leftover.name if leftover.kind == DOMAIN else f"{leftover.pool}/{leftover.name}"
    if leftover.kind == VOLUME and save_in_flight(leftover.name):
        return f"{where} is the copy of a save still in flight; kept, and still listed"
    if owned_there(leftover):
        done = f"{where} is owned on this node again; kept"
    elif leftover.kind == VOLUME:
        try:
            hypervisor().delete_volume(host.uri, leftover.pool, leftover.name)
            done = "volume deleted"
        except (VolumeNotFound, PoolNotFound):
            done = "volume already gone"
    elif leftover.kind == LOG:
        with contextlib.suppress(PoolNotFound):
            hypervisor().delete_log(host.uri, leftover.pool, leftover.name)
        done = "console log deleted"
    else:
        done = _remove_domain(leftover, host)
    drop_leftover(leftover.node_id, leftover.kind, leftover.name, leftover.pool)
    db.session.commit()
    return done


def _remove_domain(leftover: Leftover, host: Host) -> str:
    try:
        info = hypervisor().domain(host.uri, leftover.name)
    except DomainNotFound:
        return "domain already gone"
    if info.installation != installation_id() or info.vm_id != leftover.vm_id:
        return "a domain of that name without this VM's metadata is there; left alone"
    remove_domain(host, leftover.name)
    return "domain destroyed and undefined"
