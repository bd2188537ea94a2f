"""Fencing a node: its fence agent powers it off and says so, or the node is not fenced.

:func:`fence_node` runs the node's agent (:mod:`vmapi.services.ha.agents`): ``off``,
then ``status``, which must say off; only then is the outcome ``off``. A node without an
agent, an agent that is not installed, a password file that cannot be read, an agent
that fails, hangs past ``HA_FENCE_TIMEOUT`` or still says on after ``off`` are all "not
fenced", each with its reason. Every outcome is logged (an error when not fenced: the
alert), counted in ``vmapi_fence_total{result}`` and recorded in the audit trail as the
node's ``fence`` action (outcome ``ok``, or the result). It changes no ``ha_state``: the
caller (``flask vmapi ha watch``) decides from the outcome.

:func:`confirm_fenced` is ``flask vmapi node fenced FQDN``: an operator who powered a
node off by hand says so, and the node is ``fenced``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from vmapi.extensions import db
from vmapi.models import Node
from vmapi.services import audit
from vmapi.services.ha.agents import (
    STATUS_OFF,
    STATUS_ON,
    AgentFailure,
    agent_dirs,
    agent_problem,
    find_agent,
    read_password,
    run_agent,
)
from vmapi.telemetry import count_fence

log = logging.getLogger(__name__)

#: What ``fence_node`` found, as the metric's ``result`` and the event's outcome
OFF, NO_AGENT, FAILED, TIMEOUT, STILL_ON = "off", "no_agent", "failed", "timeout", "still_on"
#: The states an operator may confirm as fenced: a node ha watch lost
CONFIRMABLE = ("suspect", "fencing", "fence_failed")
FENCED = "fenced"


@dataclass(frozen=True)
class FenceOutcome:
    """Whether the node is known to be off, why (or why not), and how long it took."""

    off: bool
    detail: str
    seconds: float


def fence_node(node_id: int) -> FenceOutcome:
    """Power node ``node_id`` off through its fence agent and make sure it is off.

    The session's transaction is ended (committed) before the agent runs, so no row is
    locked for the agent's seconds; the event is committed after."""
    started = time.monotonic()
    node = db.session.get(Node, node_id, populate_existing=True)
    if node is None:
        db.session.rollback()
        result, detail, fqdn, agent = FAILED, f"no node with id {node_id}", None, None
    else:
        fqdn, agent = node.fqdn, node.fence_agent
        address, user = node.fence_address, node.fence_user
        db.session.commit()
        result, detail = _fence(fqdn, agent, address, user, current_app.config)
    outcome = FenceOutcome(result == OFF, detail, time.monotonic() - started)
    count_fence(result, outcome.seconds)
    if outcome.off:
        log.warning("node %s fenced by %s in %.1f s: %s", fqdn, agent, outcome.seconds, detail)
    else:
        log.error(
            "node %s NOT fenced (%s): %s; nothing of it is restarted until it is "
            "(flask vmapi node fenced %s once it is off)", fqdn, result, detail, fqdn
        )  # fmt: skip
    if node is not None:
        _record(node_id, agent, result, outcome)
    return outcome


def _fence(
    fqdn: str, agent: str | None, address: str | None, user: str | None, config: Any
) -> tuple[str, str]:
    """(result, detail) of fencing one node: ``off`` then ``status``, which must say off."""
    if not agent:
        return NO_AGENT, (f"{fqdn} has no fence agent: power it off by hand, then confirm "
                          f"with flask vmapi node fenced {fqdn}")  # fmt: skip
    dirs = agent_dirs(config["HA_FENCE_AGENT_DIRS"])
    path = find_agent(agent, dirs)
    if path is None:
        return NO_AGENT, agent_problem(agent, dirs) or f"{agent} is not installed"
    timeout = float(config["HA_FENCE_TIMEOUT"])
    try:
        password = read_password(config["HA_FENCE_PASSWORD_DIR"], fqdn)
        options = {"ip": address, "username": user, "password": password}
        given = {name: value for name, value in options.items() if value is not None}
        off = run_agent(path, {**given, "action": "off"}, timeout, password)
        if off.code is None:
            return TIMEOUT, f"{agent} off: no answer within {timeout:g} s (killed)"
        if off.code != 0:
            return FAILED, f"{agent} off failed (exit {off.code}): {off.said or 'no message'}"
        status = run_agent(path, {**given, "action": "status"}, timeout, password)
    except AgentFailure as exc:
        return FAILED, str(exc)
    if status.code is None:
        return TIMEOUT, f"{agent} off said done; status: no answer within {timeout:g} s (killed)"
    if status.code == STATUS_OFF:
        said = f" ({status.said})" if status.said else ""
        return OFF, f"{agent} off, and status says off{said}"
    if status.code == STATUS_ON:
        return STILL_ON, f"{agent} off said done, but status still says on ({status.said})"
    return FAILED, (f"{agent} off said done, but status failed (exit {status.code}): "
                    f"{status.said or 'no message'}")  # fmt: skip


def _record(node_id: int, agent: str | None, result: str, outcome: FenceOutcome) -> None:
    """The node's ``fence`` event, in a transaction of its own. A database that cannot
    take it is logged: the outcome stands."""
    after = {"fence_agent": agent, "off": outcome.off, "result": result,
             "detail": outcome.detail, "seconds": round(outcome.seconds, 3)}  # fmt: skip
    try:
        audit.record(db.session, "node", node_id, "fence", None, after,
                     outcome="ok" if outcome.off else result)  # fmt: skip
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        log.exception("could not record the fencing of node %s", node_id)


class FenceRefused(Exception):
    """``node fenced`` for a node that is not lost (or does not exist)."""


def confirm_fenced(fqdn: str) -> str:
    """Record that node ``fqdn`` was powered off by hand: ``ha_state`` ``fenced`` from
    ``suspect``, ``fencing`` or ``fence_failed``, and the node's ``confirm_fenced`` event
    naming who. Its state before (``fenced``: it was already, nothing changed)."""
    stmt = select(Node).where(Node.fqdn == fqdn).with_for_update()
    node = db.session.scalars(stmt).first()
    if node is None:
        db.session.rollback()
        raise FenceRefused(f"no node {fqdn}")
    before = node.ha_state
    if before == FENCED:
        db.session.rollback()
        return before
    if before not in CONFIRMABLE:
        db.session.rollback()
        raise FenceRefused(
            f"{fqdn} is {before}, not lost: ha watch reaches it, so it is neither fenced nor "
            "are its VMs restarted elsewhere. Confirm only a node ha watch lost (suspect, "
            "fencing or fence_failed) once it is powered off."
        )
    now = datetime.now(UTC)
    audit.record(db.session, "node", node.id, "confirm_fenced", {"ha_state": before},
                 {"ha_state": FENCED, "ha_since": now.isoformat()})  # fmt: skip
    db.session.execute(update(Node).where(Node.id == node.id).values(ha_state=FENCED, ha_since=now))
    db.session.commit()
    log.warning("node %s confirmed fenced by hand by %s (it was %s)", fqdn, audit.who()[0], before)
    return before
