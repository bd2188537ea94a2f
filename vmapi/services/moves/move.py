"""A move of a VM between nodes, as every step of it sees it: the VM, where from and to,
its volumes and what was made for it on the target (services/moves/books.py keeps its
books, services/moves/volumes.py prepares the target, services/moves/migrate.py and
services/moves/evacuation.py put the steps in order)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import select

from vmapi.extensions import db
from vmapi.models import Storage, StorageType, Vm
from vmapi.services.nodes.hosts import Host

LIVE, COLD, EVACUATE = "live", "cold", "evacuate"


@dataclass
class MovedVolume:
    """A storage row of the moving VM and where its volume is on the target."""

    storage: Storage
    fmt: str
    shared: bool  # its pool is the same on every node: it stays where it is
    target_path: str | None = None


@dataclass
class Move:
    """One VM on its way from ``source`` to ``target``, within ``deadline``."""

    vm: Vm
    source: Host
    target: Host
    kind: str  # live, cold or evacuate (made anew on the target: the source is dead)
    volumes: list[MovedVolume]
    deadline: float  # time.monotonic()
    started: float = field(default_factory=time.monotonic)
    messages: list[str] = field(default_factory=list)
    downtime: float | None = None  # seconds, as libvirt reports a live move's
    console_log: str | None = None  # the file the domain logs its console to on the target
    seed_path: str | None = None  # the cloud-init seed made on the target
    seed_volume: tuple[str, str] | None = None  # (pool, name) there
    old_seed: tuple[str, str] | None = None  # (pool, name) on the source, once recorded

    @property
    def copied(self) -> list[MovedVolume]:
        return [v for v in self.volumes if not v.shared]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def moved_volumes(vm_id: int) -> list[MovedVolume]:
    stmt = (
        select(Storage, StorageType.format, StorageType.shared)
        .join(StorageType, StorageType.id == Storage.storage_type_id)
        .where(Storage.vm_id == vm_id)
        .order_by(Storage.id)
    )
    return [MovedVolume(storage, fmt, shared) for storage, fmt, shared in db.session.execute(stmt)]
