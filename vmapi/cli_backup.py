"""``flask vmapi backup ...``: a thin wrapper over :mod:`vmapi.services.images.backups`."""

from __future__ import annotations

import sys
from datetime import datetime

import click
from flask.cli import AppGroup

from vmapi.auth import CLI_PRINCIPAL
from vmapi.services.images.backups import Backup, BackupRefused, back_up, start, summary

backup_cli = AppGroup("backup", help="Backups of VMs' root disks, as images.")


@backup_cli.command("run")
@click.option("--vm", "vm_id", type=click.IntRange(min=1), help="This VM only.")
@click.option("--customer", "customer_id", type=click.IntRange(min=0),
              help="This customer's VMs that have backup_keep set.")  # fmt: skip
@click.option("--all", "every", is_flag=True, help="Every VM that has backup_keep set.")
@click.option("--keep", type=click.IntRange(min=1),
              help="Keep this many backups of each VM (default: its backup_keep).")  # fmt: skip
# the day the run's backups are named for (default: today, UTC); for tests
@click.option("--date", "day", type=click.DateTime(["%Y-%m-%d"]), hidden=True)
def backup_run(
    vm_id: int | None, customer_id: int | None, every: bool, keep: int | None, day: datetime | None
) -> None:
    """Back up VMs: each one's root disk is saved as an image of kind backup named
    vm-<id>-backup-<YYYY-MM-DD> (UTC), and its backups but the newest N are deleted
    (never one a VM boots from). A VM that has the day's backup already is skipped, so
    the run is safe to repeat, also after a crash (saves that died are cleaned up
    first). One VM at a time, in id order; one that fails is reported and the run goes
    on. Exits 1 when a VM failed."""
    if [vm_id is not None, customer_id is not None, every].count(True) != 1:
        raise click.UsageError("give exactly one of --vm ID, --customer ID or --all")
    try:
        run = start(vm_id, customer_id, keep, day.date() if day else None)
    except BackupRefused as exc:
        raise click.ClickException(str(exc)) from exc
    for line in run.swept:
        click.echo(line)
    results: list[Backup] = []
    shown: dict[int, str] = {}
    with click.progressbar(run.chosen, label=f"backing up {len(run.chosen)} VM(s)", file=sys.stderr,
                           item_show_func=lambda c: shown.get(c.vm_id) if c else None
                           ) as bar:  # fmt: skip
        for chosen in bar:
            shown[chosen.vm_id] = f"vm-{chosen.vm_id}"
            results.append(back_up(run, chosen, CLI_PRINCIPAL))
            shown[chosen.vm_id] = f"vm-{chosen.vm_id} {results[-1].status}"
    for result in results:
        click.echo(result.line())
    click.echo(summary(run, results))
    if any(result.failed for result in results):
        sys.exit(1)
