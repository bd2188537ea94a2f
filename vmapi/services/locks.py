"""One operation at a time per VM: PostgreSQL advisory locks, held across the libvirt calls.

A resize, state change, reboot, delete or disk change of a VM runs while it holds the
VM's lock, so two requests for the same VM never interleave their libvirt calls (an
update redefining a domain that a delete just removed, two disk changes overwriting
each other's definition). Requests for other VMs are not affected: this is not a row
lock on a node. The locks live on one dedicated connection per request, are taken in id
order (so two arrays cannot deadlock), and vanish with the connection if the worker
dies. SQLite (the embedded single-process default) has no such locks; there this is a
no-op.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flask import current_app
from sqlalchemy import func, select

from vmapi.error_ids import VM_BUSY
from vmapi.errors import Conflict
from vmapi.extensions import db

LOCK_SPACE = 0x766D  # "vm": the first key of pg_advisory_lock(int, int)
INT32_MAX = 2**31 - 1


@contextmanager
def vm_locks(vm_ids: Iterable[int], wait: float | None = None) -> Iterator[None]:
    """Hold the locks of these VMs for the block; 409 ``vm/busy`` if one stays taken
    for ``wait`` seconds (default VM_LOCK_TIMEOUT; 0: try once)."""
    # VM ids are 32-bit serials: a larger id names no VM, and needs no lock.
    ids = sorted({i for i in vm_ids if 0 < i <= INT32_MAX})
    if db.engine.dialect.name != "postgresql" or not ids:
        yield
        return
    if wait is None:
        wait = float(current_app.config["VM_LOCK_TIMEOUT"])
    conn = db.engine.connect()
    try:
        for vm_id in ids:
            deadline = time.monotonic() + wait
            while not conn.execute(select(func.pg_try_advisory_lock(LOCK_SPACE, vm_id))).scalar():
                if time.monotonic() >= deadline:
                    raise Conflict(
                        f"Another operation on vm-{vm_id} is still running; retry shortly.",
                        error_id=VM_BUSY,
                        data={"vm": {"id": vm_id}},
                    )
                time.sleep(0.05)
            conn.commit()
        yield
    finally:
        conn.rollback()  # in case a statement failed: the unlock must still run
        conn.execute(select(func.pg_advisory_unlock_all()))
        conn.commit()
        conn.close()
