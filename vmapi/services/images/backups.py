"""Backups: ``flask vmapi backup run`` (:mod:`vmapi.cli_backup`), nightly from the shipped
systemd timer (deploy/systemd/vmapi-backup.timer).

A run chooses its VMs, in id order: every VM with ``backup_keep`` set, or those of one
customer, or one VM (which, given ``keep``, needs none); ``keep`` overrides each VM's
``backup_keep``. It first cleans up after saves that died part-way (their rows:
:func:`vmapi.services.images.stale_saves.sweep`; their temporary copies on the nodes),
then takes the VMs one at a time (a save is bound by the node's disk and the image
store, so they do not run side by side):

1. The run's backup of the VM is named ``vm-<id>-backup-<YYYY-MM-DD>``, the run's day in
   UTC. A VM that has it already (active, or a save of it in flight) is skipped, so a
   run repeated the same day — after a crash, or by hand — makes no second one.
   Otherwise its root disk is saved as an image of ``kind: backup``
   (:func:`vmapi.services.images.saving.save_vm`, under the VM's lock, owned by the VM's
   customer and counted in its storage quota).
2. Rotation, once the day's backup is active: of the VM's active backups (of its root
   disk), the newest ``keep`` stay and the older ones are deleted as ``DELETE /image``
   deletes (the file, every node's copy). One a VM boots from is kept (409
   ``image/in_use``) and the VM's line says so.

A VM whose save fails (``vm/busy``, its node, its quota...) keeps every backup it has;
its line says why and the run goes on with the next VM.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlalchemy import select

from vmapi.auth import Principal
from vmapi.error_ids import in_use
from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Image, Leftover, Vm
from vmapi.models.image import ACTIVE, BACKUP, SAVING
from vmapi.models.leftover import VOLUME
from vmapi.services.images.catalog import ImageService
from vmapi.services.images.saving import save_vm
from vmapi.services.images.stale_saves import sweep
from vmapi.services.leftovers import remove_leftover, save_in_flight
from vmapi.services.names import saved_image_id
from vmapi.services.nodes.hosts import Host

log = logging.getLogger(__name__)


class BackupRefused(Exception):
    """A run that cannot start (a VM that does not exist, or has no ``backup_keep``)."""


def backup_name(vm_id: int, day: date) -> str:
    """The name of a VM's backup made on ``day`` (UTC): ``vm-<id>-backup-<YYYY-MM-DD>``."""
    return f"vm-{vm_id}-backup-{day:%Y-%m-%d}"


@dataclass(frozen=True)
class Chosen:
    """A VM a run backs up, and how many of its backups it keeps."""

    vm_id: int
    keep: int


@dataclass
class Run:
    """A run's day, its VMs and what its sweep did."""

    day: date
    chosen: list[Chosen]
    swept: list[str]
    started: float = field(default_factory=time.monotonic)


@dataclass
class Backup:
    """What a run did for one VM."""

    vm_id: int
    name: str
    saved: int | None = None  # the image made
    size: int = 0  # its bytes
    skipped: str | None = None  # why nothing was saved (not a failure)
    error: str | None = None  # why the save failed
    deleted: list[int] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # old backups a VM boots from
    problems: list[str] = field(default_factory=list)  # deletions that failed
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.error is not None or bool(self.problems)

    @property
    def status(self) -> str:
        """``failed`` (the save, or deleting an old backup), ``saved`` or ``skipped``."""
        if self.failed:
            return "failed"
        return "saved" if self.saved is not None else "skipped"

    def line(self) -> str:
        if self.error is not None:
            what = f"{self.error}; its backups were left as they are"
        elif self.saved is not None:
            what = (f"saved image {self.saved} {self.name} ({self.size / 1024**2:.1f} MiB, "
                    f"{self.seconds:.1f} s)")  # fmt: skip
        else:
            what = f"nothing saved: {self.skipped}"
        parts = [f"{self.status.upper() if self.failed else self.status:7} vm-{self.vm_id}: {what}"]
        if self.deleted:
            parts.append(f"deleted old backup{'s' if len(self.deleted) > 1 else ''} "
                         f"{', '.join(f'image {i}' for i in self.deleted)}")  # fmt: skip
        parts += self.kept + self.problems + self.notes
        return "; ".join(part.rstrip(".") for part in parts)


# ---------------------------------------------------------------------- a run
def start(
    vm_id: int | None = None,
    customer_id: int | None = None,
    keep: int | None = None,
    day: date | None = None,
) -> Run:
    """Choose the VMs (one, a customer's, or every one with ``backup_keep`` when neither
    is given), then sweep what dead saves left; :class:`BackupRefused` before anything
    is done when ``vm_id`` names no VM or one with neither ``backup_keep`` nor ``keep``."""
    chosen = choose(vm_id, customer_id, keep)
    swept = sweep() + remove_dead_copies()
    return Run(day or datetime.now(UTC).date(), chosen, swept)


def remove_dead_copies() -> list[str]:
    """The listed temporary copies of saves no longer in flight (the sweep just forgot
    them, or reconcile has not come by): deleted now, so that a run after a crash frees
    their room on the nodes; one whose node fails stays listed for reconcile."""
    done = []
    stmt = select(Leftover).where(Leftover.kind == VOLUME).order_by(Leftover.id)
    for left in db.session.scalars(stmt).all():
        if saved_image_id(left.name) is None or save_in_flight(left.name):
            continue
        where = f"{left.pool}/{left.name}"
        try:
            host = Host.of(left.node_id)
            done.append(f"{where} on node {host.node.fqdn}: {remove_leftover(left, host)}")
        except (ApiError, HypervisorError) as exc:
            db.session.rollback()
            reason = getattr(exc, "reason", None) or str(exc)
            done.append(f"{where}: not removed ({reason}); reconcile --fix removes it later")
    return done


def choose(vm_id: int | None, customer_id: int | None, keep: int | None) -> list[Chosen]:
    if vm_id is not None:
        vm = db.session.get(Vm, vm_id)
        if vm is None:
            raise BackupRefused(f"vm-{vm_id} does not exist")
        if keep is None and vm.backup_keep is None:
            raise BackupRefused(f"vm-{vm_id} has no backup_keep; give --keep N to back it up")
        return [Chosen(vm.id, keep or vm.backup_keep)]
    stmt = select(Vm.id, Vm.backup_keep).where(Vm.backup_keep.is_not(None))
    if customer_id is not None:
        stmt = stmt.where(Vm.customer_id == customer_id)
    return [Chosen(ident, keep or kept) for ident, kept in db.session.execute(stmt.order_by(Vm.id))]


def back_up(run: Run, chosen: Chosen, principal: Principal) -> Backup:
    """Save one VM's backup of the run's day unless it has it, then rotate its backups
    (see the module's text). Never raises for the VM's own failures: its line says them."""
    began = time.monotonic()
    result = Backup(chosen.vm_id, backup_name(chosen.vm_id, run.day))
    try:
        if db.session.scalar(select(Vm.id).where(Vm.id == chosen.vm_id)) is None:
            result.skipped = "deleted since the run began"
            return result
        found = day_backup(chosen.vm_id, result.name)
        if found is not None and found.state == SAVING:
            result.skipped = f"image {found.id} {found.name} is being saved by another run"
            return result
        if found is not None:
            result.skipped = f"it has this day's backup already (image {found.id} {found.name})"
        else:
            description = f"Backup of vm-{chosen.vm_id}, flask vmapi backup run of {run.day}."
            made = save_vm(chosen.vm_id, principal, result.name, description, kind=BACKUP)
            result.saved, result.size = made.objects[0].id, made.objects[0].size or 0
            result.notes += made.messages
        rotate(result, chosen.keep, principal)
    except ApiError as exc:
        db.session.rollback()
        result.error = f"{exc.error_id}: {exc.message}"
    except Exception as exc:  # one VM's surprise must not cost the others their backup
        db.session.rollback()
        log.exception("the backup of vm-%s failed", chosen.vm_id)
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.monotonic() - began
    return result


def day_backup(vm_id: int, name: str) -> Image | None:
    """The VM's backup named ``name``, active or being saved (the sweep ran: a save of
    it in flight is a live one)."""
    stmt = select(Image).where(*of_root_disk(vm_id), Image.name == name,
                               Image.state.in_((ACTIVE, SAVING)))  # fmt: skip
    return db.session.scalars(stmt.order_by(Image.id)).first()


def of_root_disk(vm_id: int) -> tuple:
    """The conditions of the VM's backups: of its root disk, not of its volumes."""
    return (Image.kind == BACKUP, Image.source_vm_id == vm_id, Image.source_storage_id.is_(None))


def rotate(result: Backup, keep: int, principal: Principal) -> None:
    """Delete the VM's active backups but the newest ``keep`` (by when they were made), as
    DELETE /image does; one a VM boots from stays."""
    stmt = select(Image.id).where(*of_root_disk(result.vm_id), Image.state == ACTIVE)
    newest_first = list(db.session.scalars(stmt.order_by(Image.created_at.desc(),
                                                          Image.id.desc())))  # fmt: skip
    images = ImageService()
    for ident in reversed(newest_first[keep:]):  # the oldest first
        try:
            outcome = images.delete_many([ident], principal, {}, indexed=False)
        except ApiError as exc:
            db.session.rollback()
            if exc.error_id == in_use("image"):
                booting = ", ".join(f"vm-{i}" for i in (exc.data or {}).get("vm", []))
                result.kept.append(f"kept image {ident}: {booting} boot(s) from it")
            else:
                result.problems.append(f"image {ident} was not deleted: {exc.error_id}: "
                                       f"{exc.message}")  # fmt: skip
            continue
        result.deleted.append(ident)
        result.notes += outcome.messages


def summary(run: Run, results: list[Backup]) -> str:
    """The run's last line: counts, and VMs per minute."""
    seconds = time.monotonic() - run.started
    counts = {status: sum(r.status == status for r in results)
              for status in ("saved", "skipped", "failed")}  # fmt: skip
    deleted = sum(len(r.deleted) for r in results)
    kept = sum(len(r.kept) for r in results)
    rate = len(results) / (seconds / 60) if seconds > 0 else 0.0
    return (
        f"backup run of {run.day}: {len(results)} VM(s), {counts['saved']} saved, "
        f"{counts['skipped']} skipped, {counts['failed']} failed; {deleted} old backup(s) "
        f"deleted, {kept} kept in use; {rate:.1f} VMs per minute ({seconds:.0f} s)"
    )
