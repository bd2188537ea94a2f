"""A fence agent for tests, speaking fence-agents' stdin protocol (no arguments; one
``name=value`` per line: ``ip``, ``username``, ``password``, ``action``).

Installed under ``fence_test*`` names by :func:`install` (the way fence-agents install
one program under several names), it behaves by the name it was run as:

- ``fence_test``: ``off`` powers the "host" off (``power-<ip>`` in the agent's folder
  says ``off``; and every pid listed in ``pids-<ip>`` there is killed, for tests whose
  host is real processes); ``status`` exits 0 (on) or 2 (off), as fence-agents do;
- ``fence_test_fail``: every action fails as a dead power controller does (exit 1);
- ``fence_test_leak``: fails too, quoting the password it was given;
- ``fence_test_on``: ``off`` says it succeeded, but the host stays on;
- ``fence_test_hang``: starts a child and hangs (both hold its output open);
- ``fence_test_lie``: ``off`` says it succeeded and ``status`` then says off, but the
  host stays on (nothing is killed): a power controller that lies;
- ``fence_test_wait``: ``fence_test``, but its ``off`` first waits (at most 10 minutes)
  until a file ``go-<ip>`` is in the agent's folder: the test decides when it returns.

Each call is appended as a JSON line to ``calls.jsonl`` in the agent's folder (or
``$FENCE_TEST_RECORD``): the name, the arguments, the options read from stdin, the pids.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

NAMES = ("fence_test", "fence_test_fail", "fence_test_leak", "fence_test_on", "fence_test_hang",
         "fence_test_lie", "fence_test_wait")  # fmt: skip


def install(folder: Path) -> Path:
    """Put the agent in ``folder`` under each of :data:`NAMES` (one file, symlinks), run
    by this Python; the folder (for HA_FENCE_AGENT_DIRS)."""
    folder.mkdir(parents=True, exist_ok=True)
    main = folder / NAMES[0]
    main.write_text(f"#!{sys.executable}\n" + Path(__file__).read_text())
    main.chmod(0o755)
    for name in NAMES[1:]:
        (folder / name).symlink_to(main.name)
    return folder


def calls(folder: Path) -> list[dict]:
    """The calls the agents in ``folder`` recorded, in order."""
    path = folder / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_options() -> dict[str, str]:
    """stdin as fence-agents' fencing.py reads it."""
    options = {}
    for raw in sys.stdin.read().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        options[name] = re.sub(r'^"(.*)"$', r"\1", value)
    return options


def run() -> int:
    name = os.path.basename(sys.argv[0])
    folder = Path(sys.argv[0]).parent
    options = read_options() if len(sys.argv) == 1 else {}
    record = {"agent": name, "argv": sys.argv[1:], "options": options, "pid": os.getpid()}
    action = options.get("action", "reboot")
    child = None
    if name == "fence_test_hang":
        child = subprocess.Popen(["sleep", "3600"])  # in the agent's group, holding stdout
        record["child"] = child.pid
    log = Path(os.environ.get("FENCE_TEST_RECORD") or folder / "calls.jsonl")
    with log.open("a") as file:
        file.write(json.dumps(record) + "\n")
    if len(sys.argv) > 1:
        print("this test agent takes its options on stdin only", file=sys.stderr)
        return 1
    if child is not None:
        time.sleep(3600)
    if name == "fence_test_fail":
        print("Failed: Unable to connect/login to fencing device", file=sys.stderr)
        return 1
    if name == "fence_test_leak":
        print(f"login failed for {options.get('username')}/{options.get('password')}")
        return 1
    power = folder / f"power-{options.get('ip', 'default')}"
    if action == "off" and name == "fence_test_wait":
        go, deadline = folder / f"go-{options.get('ip', 'default')}", time.monotonic() + 600
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    if action == "off":
        if name == "fence_test_lie":
            power.write_text("off")  # what its status will say; the host runs on
        elif name != "fence_test_on":
            power.write_text("off")
            pids = folder / f"pids-{options.get('ip', 'default')}"
            for pid in pids.read_text().split() if pids.exists() else ():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        print("Success: Powered OFF")
        return 0
    if action == "status":
        state = power.read_text() if power.exists() else "on"
        print(f"Status: {state.upper()}")
        return 2 if state == "off" else 0
    print(f"Failed: Unrecognised action '{action}'", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(run())
