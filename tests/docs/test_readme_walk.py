"""README.md's curl walk, read from the README itself and run against ``make run``'s
embedded default, served. Documentation that runs cannot rot.

The server is set up by the script ``make run`` runs (scripts/ensure-embedded-default.sh:
migrate, seed, local node, address ranges, admin token) on a fresh SQLite file and
served by a real gunicorn on a free loopback port, one worker with four threads as
``make run`` serves it. Each command of the walk then runs in bash exactly as the README
writes it, one at a time; only the placeholder token and the port 8000 of the walk's
``TOKEN=`` and ``API=`` lines are given this server's values. A command the README marks
``# needs a real hypervisor`` must answer what the README says it answers on the test
driver (502 ``vm/hypervisor_error``); every other one must succeed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.concurrency.conftest import ROOT, Server, gunicorn
from tests.conftest import unavailable

pytestmark = [pytest.mark.docs]

README = ROOT / "README.md"
SETUP = ROOT / "scripts" / "ensure-embedded-default.sh"
WALK_HEADING = "## A walk through the API with curl"
README_API = "API=http://127.0.0.1:8000/api/v1"
#: The README's mark for a command the test driver cannot do, and what it answers there.
NEEDS_HYPERVISOR = re.compile(r"#\s*needs a real hypervisor\b")
TEST_DRIVER_ANSWER = (502, "vm/hypervisor_error")

#: Runs before each command: the walk's curl confined to this server (it connects to
#: nothing but 127.0.0.1:@PORT@ whatever the URL, no proxy, no ~/.curlrc; and a URL
#: argument that is not under $API is refused outright), writing the HTTP status to
#: stderr where it cannot mix with what the command prints; pipefail, so that a failing
#: decoder at the end of a pipe fails the command.
CURL_GUARD = r"""
set -o pipefail
curl() {
  local arg
  for arg in "$@"; do
    case $arg in
      [A-Za-z]*://*) [[ $arg == "$API"* ]] || { echo "walk: refused $arg" >&2; return 97; } ;;
    esac
  done
  command curl -q --noproxy '*' --proto =http --connect-to ::127.0.0.1:@PORT@ \
    --max-time 120 --write-out '%{stderr}walk-status %{http_code}\n' "$@"
}
"""


def walk_block() -> str:
    text = README.read_text()
    assert WALK_HEADING in text, f"README.md has no section {WALK_HEADING!r}"
    section = text[text.index(WALK_HEADING) :]
    match = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert match, "the walk's section has no ```sh block"
    return match.group(1)


def split_commands(block: str) -> list[str]:
    """The block's shell commands; a command goes on while a quote is open or a line ends
    in a backslash (shlex then cannot split it). Comment lines between commands go."""
    commands: list[str] = []
    current: list[str] = []
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current.append(line)
        try:
            shlex.split("\n".join(current), comments=True)
        except ValueError:
            continue
        commands.append("\n".join(current))
        current = []
    assert not current, f"the walk ends inside a command: {current}"
    return commands


def prelude_for(commands: list[str], token: str, api: str) -> list[str]:
    """The walk's variable lines with this server's token and address."""
    prelude = []
    for command in commands:
        if command.startswith("TOKEN="):
            prelude.append(f"TOKEN={shlex.quote(token)}")
        elif command.startswith("API="):
            assert command == README_API, f"the walk must talk to 127.0.0.1: {command}"
            prelude.append(f"API={api}")
        else:
            prelude.append(command)
    return prelude


@dataclass
class Setup:
    server: Server
    outputs: list[str]  # what each run of the set-up script printed


@contextlib.contextmanager
def embedded_default(tmp_path: Path, runs: int = 1) -> Iterator[Setup]:
    """``make run`` on a fresh SQLite file: its set-up script ``runs`` times, then served."""
    for tool in ("bash", "curl"):
        if shutil.which(tool) is None:
            unavailable(f"the README's walk needs {tool}")
    db_url = f"sqlite:///{tmp_path / 'vmapi.sqlite3'}"
    env = {**os.environ, "VMAPI_DATABASE_URL": db_url,
           "FLASK": f"{sys.executable} -m flask --app wsgi"}  # fmt: skip
    outputs = []
    for _ in range(runs):
        done = subprocess.run([str(SETUP)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    token = outputs[-1].strip().splitlines()[-1]
    # A tripwire: vmapi reaches a node's libvirt over ssh by running `ssh`; this one only
    # records that it was asked, so nothing ever leaves the machine and the test sees it.
    tripwire = tmp_path / "bin" / "ssh"
    tripwire.parent.mkdir()
    tripwire.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "ssh-called"}\nexit 255\n')
    tripwire.chmod(0o755)
    served = {"VMAPI_DATABASE_URL": db_url, "GUNICORN_CMD_ARGS": "--threads 4",
              "PATH": f"{tripwire.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}  # fmt: skip
    with gunicorn("wsgi:app", served, workers=1) as (url, pid):
        yield Setup(Server(url, db_url, token, "vmapi", pid, served), outputs)
    called = tmp_path / "ssh-called"
    assert not called.exists(), f"vmapi tried to reach a host over ssh: {called.read_text()}"


def test_served_as_make_run_serves():
    """What :func:`embedded_default` copies from the Makefile's ``run`` recipe."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run:"))
    recipe = "\n".join(itertools.takewhile(lambda line: line.startswith("\t"), lines[start + 1 :]))
    assert f"scripts/{SETUP.name}" in recipe
    assert "gunicorn -c deploy/gunicorn.conf.py --workers 1 --threads 4 " in recipe


def test_make_run_is_ready_for_the_seed_example(tmp_path):
    """Twice, as a second ``make run`` does; then the seed's example gets addresses from
    the ranges the set-up announces and the README names."""
    with embedded_default(tmp_path, runs=2) as setup:
        first, second = setup.outputs
        announced = re.search(r"new VMs take their addresses from (\S+) and the pool (\S+)",
                              first)  # fmt: skip
        assert announced, first
        networks = [ipaddress.ip_network(n) for n in announced.groups()]
        assert all(f"`{n}`" in README.read_text() for n in networks)
        assert second.count("is registered already; nothing to do") == 2, second
        call = setup.server.call
        (qemu,) = call("GET", "virt_method?name=QEMU")[1]["data"]
        example = {"cores": 2, "ram": 1073741824, "virt_method": {"id": int(qemu)}}
        status, vm = call("POST", "vm", example)
        assert status == 201, vm
        nic = call("GET", f"interface/{vm['data']['interfaces'][0]['id']}")[1]["data"]
        for family, network in zip(("ipv4", "ipv6"), networks, strict=True):
            status, address = call("GET", f"{family}/{nic[family][0]['id']}")
            assert status == 200, address
            assert ipaddress.ip_address(address["data"]["address"]) in network, address


def test_the_readme_walk_runs(tmp_path):
    commands = split_commands(walk_block())
    curls = [c for c in commands if c.startswith("curl ")]
    block_curls = [line for line in walk_block().splitlines() if line.startswith("curl ")]
    assert curls and len(curls) == len(block_curls), "every curl line starts one command"
    for command in curls:  # the node example must not send vmapi to hv1's libvirt
        words = shlex.split(command, comments=True)
        if "POST" in words and "$API/node" in words:
            body = json.loads(words[words.index("-d") + 1])
            assert {"cores", "ram"} <= body.keys(), f"give cores and ram: {command}"
    failures = []
    # The walk's files (an image it makes, a copy it downloads) go to a folder of the
    # test's own; its MessagePack example runs the checkout's virtualenv, as a reader's would.
    workdir = tmp_path / "walk"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    with embedded_default(tmp_path) as setup:
        api = f"{setup.server.url}/api/v1"
        prelude = prelude_for([c for c in commands if not c.startswith("curl ")],
                              setup.server.token, api)  # fmt: skip
        for command in curls:
            problem = run(command, prelude, urlsplit(api).port, workdir)
            if problem:
                failures.append(f"{command}\n    -> {problem}")
    assert not failures, "README walk commands that did not answer as documented:\n" + (
        "\n".join(failures)
    )


def run(command: str, prelude: list[str], port: int, workdir: Path) -> str | None:
    """Run one command of the walk in ``workdir``; what is wrong with its answer, or None."""
    script = "\n".join([CURL_GUARD.replace("@PORT@", str(port)), *prelude, command])
    done = subprocess.run(["bash", "-c", script], cwd=workdir, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    statuses = [int(s) for s in re.findall(r"^walk-status (\d{3})$", done.stderr, re.M)]
    if len(statuses) != 1:
        return f"expected one HTTP answer, got {statuses}; exit {done.returncode}: {done.stderr}"
    (status,) = statuses
    try:
        body = json.loads(done.stdout)
    except ValueError:
        body = None  # HTML, headers (-i), a decoder's output: the status and exit code say
    if NEEDS_HYPERVISOR.search(command):
        expected = TEST_DRIVER_ANSWER
        got = (status, body.get("error_id") if isinstance(body, dict) else None)
        return None if got == expected else f"expected {expected} on the test driver: {got}"
    if done.returncode != 0 or not 200 <= status < 300:
        return f"HTTP {status}, exit {done.returncode}: {done.stdout[:500]} {done.stderr[:500]}"
    if isinstance(body, dict) and body.get("status") != "success":
        return f"not a success envelope: {done.stdout[:500]}"
    return None
