"""Ending a VM's console tokens: a row-level step that migrations, owner changes and
display replacements share, below ``consoles`` (which imports ``vms``) so that every
service that changes a VM can call it without a cycle."""

from __future__ import annotations

from sqlalchemy import delete

from vmapi.extensions import db
from vmapi.models import ConsoleToken


def invalidate_console_tokens(vm_id: int) -> int:
    """Forget every console token of a VM, in the caller's transaction: its display moved
    (a migration), was replaced, or the VM has a new owner. A deleted VM's tokens go with
    its row (ON DELETE CASCADE). How many there were."""
    stmt = delete(ConsoleToken).where(ConsoleToken.vm_id == vm_id)
    return db.session.execute(stmt.execution_options(synchronize_session=False)).rowcount
