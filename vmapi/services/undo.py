"""All or nothing: the one way a write of several steps (or an array of writes) is undone.

Every step that changed something pushes its inverse on an undo stack (:data:`Undo`);
:func:`run_undo` plays the stack backwards after a failure. :func:`all_or_nothing` is the
loop every batch use case shares: check every item first (nothing changed yet), then apply
them in order under one stack, so a failure at any element undoes the elements before it,
and the error names the failing element (``data.index``) of an array request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from vmapi.errors import at_index
from vmapi.extensions import db

log = logging.getLogger(__name__)

Undo = list[Callable[[], None]]
T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")


def run_undo(undo: Undo) -> None:
    """Run the inverses of what was done, newest first; keep going past failures."""
    db.session.rollback()  # the failure may have left the transaction unusable
    while undo:
        step = undo.pop()
        try:
            step()
        except Exception:  # an undo that fails must not hide the original error
            db.session.rollback()
            log.exception("undo step failed; reconcile will find what is left")


def all_or_nothing(
    items: Iterable[T],
    indexed: bool,
    check: Callable[[T], C],
    apply: Callable[[C, Undo], R],
) -> list[R]:
    """``check`` every item, then ``apply`` each checked item with the shared undo stack;
    the results in order. Any failure undoes what the earlier items did and re-raises,
    with ``data.index`` when ``indexed`` (an array request)."""
    return apply_all(check_all(items, indexed, check), indexed, apply)


def check_all(items: Iterable[T], indexed: bool, check: Callable[[T], C]) -> list[C]:
    """``check`` every item (nothing is changed yet); an error names its element."""
    checked: list[C] = []
    for index, item in enumerate(items):
        with at_index(index if indexed else None):
            checked.append(check(item))
    return checked


def apply_all(checked: list[C], indexed: bool, apply: Callable[[C, Undo], R]) -> list[R]:
    """``apply`` each checked item in order under one undo stack (see all_or_nothing)."""
    undo: Undo = []
    done: list[R] = []
    for index, item in enumerate(checked):
        try:
            with at_index(index if indexed else None):
                done.append(apply(item, undo))
        except BaseException:
            run_undo(undo)
            raise
    return done
