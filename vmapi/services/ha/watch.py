"""``flask vmapi ha watch``: find dead nodes, fence them, restart their HA VMs elsewhere.

One watcher is active across every API host: it holds a PostgreSQL advisory lock on a
connection of its own for as long as it runs (it vanishes with the process); any other
waits as a standby, trying the lock every ``HA_INTERVAL``, and takes over when the
active one dies. Each round (every ``HA_INTERVAL`` seconds) asks every node with a
libvirt URI for its capacity, all at once, each call bounded by ``LIBVIRT_TIMEOUT``:

- a node that answers has missed nothing (``ok``; a ``suspect`` one is ``ok`` again);
  one that was ``fenced`` and answers again is ``recovered`` (its VMs that were restarted
  elsewhere run there now: reconcile removes what it kept; an admin brings it back, and
  it is ``ok`` once its node_state takes new VMs again); a ``fence_failed`` one that
  answers is ``ok`` again (nothing of it was restarted);
- one that does not counts a miss (``suspect``); at ``HA_MISSES`` misses in a row it is
  fenced (:mod:`.fencing`): ``fencing`` while its agent runs, then ``fenced`` when the
  agent's ``off`` and ``status`` said it is off, else ``fence_failed`` — and then nothing
  of it is restarted until an admin confirms with ``flask vmapi node fenced FQDN``. A
  watcher that dies while a node is ``fencing`` fences it again when it comes back (an
  agent's ``off`` of a node that is off is no harm);
- a ``fenced`` node's HA VMs are restarted elsewhere (:mod:`.restart`), in every round
  until none is left to restart: the VMs capacity cannot take yet wait for the next. A
  restart the lock manager refuses (another host holds the lease of the VM's disk: the
  node is not off, whatever its agent said) makes the node ``fence_failed``, and nothing
  more of it restarts until an admin confirms with ``flask vmapi node fenced FQDN``.

Every change of ``ha_state`` is committed before what follows it, logged, and recorded
in the audit trail; ``/metrics`` shows each node's state (``vmapi_node_ha_state``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flask import current_app
from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, HypervisorUnavailable
from vmapi.models import Node, NodeState
from vmapi.services.ha.fencing import fence_node
from vmapi.services.ha.restart import FencingContradicted, restart_fenced
from vmapi.services.nodes.hosts import hypervisor, node_uri, on_hosts

log = logging.getLogger(__name__)

OK, SUSPECT, FENCING, FENCED, FENCE_FAILED, RECOVERED = (
    "ok", "suspect", "fencing", "fenced", "fence_failed", "recovered",
)  # fmt: skip
#: the advisory lock only the active watcher holds
LEADER_KEY = int.from_bytes(hashlib.sha256(b"vmapi ha watch").digest()[:8], "big", signed=True)
#: nodes asked at once
WORKERS = 64
_LOCAL_LEADER = threading.Lock()  # SQLite: one process, one watcher


class LostLead(Exception):
    """The watcher's lock session is gone: another watcher may be active now."""


@dataclass
class Watcher:
    """The active watcher's memory between rounds: what it last said of each VM it could
    not restart (so a line is printed when that changes, not every round)."""

    say: Callable[[str], None] = print
    told: dict[int, str] = field(default_factory=dict)
    lead: Lead | None = None

    def leading(self) -> None:
        """Raise :class:`LostLead` unless this watcher still holds the leader lock."""
        if self.lead is not None and not self.lead.held():
            raise LostLead()

    def round(self) -> None:
        """One round: probe every node, move each along its states, restart what is due."""
        for node_id in probe_all():
            self.step(node_id)

    def step(self, node_id: int) -> None:
        node = db.session.get(Node, node_id, populate_existing=True)
        if node is None:
            return
        due = node.ha_misses >= int(current_app.config["HA_MISSES"])
        if node.ha_state == FENCING or (node.ha_state == SUSPECT and due):
            self.leading()
            self.fence(node)
        if node.ha_state == FENCED and node.unreachable_since is not None:
            self.leading()
            try:
                lines = restart_fenced(node.id)
            except FencingContradicted as exc:
                self.tell(exc.lines)
                self.contradicted(node, exc.detail)
                return
            self.tell(lines)

    def tell(self, lines: list[str]) -> None:
        for line in lines:
            vm_id, _, detail = line.partition(" ")
            if self.told.get(int(vm_id)) != detail:
                self.told[int(vm_id)] = detail
                self.say(f"vm-{vm_id}: {detail}")

    def contradicted(self, node: Node, detail: str) -> None:
        """The lock manager says the fenced node still has a disk open: ``fence_failed``
        (unless an admin changed its state meanwhile), an error in the log."""
        node = locked_node(node.id)
        if node.ha_state != FENCED:
            db.session.commit()
            return
        why = f"its fence agent said off, but {detail}"
        set_state(node, FENCE_FAILED, why)
        log.error("node %s is NOT off: %s; none of its VMs is restarted until `flask vmapi "
                  "node fenced %s` confirms it is", node.fqdn, why, node.fqdn)  # fmt: skip
        self.say(f"{node.fqdn}: FENCE FAILED ({why}): nothing more of it restarts until "
                 f"`flask vmapi node fenced {node.fqdn}`")  # fmt: skip

    def fence(self, node: Node) -> None:
        set_state(node, FENCING, f"missed {node.ha_misses} checks in a row")
        self.say(f"{node.fqdn}: missed {node.ha_misses} checks in a row: fencing")
        outcome = fence_node(node.id)
        # under the row's lock: an operator's `node fenced` meanwhile is not overwritten
        node = locked_node(node.id)
        if node.ha_state != FENCING:
            db.session.commit()
            self.say(f"{node.fqdn}: {node.ha_state} meanwhile (by an admin); the agent said: "
                     f"{outcome.detail}")  # fmt: skip
            return
        if outcome.off:
            set_state(node, FENCED, outcome.detail)
            self.say(f"{node.fqdn}: fenced ({outcome.detail}, {outcome.seconds:.1f} s)")
        else:
            set_state(node, FENCE_FAILED, outcome.detail)
            log.error("node %s could not be fenced: %s; none of its VMs is restarted until "
                      "`flask vmapi node fenced %s` confirms it is off", node.fqdn,
                      outcome.detail, node.fqdn)  # fmt: skip
            self.say(f"{node.fqdn}: FENCE FAILED ({outcome.detail}): nothing of it restarts "
                     f"until `flask vmapi node fenced {node.fqdn}`")  # fmt: skip


def set_state(node: Node, state: str, why: str) -> None:
    """Commit the node's new ``ha_state`` (with its time: the trail records the change),
    and log it."""
    before = node.ha_state
    if before == state:
        return
    node.ha_state = state
    node.ha_since = datetime.now(UTC)
    db.session.commit()
    log.warning("node %s: ha_state %s -> %s (%s)", node.fqdn, before, state, why)


def probe_all() -> list[int]:
    """Ask every node with a libvirt URI at once; record each answer (misses, state,
    ``last_seen_at``/``unreachable_since`` as the health check does). The node ids."""
    nodes = db.session.scalars(
        select(Node).where(Node.libvirt_uri.is_not(None)).order_by(Node.id)
    ).all()
    uris = {}
    for node in nodes:
        try:
            uris[node.id] = node_uri(node.fqdn, node.libvirt_uri)
        except ApiError:  # a URI that may not be opened: not watched (node check says so)
            continue
    db.session.commit()  # (only read) nothing stays open while the nodes answer
    driver = hypervisor()
    results = on_hosts(uris, driver.host_info, WORKERS)
    now = datetime.now(UTC)
    schedulable = set(db.session.scalars(select(NodeState.id).where(NodeState.schedulable)))
    for node in db.session.scalars(select(Node).where(Node.id.in_(uris)).order_by(Node.id)):
        result = results[node.id]
        if isinstance(result, HypervisorError):
            reason = (result.reason_class or "unreachable") if isinstance(
                result, HypervisorUnavailable) else result.reason  # fmt: skip
            node.last_error = reason[:1000]
            node.unreachable_since = node.unreachable_since or now
            node.ha_misses += 1
            if node.ha_state == OK:
                set_state(node, SUSPECT, reason)
        else:
            node.last_seen_at, node.last_error, node.unreachable_since = now, None, None
            node.ha_misses = 0
            if node.ha_state == SUSPECT:
                set_state(node, OK, "it answers")
            elif node.ha_state == FENCE_FAILED:
                set_state(node, OK, "it answers again; none of its VMs was restarted")
            elif node.ha_state == FENCED:
                set_state(node, RECOVERED, "it answers again after it was fenced")
            elif node.ha_state == RECOVERED and node.node_state_id in schedulable:
                set_state(node, OK, "an admin brought it back")
    db.session.commit()
    return list(uris)


class Lead:
    """The active watcher's hold on the leader lock. On PostgreSQL the lock lives as
    long as the session of :attr:`conn`: a failover or a cut connection ends it, and
    :meth:`held` says so (it asks the server whether this session still holds it, so a
    connection SQLAlchemy replaced underneath does not pass for the lock)."""

    def __init__(self, conn: Connection | None = None) -> None:
        self.conn = conn

    def held(self) -> bool:
        if self.conn is None:
            return True  # SQLite: the process's own lock
        hi, lo = (LEADER_KEY >> 32) & 0xFFFFFFFF, LEADER_KEY & 0xFFFFFFFF
        try:
            if self.conn.invalidated:
                return False
            mine = self.conn.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                     "AND pid = pg_backend_pid() AND objsubid = 1 "
                     "AND classid::bigint = :hi AND objid::bigint = :lo"),
                {"hi": hi, "lo": lo},
            ).scalar()  # fmt: skip
            self.conn.commit()
        except DBAPIError:
            return False
        return bool(mine)


@contextmanager
def leadership(stop: threading.Event, say: Callable[[str], None]) -> Iterator[Lead | None]:
    """Hold the watcher's lock for the block (a :class:`Lead`), waiting as a standby
    until it is free — and, on PostgreSQL, until the database answers (a failover):
    the lock is tried again every HA_INTERVAL on a new session; None when ``stop`` was
    set first."""
    interval = float(current_app.config["HA_INTERVAL"])
    standby = "standby: another `ha watch` is active; taking over when it stops"
    if db.engine.dialect.name != "postgresql":
        told = False
        while not _LOCAL_LEADER.acquire(timeout=interval):
            if not told:
                say(standby)
                told = True
            if stop.is_set():
                yield None
                return
        try:
            yield Lead()
        finally:
            _LOCAL_LEADER.release()
        return
    conn = None
    try:
        told = None
        while True:
            try:
                conn = conn or db.engine.connect()
                if conn.execute(select(func.pg_try_advisory_lock(LEADER_KEY))).scalar():
                    break
                conn.commit()
                why = standby
            except DBAPIError as exc:
                _close(conn)
                conn = None
                why = f"standby: the database does not answer ({_first_line(exc)}); retrying"
            if told != why:
                say(why)
                told = why
            if stop.wait(interval):
                yield None
                return
        conn.commit()  # a session lock: no transaction stays open while it is held
        try:
            yield Lead(conn)
        finally:
            try:
                if not conn.invalidated:  # (else its session is gone, and the lock with it)
                    conn.rollback()
                    conn.execute(select(func.pg_advisory_unlock(LEADER_KEY)))
                    conn.commit()
            except Exception:  # the session is gone, and its lock with it
                log.warning("the ha watch lock's session was gone at its release")
    finally:
        _close(conn)


def _close(conn: Connection | None) -> None:
    if conn is None:
        return
    try:
        conn.invalidate()  # never back to the pool: a session lock may still be on it
        conn.close()
    except Exception:
        log.debug("closing the ha watch lock's connection failed", exc_info=True)


def _first_line(exc: Exception) -> str:
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0]


def watch(stop: threading.Event, say: Callable[[str], None] = print,
          rounds: int | None = None) -> None:  # fmt: skip
    """Run rounds every HA_INTERVAL until ``stop`` (or ``rounds`` rounds), as the active
    watcher. Before each round (and each fencing) it checks that it still holds the
    leader lock; once its lock's session is gone (a failover, a cut connection) it acts
    no more, and waits as a standby to take the lock again on a new session."""
    interval = float(current_app.config["HA_INTERVAL"])
    done = 0
    while not stop.is_set() and (rounds is None or done < rounds):
        with leadership(stop, say) as lead:
            if lead is None:
                return
            say(f"active: checking every node every {interval:g} s, fencing after "
                f"{current_app.config['HA_MISSES']} misses")  # fmt: skip
            watcher = Watcher(say, lead=lead)
            while not stop.is_set() and (rounds is None or done < rounds):
                if not lead.held():
                    _rollback_quietly()
                    say("lost the leader lock (its database session is gone): acting no "
                        "more; taking it again on a new session")  # fmt: skip
                    break
                started = time.monotonic()
                try:
                    watcher.round()
                except LostLead:
                    _rollback_quietly()
                    continue  # (said at the top of the loop)
                except Exception:  # a round that failed (the database away?) is retried
                    _rollback_quietly()
                    log.exception("an ha watch round failed; the next one retries")
                done += 1
                stop.wait(max(0.0, interval - (time.monotonic() - started)))


def _rollback_quietly() -> None:
    try:
        db.session.rollback()
    except Exception:
        log.debug("rollback failed", exc_info=True)


def locked_node(node_id: int) -> Node:
    """The node's row read afresh under its lock: an operator's change meanwhile (``node
    fenced``, a state set by hand) is seen and not overwritten."""
    return db.session.scalars(
        select(Node).where(Node.id == node_id).with_for_update()
        .execution_options(populate_existing=True)
    ).one()  # fmt: skip
