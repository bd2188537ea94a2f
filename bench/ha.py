"""A dead host's HA VM running elsewhere (issue 26): the seconds from a host's death to its
HA guest running on the other host, with the default ``HA_INTERVAL`` (5 s) and
``HA_MISSES`` (3), and their parts: detection (the death to the node ``fencing``),
fencing (to ``fenced``), restart (to the guest's domain running on the other host).

As tests/hypervisor/test_ha.py does it: two private libvirtd hosts on this machine
(tests/hypervisor/two_hosts.py), the test guest (TCG) booted through the API on a with
``ha: true`` and ``ha_local_disks: rebuild``, node a fenced by the test agent
(tests/fence_agent.py: its ``off`` kills a's remaining processes); a's libvirtd is
killed (SIGKILL) while ``ha watch`` runs (a ``flask vmapi ha watch`` process, as deployed).
The states are polled every 50 ms.

The API's answer time for other requests during the recovery: the API served by gunicorn
(deploy/gunicorn.conf.py, 2 workers) over the same database, one client asking in turn
``GET /vm`` (the list), ``GET /vm/<id>`` (the HA VM) and ``GET /node``, back to back, for
as long before the death (nothing failing: the baseline) as from the death until the
guest runs on b (the recovery); and, of the recovery, the part from ``fencing`` on (the
agent and the restart: the watcher's work, where it writes and calls libvirt).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import SERVER, median, p95
from bench.placement import verdict

TARGET = 60.0  # seconds (issue 26); Proxmox documents about 120 s
BASELINE = 10.0  # seconds of answers before the death (about as long as the recovery)
WORKERS = 2  # gunicorn's for the API (the machine has 2 cores)


class Asking:
    """One client asking the API ``paths`` in turn, back to back, in a thread: each
    answer's (time.monotonic() at its end, path, seconds)."""

    def __init__(self, url: str, token: str, paths: list[str]) -> None:
        self.url, self.token, self.paths = url, token, paths
        self.answers: list[tuple[float, str, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.paths:
                request = urllib.request.Request(f"{self.url}/api/v1/{path}")
                request.add_header("Authorization", f"Bearer {self.token}")
                began = time.monotonic()
                with urllib.request.urlopen(request, timeout=60) as answer:
                    answer.read()
                    assert answer.status == 200, answer.status
                end = time.monotonic()
                self.answers.append((end, path.split("?")[0], end - began))

    def __enter__(self) -> Asking:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)

    def between(self, start: float, end: float) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for at, path, seconds in self.answers:
            if start <= at <= end:
                found.setdefault(path, []).append(seconds)
        return found


def answer_rows(windows: dict[str, dict[str, list[float]]]) -> list[str]:
    """A row per request and window: answers, median, p95, max (ms)."""
    rows = ["| request | while | answers | median | p95 | max |", "|---|---|---:|---:|---:|---:|"]
    for path in sorted({p for found in windows.values() for p in found}):
        for window, found in windows.items():
            values = found.get(path, [])
            if len(values) < 2:
                rows.append(f"| `GET /{path}` | {window} | {len(values)} | | | |")
                continue
            ms = [v * 1000 for v in values]
            rows.append(f"| `GET /{path}` | {window} | {len(ms)} | {median(ms):.1f} ms | "
                        f"{p95(ms):.1f} ms | {max(ms):.1f} ms |")  # fmt: skip
    return rows


def wait_active(watcher) -> None:
    deadline = time.monotonic() + 60
    while "active:" not in watcher.text():
        assert time.monotonic() < deadline, watcher.text()
        time.sleep(0.05)


def run() -> list[str]:
    from tests.concurrency.conftest import gunicorn
    from tests.fence_agent import install
    from tests.guest.build import GuestUnavailable, ensure_guest_image
    from tests.hypervisor.migrate_env import migrate_env, wait_for_ticks
    from tests.hypervisor.test_ha import restore
    from tests.hypervisor.test_ha_kill import watching
    from tests.hypervisor.two_hosts import HostUnavailable, check_machine, two_hosts

    title = "#### A dead host's HA VM running on another host (`ha watch`, default settings)"
    try:
        check_machine()
        image = ensure_guest_image()
    except (HostUnavailable, GuestUnavailable) as exc:
        return [title, "", f"Not run: {exc}", ""]
    with two_hosts() as hosts, tempfile.TemporaryDirectory() as tmp:
        agents = install(Path(tmp) / "agents")
        store = Path(tmp) / "images"
        store.mkdir()
        with migrate_env(SERVER, hosts, image.path, store) as env:
            env.app.config.update(HA_FENCE_AGENT_DIRS=str(agents), LIBVIRT_TIMEOUT=5.0)
            a = env.host("a")
            fence = {"fence_agent": "fence_test", "fence_address": "a", "fence_user": "admin"}
            assert env.api.update(f"node/{env.nodes['a']['id']}", json=fence).status_code == 200
            vm = env.create("a", ha=True, ha_local_disks="rebuild")
            wait_for_ticks(env.console(vm["id"]), 2)
            (agents / "pids-a").write_text(" ".join(map(str, a.daemon_pids() + a.qemu_pids())))
            libvirtd = int(a.pid_files["libvirtd"].read_text().split()[0])
            interval, misses = env.app.config["HA_INTERVAL"], env.app.config["HA_MISSES"]
            seen: dict[str, float] = {}
            served = {
                f"VMAPI_{key}": str(env.app.config[key])
                for key in ("DATABASE_URL", "INSTALLATION_ID", "IMAGE_DIR", "LIBVIRT_TIMEOUT")
            }
            paths = ["vm?limit=100", f"vm/{vm['id']}", "node"]
            try:
                with (
                    gunicorn("wsgi:app", served, WORKERS) as (url, _master),
                    watching(env.app, Path(tmp) / "watch.log") as watcher,
                    Asking(url, env.api.token, paths) as asking,
                ):
                    wait_active(watcher)
                    time.sleep(interval)  # its first round is done
                    baseline = time.monotonic()
                    time.sleep(BASELINE)
                    died = time.monotonic()
                    os.kill(libvirtd, signal.SIGKILL)
                    while "running" not in seen and time.monotonic() - died < 300:
                        state = env.sql("SELECT ha_state FROM node WHERE id = :id",
                                        id=env.nodes["a"]["id"])[0][0]  # fmt: skip
                        seen.setdefault(state, time.monotonic() - died)
                        if env.domains("b").get(vm["domain_name"]) == "running":
                            seen["running"] = time.monotonic() - died
                        time.sleep(0.05)
                    recovered = time.monotonic()
            finally:
                (agents / "pids-a").write_text("")
                restore(a)
    if "running" not in seen:
        return [title, "", f"Not running on b within 300 s: {seen}", ""]
    fencing = seen.get("fencing", seen.get("fenced", seen["running"]))
    fenced = seen.get("fenced", seen["running"])
    total = seen["running"]
    windows = {
        "nothing failing (baseline)": asking.between(baseline, died),
        "the recovery (death → running)": asking.between(died, recovered),
        "its fencing and restart (fencing → running)": asking.between(died + fencing, recovered),
    }
    return [
        title,
        "",
        f"The test guest (256 MiB, TCG) on host a of two private libvirtd hosts, `ha: true`;"
        f" a's libvirtd killed while `ha watch` (a process) runs (HA_INTERVAL {interval:g} s,"
        f" HA_MISSES {misses}); the test fence agent kills a's QEMU. One run.",
        "",
        "| detection (death → fencing) | fencing (→ fenced) | restart (→ running on b) |"
        " death → running |",
        "|---:|---:|---:|---:|",
        f"| {fencing:.1f} s | {fenced - fencing:.1f} s | {total - fenced:.1f} s | {total:.1f} s |",
        "",
        f"Target ≤ {TARGET:g} s: {total:.1f} s — {verdict(total <= TARGET)}.",
        "",
        f"The API's answers to other requests meanwhile (gunicorn, {WORKERS} workers; one "
        f"client asking in turn, back to back; baseline: the {BASELINE:g} s before the "
        "death):",
        "",
        *answer_rows(windows),
        "",
    ]
