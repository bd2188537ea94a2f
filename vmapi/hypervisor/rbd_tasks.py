"""Work the Ceph cluster does on its own: a clone flattened by the manager's ``rbd_support``
module (``ceph rbd task add flatten POOL/IMAGE``), so that no byte of the image passes
through the API host (``rbd flatten`` would copy every object through the ``rbd``
process that runs it).

The module is one of the manager's always-on modules (Nautilus and later); the mgr runs
its tasks one after another in its own librbd, and keeps each task in the pool's
``rbd_task`` object until it is done. The API host queues the task, then asks after it
(``ceph rbd task list ID``) until the manager has dropped it, bounded in time: a task
still there at the bound, or one the manager failed on (it would retry it every 30 s
and more), is cancelled (``ceph rbd task cancel ID``) and waited for, so that the
caller's clean-up finds the image closed. Whether the flatten happened is then told by
the image itself (no parent left), never by the task's absence alone.

The cephx user needs the manager's ``profile rbd`` on the pool besides the monitors'
and OSDs' (``mgr 'profile rbd pool=<pool>'``); without it the manager refuses the task
and the error says which capability is missing. Like the ``rbd`` tool, the ``ceph`` tool
is given the monitors and the key file and no configuration file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmapi.hypervisor.rbd import RbdError, RbdNotFound, _checked, _deadline, _monitor

if TYPE_CHECKING:
    from vmapi.hypervisor.rbd import RbdClient

#: how often a task is asked after while it runs: at first, then twice as long each time
#: up to POLL_MAX (a flatten of a large disk takes minutes; each question is a process)
POLL = 0.25
POLL_MAX = 2.0
#: what in the ceph tool's answer says the user lacks the manager's capability
_REFUSED = ("EACCES", "Permission denied", "not authorized", "access denied")


def ceph_args(client: RbdClient, args: tuple[str, ...], bound: float) -> list[str]:
    """The ``ceph`` tool's command line as the client's user (as ``rbd``'s: no
    configuration file, the monitors as msgr v1, the key from its file)."""
    a = client.access
    monitors = ",".join(_monitor(host, port) for host, port in a.monitors)
    connect = str(max(1, int(bound * 0.8)))  # the tool's own "cannot reach" comes first
    return ["ceph", "-c", "/dev/null", "-m", monitors, "--id", a.user,
            "--keyfile", a.keyfile, "--connect-timeout", connect, *args]  # fmt: skip


def ceph(client: RbdClient, *args: str, bound: float) -> bytes:
    """Run ``ceph ARGS`` within ``bound`` seconds; its output (errors as ``rbd``'s are)."""
    what = "ceph " + " ".join(args)
    return client._run(ceph_args(client, args, bound), bound, what).stdout


def flatten_in_cluster(
    client: RbdClient, pool: str, name: str, timeout: float,
    beat: Callable[[], None] | None = None,
) -> str:  # fmt: skip
    """Have the manager flatten the clone ``pool/name`` and wait for it, within
    ``timeout`` seconds (``beat`` is called while waiting: the worker's heartbeat).
    Returns the task's id. ``RbdError`` when the manager refused or failed the task or
    the image still has a parent after it, ``RbdTimeout`` at the bound (the task
    cancelled), ``RbdNotFound`` when the image is gone."""
    spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
    left = _deadline(timeout, f"flattening {spec} in the cluster")
    try:
        task = json.loads(ceph(client, "rbd", "task", "add", "flatten", spec, bound=left()))
    except RbdError as exc:
        if any(word in str(exc) for word in _REFUSED):
            raise RbdError(f"{exc} — the cephx user {client.access.user} needs the manager's "
                           f"capability: mgr 'profile rbd pool={pool}'") from exc  # fmt: skip
        raise
    task_id = str(task["id"])
    pause = POLL
    try:
        while True:
            try:
                seen = json.loads(ceph(client, "rbd", "task", "list", task_id, bound=left()))
            except RbdNotFound:
                break  # the manager is done with it
            if seen.get("retry_message"):  # failed; it would be retried later
                raise RbdError(f"the manager's flatten of {spec} (task {task_id}) failed: "
                               f"{seen['retry_message']}")  # fmt: skip
            if beat is not None:
                beat()
            time.sleep(min(pause, left()))
            pause = min(pause * 2, POLL_MAX)
    except BaseException:
        cancel(client, task_id)
        raise
    made = client.info(pool, name)
    if made is None:
        raise RbdNotFound(f"flattening {spec} in the cluster: the image is gone")
    if made.parent is not None:
        raise RbdError(f"flattening {spec} in the cluster: task {task_id} ended and the image "
                       f"is still a clone of {made.parent}")  # fmt: skip
    return task_id


def cancel(client: RbdClient, task_id: str) -> None:
    """Cancel the task and wait (bounded by the client's timeout) until the manager has
    dropped it: a flatten in progress stops at its next step and closes the image. A
    failure here is left to the caller's clean-up (which then finds the image open)."""
    left = _deadline(client.access.timeout, f"cancelling task {task_id}")
    try:
        ceph(client, "rbd", "task", "cancel", task_id, bound=left())
        while True:
            ceph(client, "rbd", "task", "list", task_id, bound=left())
            time.sleep(min(POLL, left()))
    except RbdError:  # RbdNotFound: gone (the goal); others: nothing more to do here
        return
