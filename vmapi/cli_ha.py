"""``flask vmapi ha ...``: the high-availability watcher, a thin wrapper over
:mod:`vmapi.services.ha.watch`."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click
from flask.cli import AppGroup

from vmapi.services.ha.watch import watch

ha_cli = AppGroup("ha", help="High availability: dead nodes fenced, their HA VMs restarted.")


@ha_cli.command("watch")
# rounds to run before it returns (default: until SIGTERM/SIGINT); for tests and benches
@click.option("--rounds", type=click.IntRange(min=1), hidden=True)
def ha_watch(rounds: int | None) -> None:
    """Check every node every VMAPI_HA_INTERVAL seconds; fence a node that missed
    VMAPI_HA_MISSES checks in a row through its fence agent, then restart its HA VMs on
    other nodes. One watcher is active across all API hosts; others wait as standbys.
    Runs until SIGTERM or SIGINT (the round under way finishes first)."""
    stop = threading.Event()

    def stopping(_signum: int, _frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stopping)
        signal.signal(signal.SIGINT, stopping)
    watch(stop, lambda line: click.echo(line), rounds)
