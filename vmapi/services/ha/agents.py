"""Fence agents: which are installed, a node's password, one call of an agent.

vmapi speaks the command-line protocol of ClusterLabs' fence-agents (Debian's
``fence-agents`` package: ``fence_ipmilan``, ``fence_redfish``, ...). An agent started
without arguments reads its options from stdin, one ``name=value`` per line (``ip``,
``username``, ``password``, ``action``), the way Pacemaker's fencer runs it; nothing is
ever on its command line, so the password never shows in ``/proc/<pid>/cmdline`` or
``ps``. ``action=off`` exits 0 once the agent has seen the power go off (or found it
off); ``action=status`` exits 0 for on, 2 for off, anything else for "cannot tell".

An agent is run from an argument list (never a shell) in a process group of its own,
bounded by ``HA_FENCE_TIMEOUT``: past it the whole group (the agent and the tools it
started, ``ipmitool``, ``curl``...) is killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass

#: A fence agent's name as fence-agents spell them (the file the node names).
AGENT_PATTERN = r"^fence_[A-Za-z0-9_]+$"
_AGENT = re.compile(AGENT_PATTERN)
#: What the agent said, at most, in an outcome's detail (its last lines).
SAID_LENGTH = 500
#: Seconds to collect what a killed agent's group wrote before giving up on its pipes.
AFTER_KILL = 5.0
#: ``action=status``'s exit codes in fence-agents (fencing.py: ``result = 2`` for off).
STATUS_ON, STATUS_OFF = 0, 2


class AgentFailure(Exception):
    """An agent that cannot be run as asked: not installed, a password file that cannot
    be read. The message is for the log and the audit trail (never holds the password)."""


def agent_dirs(setting: str) -> list[str]:
    """``HA_FENCE_AGENT_DIRS``: colon-separated folders, empty parts left out."""
    return [part for part in setting.split(":") if part]


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def installed_agents(dirs: list[str]) -> list[str]:
    """The names of the executable ``fence_*`` files in ``dirs``, sorted, each once."""
    found: set[str] = set()
    for folder in dirs:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found.update(n for n in names if _AGENT.match(n) and _executable(os.path.join(folder, n)))
    return sorted(found)


def find_agent(name: str, dirs: list[str]) -> str | None:
    """The path of agent ``name`` in the first of ``dirs`` that has it, executable."""
    if not _AGENT.match(name):
        return None
    for folder in dirs:
        path = os.path.join(folder, name)
        if _executable(path):
            return path
    return None


def agent_problem(name: str, dirs: list[str]) -> str | None:
    """Why ``name`` cannot be a node's fence agent (None: it can), naming what is
    installed."""
    if find_agent(name, dirs) is not None:
        return None
    there = installed_agents(dirs)
    where = ":".join(dirs) or "(no folder)"
    if not there:
        return (
            f"No fence agent {name} in {where}, and none is installed there (Debian's "
            "fence-agents package installs them; VMAPI_HA_FENCE_AGENT_DIRS says where)."
        )
    return f"No fence agent {name} in {where}; installed: {', '.join(there)}."


def read_password(directory: str | None, fqdn: str) -> str | None:
    """The fence password of node ``fqdn``: ``<directory>/<fqdn>``, its one line without
    the line end. None when no directory is configured, it does not exist, or it holds no
    file for the node (the agent runs without a password). A file that is there but
    cannot be read, or holds more than one line, is an :class:`AgentFailure`."""
    if not directory or not os.path.isdir(directory):
        return None
    if "/" in fqdn or fqdn in ("", ".", ".."):
        raise AgentFailure(f"{fqdn!r} cannot name a password file")
    path = os.path.join(directory, fqdn)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(65536)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise AgentFailure(f"the fence password file {path} cannot be read: {reason}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if any(c in password for c in "\r\n\x00"):
        raise AgentFailure(f"the fence password file {path} must hold one line")
    return password


def stdin_value(value: str) -> str:
    """``value`` as fence-agents read it back from a ``name=value`` line: they strip the
    line's blanks and one pair of double quotes around the value, so a value that would
    lose either is quoted."""
    if value != value.strip() or (len(value) >= 2 and value[0] == value[-1] == '"'):
        return f'"{value}"'
    return value


@dataclass(frozen=True)
class Call:
    """One run of an agent: its exit code (None: killed at the bound) and what it said."""

    code: int | None
    said: str


def run_agent(path: str, options: dict[str, str], timeout: float, secret: str | None) -> Call:
    """Run the agent at ``path`` with ``options`` on stdin (no argument at all), within
    ``timeout`` seconds; past it its whole process group is killed. What it said (stdout
    and stderr) comes back with ``secret`` blanked out, its last lines only."""
    lines = "".join(f"{name}={stdin_value(value)}\n" for name, value in options.items())
    try:
        agent = subprocess.Popen(  # noqa: S603 - a checked path, no arguments, no shell
            [path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole
            close_fds=True,
            cwd="/",
        )
    except OSError as exc:
        raise AgentFailure(f"cannot run {path}: {exc.strerror}") from None
    try:
        out, _ = agent.communicate(lines.encode(), timeout=timeout)
        code: int | None = agent.returncode
    except subprocess.TimeoutExpired:
        _kill_group(agent.pid)
        try:
            out, _ = agent.communicate(timeout=AFTER_KILL)
        except subprocess.TimeoutExpired:  # something outside the group holds the pipe
            out = b""
            agent.kill()
            agent.wait()
        code = None
    return Call(code, _tail(out.decode(errors="replace"), secret))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _tail(text: str, secret: str | None) -> str:
    """The agent's last words, one line, the password (if it echoed it) blanked out."""
    if secret:
        text = text.replace(secret, "***")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines)[-SAID_LENGTH:]
