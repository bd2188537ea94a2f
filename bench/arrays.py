"""Issue 17, arrays: POST /vm with an array of 100 VMs spread over 10 nodes, against the
same 100 VMs posted one by one from one client, and against the array with its nodes
called one after another (``ARRAY_NODE_THREADS=1``). Target: the array ≥ 3 x faster
than one by one.

vmapi is served by gunicorn (one sync worker per setting: one client sends one request
at a time). The cases are taken in turns, round after round, and each round's VMs are
deleted (not timed) before the next. The 10 nodes are libvirtd's test driver in two
layouts: each node on its own URI (``test+unix:///<dir>/host<i>.xml``: a private
test hypervisor per connection, so the nodes share nothing but libvirtd), and every node
on ``test+unix:///default`` (one connection per worker, which the node threads share).
Then, when libvirtd's QEMU driver answers, 10 node rows on ``qemu:///system`` (one real
host) with disk-less KVM (or TCG) domains: fewer VMs, since each is a QEMU process.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from bench.common import (
    INSTALLATION,
    SHARED_URI,
    TEST_DRIVER_DIR,
    admin_token,
    database,
    host_file,
    median,
    populate,
    remove_domains,
)
from bench.placement import verdict
from tests.concurrency.conftest import gunicorn

NODES = 10
VMS = 100
ROUNDS = 2
QEMU_URI = "qemu:///system"
QEMU_VMS = 10
QEMU_ROUNDS = 1


def call(base: str, token: str, method: str, body: object) -> dict:
    request = urllib.request.Request(
        f"{base}/api/v1/vm", data=json.dumps(body).encode(), method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def one_by_one(base: str, token: str, body: dict, count: int) -> list[int]:
    return [call(base, token, "POST", body)["data"]["id"] for _ in range(count)]


def as_array(base: str, token: str, body: dict, count: int) -> list[int]:
    return [int(ident) for ident in call(base, token, "POST", [body] * count)["data"]]


def delete(base: str, token: str, ids: list[int]) -> None:
    for start in range(0, len(ids), 100):
        call(base, token, "DELETE", [{"id": ident} for ident in ids[start : start + 100]])


def set_nodes(url: str, uris: list[str], method: int, interface_mode: str | None) -> None:
    """Node i on ``uris[i]`` with ``interface_mode``, offering virt method ``method``."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    with engine.begin() as conn:
        ids = list(conn.execute(sa.text("SELECT id FROM node ORDER BY id")).scalars())
        for ident, uri in zip(ids, uris, strict=True):
            conn.execute(sa.text("UPDATE node SET libvirt_uri = :u, interface_mode = :m,"
                                 " libvirt_failed_at = NULL WHERE id = :i"),
                         {"u": uri, "m": interface_mode, "i": ident})  # fmt: skip
        conn.execute(sa.text("INSERT INTO virt_node (node_id, virt_method_id) SELECT id, :m"
                             " FROM node ON CONFLICT DO NOTHING"), {"m": method})  # fmt: skip
    engine.dispose()


def measure(
    url: str, token: str, body: dict, count: int, rounds: int, extra: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Seconds per case and round: one by one, array with 1 node thread, array."""
    env = {**(extra or {}), "VMAPI_DATABASE_URL": url, "VMAPI_INSTALLATION_ID": INSTALLATION,
           "VMAPI_LOG_LEVEL": "WARNING", "VMAPI_LOG_REQUESTS": "false",
           "VMAPI_LOG_HYPERVISOR": "false", "VMAPI_LIBVIRT_TIMEOUT": "120",
           "VMAPI_TEST_DRIVER_DIR": TEST_DRIVER_DIR}  # fmt: skip
    times: dict[str, list[float]] = {"one by one": [], "array, 1 node thread": [], "array": []}
    with (
        gunicorn("wsgi:app", env, 1) as (concurrent, _),
        gunicorn("wsgi:app", {**env, "VMAPI_ARRAY_NODE_THREADS": "1"}, 1) as (serial, _),
    ):
        # warm-up: each worker opens its connections to every node
        for base in (concurrent, serial):
            delete(base, token, as_array(base, token, body, NODES))
        cases: dict[str, tuple[str, Callable[[str, str, dict, int], list[int]]]] = {
            "one by one": (concurrent, one_by_one),
            "array, 1 node thread": (serial, as_array),
            "array": (concurrent, as_array),
        }
        for _ in range(rounds):
            for label, (base, send) in cases.items():
                started = time.perf_counter()
                ids = send(base, token, body, count)
                times[label].append(time.perf_counter() - started)
                assert len(ids) == count
                delete(base, token, ids)
    return times


def table(title: str, note: str, times: dict[str, list[float]], count: int) -> list[str]:
    base = median(times["one by one"])
    lines = [title, "", note, "",
             "| case | median s | VMs/s | vs one by one |", "|---|---:|---:|---:|"]  # fmt: skip
    for label, values in times.items():
        lines.append(f"| {label} | {median(values):.2f} | {count / median(values):.0f} |"
                     f" {base / median(values):.1f} x |")  # fmt: skip
    speedup = base / median(times["array"])
    lines += ["", f"Target array ≥ 3 x faster than one by one: {speedup:.1f} x — "
                  f"{verdict(speedup >= 3)}.", ""]  # fmt: skip
    return lines


def shown(title: str, note: str, times: dict[str, list[float]], count: int) -> list[str]:
    """The table, printed at once too (the next layout may take minutes)."""
    lines = table(title, note, times, count)
    print("\n".join(lines), flush=True)
    return lines


def qemu_answers() -> bool:
    import libvirt

    try:
        libvirt.open(QEMU_URI).close()
    except libvirt.libvirtError:
        return False
    return True


def run() -> list[str]:
    from bench.hypervisor import kvm_works

    lines = ["#### Arrays: POST /vm of 100 VMs over 10 nodes vs one by one (issue 17)", ""]
    remove_domains(SHARED_URI, INSTALLATION)
    test_body_ram = 256 * 1024**2
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        fleet = populate(url, NODES, 0, SHARED_URI, addresses=60_000, cores=1_000_000,
                         ram=1024**5)  # fmt: skip
        token = admin_token(url)
        body = {"cores": 1, "ram": test_body_ram, "virt_method": {"id": fleet.method}}
        files = []
        for i in range(NODES):
            path = Path(tmp) / f"node{i}"
            path.mkdir()
            files.append(f"test+unix://{host_file(path, cores=100_000)}")
        layouts = {
            "own URI per node (test+unix:///<dir>/host<i>.xml)": files,
            "every node on test+unix:///default": [SHARED_URI] * NODES,
        }
        for layout, uris in layouts.items():
            set_nodes(url, uris, fleet.method, None)
            try:
                times = measure(url, token, body, VMS, ROUNDS)
            finally:
                remove_domains(SHARED_URI, INSTALLATION)
            lines += shown(
                f"##### libvirtd test driver, {layout}",
                f"{VMS} VMs of 1 vCPU / 256 MiB spread by the scheduler over {NODES} nodes; "
                f"gunicorn, 1 sync worker per setting; {ROUNDS} rounds taken in turns.",
                times, VMS,
            )  # fmt: skip
        if not qemu_answers():
            return [*lines, f"Real QEMU not run: {QEMU_URI} does not answer.", ""]
        kind = "kvm" if kvm_works() else "qemu"
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        with engine.connect() as conn:
            method = conn.execute(sa.text("SELECT id FROM virt_method WHERE domain_type = :k"),
                                  {"k": kind}).scalar_one()  # fmt: skip
        engine.dispose()
        set_nodes(url, [QEMU_URI] * NODES, method, "user")
        body = {"cores": 1, "ram": test_body_ram, "virt_method": {"id": method}}
        try:  # a QEMU start takes a while: gunicorn must not kill the one-thread array
            times = measure(url, token, body, QEMU_VMS, QEMU_ROUNDS, {"GUNICORN_TIMEOUT": "900"})
        except Exception as exc:
            return [*lines, f"Real {kind.upper()} failed: {exc!r}", ""]
        finally:
            remove_domains(QEMU_URI, INSTALLATION)
        lines += shown(
            f"##### Real {kind.upper()}: {NODES} node rows on {QEMU_URI} (one host)",
            f"{QEMU_VMS} disk-less domains of 1 vCPU / 256 MiB (user-mode NIC) over {NODES} "
            f"node rows sharing one libvirtd and one connection per worker; {QEMU_ROUNDS} "
            "rounds taken in turns.",
            times, QEMU_VMS,
        )  # fmt: skip
    return lines
