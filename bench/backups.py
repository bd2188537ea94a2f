"""Backups on a real libvirtd (issue 24): ``flask vmapi backup run --all`` over 20 VMs, how
many VMs a minute it backs up, and what it costs the API meanwhile: GET /vm/<id> answered
by gunicorn while the run goes, against the same requests when nothing else runs (target:
at most 1.2 x).

The VMs are made through the API on ``qemu:///system`` from one image of random bytes
(``BENCH_BACKUP_MIB``, default 64), each root disk a qcow2 overlay on the node's copy,
then shut off (a shut-off VM's disk is copied as a volume; nothing boots from the bytes
anyway). The run is the shipped unit's command, at the unit's priority (``nice -n 10``,
``ionice -c 2 -n 7``), in a process of its own; the API is gunicorn with two workers on
the same database, asked by one client one request at a time. Idle times are taken
before and after the run. Everything the run made on the host goes at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.boot import remove_pool
from bench.common import INSTALLATION, MIB, ROOT, admin_token, database, median, p95, populate
from bench.filters import remove_ours
from bench.placement import verdict
from tests.concurrency.conftest import gunicorn
from tests.conftest import GIB, node_body
from vmapi.app import create_app
from vmapi.extensions import db

URI = "qemu:///system"
VMS = 20
IMAGE_SIZE = int(os.environ.get("BENCH_BACKUP_MIB", "64")) * MIB
IDLE_REQUESTS = 300  # before the run; as many again after it
POOL = f"{INSTALLATION}-backups"
LOG_POOL = f"{INSTALLATION}-backups-logs"
#: how the shipped vmapi-backup.service runs it (Nice=10, IOSchedulingPriority=7)
PRIORITY = ["nice", "-n", "10", "ionice", "-c", "2", "-n", "7"]


def settings(url: str, store: str) -> dict[str, str]:
    """The VMAPI_* settings the API, the run and the set-up share."""
    return {"VMAPI_DATABASE_URL": url, "VMAPI_IMAGE_DIR": store, "VMAPI_LOG_LEVEL": "WARNING",
            "VMAPI_LOG_REQUESTS": "false", "VMAPI_INSTALLATION_ID": INSTALLATION,
            "VMAPI_LIBVIRT_TIMEOUT": "120", "VMAPI_CONSOLE_LOG_POOL": LOG_POOL,
            "VMAPI_CONSOLE_LOG_DIR": f"/var/lib/libvirt/{LOG_POOL}"}  # fmt: skip


def make_vms(url: str, store: str, tmp: str) -> list[int]:
    """The image and the VMs, through the API in-process; the VMs' ids."""
    config = {key.removeprefix("VMAPI_"): value for key, value in settings(url, store).items()}
    app = create_app({**config, "LIBVIRT_TIMEOUT": 120.0, "SHUTDOWN_TIMEOUT": 0.5})
    client = app.test_client()
    headers = {"Authorization": f"Bearer {admin_token(url)}"}

    def call(method: str, path: str, extra: dict[str, str] | None = None, **kw: Any) -> Any:
        answer = client.open(f"/api/v1/{path}", method=method,
                             headers={**headers, **(extra or {})}, **kw)  # fmt: skip
        assert answer.status_code < 300, answer.json
        return answer.json["data"] if answer.is_json else None

    try:
        call("UPDATE", "storage_type/1", json={"pool": POOL})
        made = call("POST", "virt_node", json={
            "node": node_body(libvirt_uri=URI, interface_mode="user", cores=64, ram=64 * GIB),
            "virt_method": {"name": "QEMU"}})  # fmt: skip
        method = made["virt_method"]["id"]
        path = Path(tmp) / "image.raw"
        path.write_bytes(os.urandom(IMAGE_SIZE))
        image = call("POST", "image", json={"name": "bench", "format": "raw"})
        with open(path, "rb") as body:
            call("PUT", f"image/{image['id']}/file", {"Content-Type": "application/octet-stream"},
                 data=body)  # fmt: skip
        path.unlink()
        states = call("GET", "vm_state").values()
        shutoff = next(s["id"] for s in states if s["name"] == "shutoff")
        ids = []
        for n in range(VMS):
            vm = call("POST", "vm", json={"cores": 1, "ram": 128 * MIB, "backup_keep": 1,
                                          "virt_method": {"id": method}, "customer_id": n % 4,
                                          "image": {"id": image["id"]}})  # fmt: skip
            call("UPDATE", f"vm/{vm['id']}?force=true", json={"vm_state": {"id": shutoff}})
            ids.append(vm["id"])
        return ids
    finally:
        with app.app_context():
            db.engine.dispose()


def get_ms(base: str, token: str, vm_id: int) -> float:
    request = urllib.request.Request(f"{base}/api/v1/vm/{vm_id}",
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()
        assert answer.status == 200
    return (time.perf_counter() - started) * 1000


def run() -> list[str]:
    import libvirt

    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        return ["#### Backups", "", f"Not run: libvirtd does not answer: {exc}", ""]
    idle_ms: list[float] = []
    busy_ms: list[float] = []
    with database() as url, tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        store = str(Path(tmp) / "store")
        populate(url, 0, 0, URI, addresses=VMS + 10)
        try:
            ids = make_vms(url, store, tmp)
            token = admin_token(url)
            env = settings(url, store)
            with gunicorn("wsgi:app", env, workers=2) as (base, _master):
                for n in range(50):  # warm-up: both workers, their pools and caches
                    get_ms(base, token, ids[n % VMS])
                idle_ms += [get_ms(base, token, ids[n % VMS]) for n in range(IDLE_REQUESTS)]
                command = [*PRIORITY, sys.executable, "-m", "flask", "--app", "wsgi", "vmapi",
                           "backup", "run", "--all"]  # fmt: skip
                lines = Path(tmp) / "backup.out"
                with lines.open("w") as out:
                    started = time.monotonic()
                    backup = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env},
                                              stdout=out, stderr=subprocess.DEVNULL)  # fmt: skip
                    n = 0
                    while backup.poll() is None:
                        busy_ms.append(get_ms(base, token, ids[n % VMS]))
                        n += 1
                    seconds = time.monotonic() - started
                output = lines.read_text()
                idle_ms += [get_ms(base, token, ids[n % VMS]) for n in range(IDLE_REQUESTS)]
        finally:
            remove_ours(conn)
            for name in (POOL, LOG_POOL):
                remove_pool(conn, name)
            conn.close()
    if backup.returncode != 0 or f"{VMS} VM(s), {VMS} saved" not in output:
        raise RuntimeError(f"the backup run failed ({backup.returncode}):\n{output[-3000:]}")
    per_vm = [float(s) for s in re.findall(r"MiB, ([\d.]+) s\)", output)]
    rate = VMS / (seconds / 60)
    ratio = median(busy_ms) / median(idle_ms)
    return [
        "#### Backups: flask vmapi backup run --all, and the API meanwhile",
        "",
        f"{VMS} shut-off VMs on {URI}, each a root disk (qcow2 overlay) on one raw image of "
        f"{IMAGE_SIZE // MIB} MiB of random bytes; the run as the shipped unit runs it "
        f"(nice 10, best-effort I/O priority 7). GET /vm/<id> through gunicorn (2 sync "
        f"workers), one request at a time: {len(idle_ms)} while idle (before and after the "
        f"run), {len(busy_ms)} during it.",
        "",
        f"The run: {seconds:.1f} s, **{rate:.1f} VMs per minute**; per VM (save and "
        f"rotation) median {median(per_vm):.2f} s, max {max(per_vm):.2f} s.",
        "",
        "| GET /vm/<id> | median ms | p95 ms |",
        "|---|---:|---:|",
        f"| idle | {median(idle_ms):.2f} | {p95(idle_ms):.2f} |",
        f"| during the backup run | {median(busy_ms):.2f} | {p95(busy_ms):.2f} |",
        "",
        f"Target during ≤ 1.2 x idle (median): {ratio:.2f} x — {verdict(ratio <= 1.2)}"
        f" (p95: {p95(busy_ms) / p95(idle_ms):.2f} x).",
        "",
    ]
