"""Keep a WSGI worker alive through a long transfer that is still making progress.

gunicorn's sync workers tell the master they are alive only between requests; a
request that takes longer than the worker timeout is killed. That is what vmapi wants
for ordinary requests (a hung one is cut off), but not for an image upload or download
that moves bytes for minutes. ``deploy/gunicorn.conf.py`` hands each worker's
``notify`` (gunicorn's documented heartbeat for workers) to :func:`install` after the
fork, and the transfer loops call :func:`beat` for every chunk they move. A transfer
then lives as long as bytes keep flowing; one that stalls for the worker timeout is
still killed. Outside gunicorn (tests, ``flask run``) nothing is installed and
:func:`beat` does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: at most one heartbeat per this many seconds (a notify touches a file)
INTERVAL = 1.0

_notify: Callable[[], None] | None = None
_last = 0.0


def install(notify: Callable[[], None] | None) -> None:
    """Use ``notify`` (a worker's heartbeat) from now on in this process; None: none."""
    global _notify, _last
    _notify = notify
    _last = 0.0


def beat() -> None:
    """Progress was made: tell the server this worker is alive (rate-limited)."""
    global _last
    if _notify is None:
        return
    now = time.monotonic()
    if now - _last >= INTERVAL:
        _last = now
        _notify()
