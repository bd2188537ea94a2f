"""All or nothing: the one way a write of several steps (or an array of writes) is undone.

Every step that changed something pushes its inverse on an undo stack (:class:`Undo`),
under a name that says what it undoes; :func:`run_undo` plays the stack backwards after a
failure. An inverse that fails is logged by its name, and when it was to remove
something from a node (``leftover``) that thing is listed in the ledger of leftovers
with the step's name (:func:`vmapi.services.leftovers.note_failed_undo`):
``flask vmapi reconcile`` shows it, and ``--fix`` removes it once the node answers.
:func:`all_or_nothing` is the loop every batch use case shares: check every item first
(nothing changed yet), then apply them in order under one stack, so a failure at any
element undoes the elements before it, and the error names the failing element
(``data.index``) of an array request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from vmapi.errors import OutcomeUnknown, at_index
from vmapi.extensions import db
from vmapi.services import idempotency
from vmapi.services.leftovers import Left, note_failed_undo

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")


@dataclass(frozen=True)
class UndoStep:
    """The inverse of one step: what it does (``name``, for the log and reconcile), how,
    and what it removes from a node, if anything (listed as a leftover if it fails)."""

    name: str
    run: Callable[[], None]
    #: (or what says it when the step fails: a thing made before its node was known)
    leftover: Left | Callable[[], Left | None] | None = None


class Undo:
    """A stack of named inverses, run newest first by :func:`run_undo`."""

    def __init__(self) -> None:
        self.steps: list[UndoStep] = []

    def push(
        self,
        name: str,
        run: Callable[[], None],
        leftover: Left | Callable[[], Left | None] | None = None,
    ) -> None:
        """Put the inverse of what was just done on the stack; ``name`` says what it
        undoes ("removing domain X on node Y"); ``leftover``: what stays on a node if it
        fails."""
        self.steps.append(UndoStep(name, run, leftover))

    def __len__(self) -> int:
        return len(self.steps)


def run_undo(undo: Undo) -> None:
    """Run the inverses of what was done, newest first; keep going past failures, each
    logged by its step's name (and listed as a leftover when it leaves one)."""
    db.session.rollback()  # the failure may have left the transaction unusable
    while undo.steps:
        step = undo.steps.pop()
        try:
            step.run()
        except Exception as exc:  # an undo that fails must not hide the original error
            db.session.rollback()
            log.exception("undo step failed: %s; reconcile will find what is left", step.name)
            if isinstance(exc, DBAPIError):  # (a row it was to forget may be left)
                idempotency.keep()
            left = step.leftover() if callable(step.leftover) else step.leftover
            if left is not None:
                note_failed_undo(left, step.name, exc)


def keep_for_reconcile(undo: Undo) -> None:
    """A commit whose outcome is unknown (:class:`~vmapi.errors.OutcomeUnknown`): what
    was done may belong to committed rows, so nothing is undone; a row that did not
    commit stays ``building`` from its first commit: a retry with the request's
    Idempotency-Key removes it with its domain (:mod:`vmapi.services.vms.abandoned`), as
    ``flask vmapi reconcile --fix`` does after BUILD_TIMEOUT. Each step is logged."""
    db.session.rollback()
    for step in reversed(undo.steps):
        log.warning("commit outcome unknown: not %s; left for reconcile", step.name)
    undo.steps.clear()


@contextmanager
def undone_on_failure(undo: Undo) -> Iterator[None]:
    """The block's failure undoes ``undo`` (:func:`run_undo`) and is raised, except a
    commit of unknown outcome, whose steps are kept for reconcile
    (:func:`keep_for_reconcile`)."""
    try:
        yield
    except OutcomeUnknown:
        keep_for_reconcile(undo)
        raise
    except BaseException:
        run_undo(undo)
        raise


def all_or_nothing(
    items: Iterable[T],
    indexed: bool,
    check: Callable[[T], C],
    apply: Callable[[C, Undo], R],
    finish: Callable[[list[R]], None] | None = None,
) -> list[R]:
    """``check`` every item, then ``apply`` each checked item with the shared undo stack;
    the results in order. Any failure undoes what the earlier items did and re-raises,
    with ``data.index`` when ``indexed`` (an array request). ``finish``, if given, runs
    once every item is applied, under the same stack (e.g. the commit naming them all)."""
    return apply_all(check_all(items, indexed, check), indexed, apply, finish)


def check_all(items: Iterable[T], indexed: bool, check: Callable[[T], C]) -> list[C]:
    """``check`` every item (nothing is changed yet); an error names its element."""
    checked: list[C] = []
    for index, item in enumerate(items):
        with at_index(index if indexed else None):
            checked.append(check(item))
    return checked


def apply_all(
    checked: list[C],
    indexed: bool,
    apply: Callable[[C, Undo], R],
    finish: Callable[[list[R]], None] | None = None,
) -> list[R]:
    """``apply`` each checked item in order under one undo stack, then ``finish`` (see
    all_or_nothing)."""
    undo = Undo()
    done: list[R] = []
    with undone_on_failure(undo):
        for index, item in enumerate(checked):
            with at_index(index if indexed else None):
                done.append(apply(item, undo))
        if finish is not None:
            finish(done)
    return done
