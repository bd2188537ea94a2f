"""Saving a running VM's disk as an image (issue 24): ``POST /vm/<id>/image`` of the test
guest's 1 GiB root disk, half full, against the floor, the same libvirt calls made by
hand, alternating in the same run (target: at most 1.2 x the floor's median); and the
guest's longest pause while it is saved (target: at most 100 ms).

The guest is the test guest (tests/guest/) booted through the API on ``qemu:///system``
(TCG) from a raw image of 512 MiB: the guest's own image followed by random bytes, so
its 1 GiB root disk (an overlay on that image) holds 512 MiB of data. vmapi runs
in-process (Flask's test client) with everything a save does: the lock, the image row
and its quota, the copy on the node (a block copy ended without a pivot), the copy read
back into the image store (hashed, synced, checked by qemu-img), the row made active,
the copy deleted. The image is deleted after each round, not timed.

The floor is what one would type with virsh: a qcow2 volume of the disk's capacity in
the disk's pool, ``virDomainBlockCopy`` of the whole chain into it (``REUSE_EXT |
TRANSIENT_JOB``), polled every 10 ms until it is in sync, ``virDomainBlockJobAbort``
without a pivot, the volume read through a libvirt stream into a file on the image
store's disk (as ``virsh vol-download`` does: no hash, no sync), the volume deleted.

While each save runs, a process of the bench's own (bench/pauses.py) polls the domain's
state every ~5 ms and follows its console log file for the guest's ticks.

Everything the run makes on the host (the domain, its pools and their volumes) carries
the benchmarks' installation id and is removed at the end, also on failure; what an
interrupted run left is removed first.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bench.common import GIB, INSTALLATION, MIB, admin_token, database, median, populate
from bench.pauses import Watch
from bench.placement import verdict
from tests.conftest import node_body
from vmapi.app import create_app
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

URI = "qemu:///system"
ROUNDS = 4  # of each, after one warm-up of each
POOL = f"{INSTALLATION}-saving"
LOG_POOL = f"{INSTALLATION}-saving-logs"
LOG_DIR = f"/var/lib/libvirt/{LOG_POOL}"
ROOT_SIZE = GIB
IMAGE_SIZE = 512 * MIB  # the root disk's data: half of it
TARGET = "vda"
FLOOR_VOLUME = f"{INSTALLATION}-floor-save"
READY_POLL = 0.01
CHUNK = 256 * 1024  # as vmapi's streams read
SETTLE = 1.5  # seconds watched before and after each save
#: the driver's log of a live copy: its record carries how long the abort took
COPIES_LOG = "vmapi.hypervisor.libvirt.copies"


def run() -> list[str]:
    import libvirt

    from tests.guest.build import GuestUnavailable, ensure_guest_image

    title = "#### Saving a running VM's disk: POST /vm/<id>/image vs the same libvirt calls"
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        return [title, "", f"Not run: libvirtd does not answer: {exc}", ""]
    try:
        guest = ensure_guest_image()
    except GuestUnavailable as exc:
        conn.close()
        return [title, "", f"Not run: {exc}", ""]
    try:
        remove_ours(conn)  # what an interrupted run left
        with database() as url, tempfile.TemporaryDirectory(prefix="vmapi-bench-save-",
                                                            dir="/var/tmp") as tmp:  # fmt: skip
            figures = measure(conn, url, guest.path, Path(tmp))
    finally:
        remove_ours(conn)
        conn.close()
    return [title, "", *report(figures)]


def remove_ours(conn: Any) -> None:
    """The run's domains, network filters (none are made: the node is in user mode) and
    pools with every volume in them."""
    from tests.hypervisor.boot_env import remove_domains, remove_filters, remove_pool

    remove_domains(conn, INSTALLATION)
    remove_filters(conn, INSTALLATION)
    for name in (POOL, LOG_POOL):
        remove_pool(conn, name)


def half_full(guest: Path, path: Path) -> None:
    """A raw image of IMAGE_SIZE: the guest's image, then random bytes."""
    with path.open("wb") as out:
        out.write(guest.read_bytes())
        left = IMAGE_SIZE - out.tell()
        while left > 0:
            out.write(os.urandom(min(MIB, left)))
            left -= MIB


class AbortTimes(logging.Handler):
    """Keeps how long the driver's last live copy took to end (its log record's
    ``abort_seconds``); passes warnings and worse on to the root logger's handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.last: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        seconds = getattr(record, "abort_seconds", None)
        if seconds is not None:
            self.last = seconds
        if record.levelno >= logging.WARNING:
            for handler in logging.getLogger().handlers:
                handler.handle(record)


def measure(conn: Any, url: str, image: Path, tmp: Path) -> dict[str, Any]:
    populate(url, 0, 0, URI, addresses=10)
    store = tmp / "store"
    app = create_app({
        "DATABASE_URL": url, "LOG_LEVEL": "WARNING", "LIBVIRT_TIMEOUT": 120.0,
        "INSTALLATION_ID": INSTALLATION, "SHUTDOWN_TIMEOUT": 0.5, "IMAGE_DIR": str(store),
        "CONSOLE_LOG_POOL": LOG_POOL, "CONSOLE_LOG_DIR": LOG_DIR,
    })  # fmt: skip
    client = app.test_client()
    headers = {"Authorization": f"Bearer {admin_token(url)}"}

    def call(method: str, path: str, extra: dict[str, str] | None = None, **kw: Any) -> Any:
        answer = client.open(f"/api/v1/{path}", method=method, headers={**headers, **(extra or {})},
                             **kw)  # fmt: skip
        assert answer.status_code < 300, answer.get_data(as_text=True)[:2000]
        return answer.json if answer.is_json else None

    copies_log = logging.getLogger(COPIES_LOG)
    aborts = AbortTimes()
    copies_log.addHandler(aborts)
    copies_log.setLevel(logging.INFO)
    copies_log.propagate = False
    try:
        call("UPDATE", "storage_type/1", json={"pool": POOL})
        made = call("POST", "virt_node", json={
            "node": node_body(libvirt_uri=URI, interface_mode="user"),
            "virt_method": {"name": "QEMU"}})["data"]  # fmt: skip
        source = tmp / "half.raw"
        half_full(image, source)
        uploaded = call("POST", "image", json={"name": "half-full", "format": "raw"})["data"]
        with source.open("rb") as body:
            call("PUT", f"image/{uploaded['id']}/file",
                 {"Content-Type": "application/octet-stream"}, data=body)  # fmt: skip
        source.unlink()
        vm = call("POST", "vm", json={
            "cores": 1, "ram": 256 * MIB, "virt_method": {"id": made["virt_method"]["id"]},
            "image": {"id": uploaded["id"]}, "root_size": ROOT_SIZE})["data"]  # fmt: skip
        log = f"{LOG_DIR}/{vm['domain_name']}.log"
        wait_for_ticks(log, 3)
        dom = conn.lookupByName(vm["domain_name"])
        store.mkdir(exist_ok=True)
        out = {"api": [], "floor": [], "size": None, "data": IMAGE_SIZE}

        def api_round() -> dict[str, Any]:
            aborts.last = None
            with Watch(URI, vm["domain_name"], log) as watch:
                time.sleep(SETTLE)
                started = time.monotonic()
                saved = call("POST", f"vm/{vm['id']}/image", json={"name": "bench"})["data"]
                ended = time.monotonic()
                time.sleep(SETTLE)
            call("DELETE", f"image/{saved['id']}")
            assert dom.blockJobInfo(TARGET, 0) == {}, "a block job is left on the disk"
            out["size"] = saved["size"]
            return figures(watch, started, ended, {"abort": aborts.last})

        def floor_round() -> dict[str, Any]:
            with Watch(URI, vm["domain_name"], log) as watch:
                time.sleep(SETTLE)
                started = time.monotonic()
                steps = floor_save(conn, dom, store / "floor.qcow2")
                ended = time.monotonic()
                time.sleep(SETTLE)
            (store / "floor.qcow2").unlink()
            return figures(watch, started, ended, steps)

        for round_ in range(ROUNDS + 1):  # the first of each warms up, uncounted
            for name, one in (("api", api_round), ("floor", floor_round)):
                got = one()
                if round_:
                    out[name].append(got)
        booted = log_text(log).count("VMAPI-GUEST")
        assert booted == 1, f"the guest booted {booted} times"
        call("DELETE", f"vm/{vm['id']}")
        call("DELETE", f"image/{uploaded['id']}")
        return out
    finally:
        copies_log.removeHandler(aborts)
        copies_log.propagate = True
        copies_log.setLevel(logging.NOTSET)
        with app.app_context():
            db.engine.dispose()
        app.extensions[DRIVER_KEY].connections.clear()


def log_text(path: str) -> str:
    return Path(path).read_text(errors="replace")


def wait_for_ticks(path: str, ticks: int, timeout: float = 180.0) -> None:
    """Until the guest's console log shows its tick number ``ticks``."""
    from tests.guest.console import TICK

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [int(n) for n in TICK.findall(log_text(path))] if Path(path).exists() else []
        if seen and max(seen) >= ticks:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the guest did not tick {ticks} times within {timeout:.0f} s")


def figures(watch: Watch, start: float, end: float, extra: dict[str, Any]) -> dict[str, Any]:
    seen = watch.seen
    polls = seen.poll_gaps(start, end)
    return {"seconds": end - start, "tick_gap": max(seen.tick_gaps(start, end)),
            "usual_tick": seen.usual_tick_gap(), "stop": seen.longest_stop(start, end),
            "stops": seen.stopped_polls(start, end), "poll": median(polls),
            "poll_max": max(polls), **extra}  # fmt: skip


# ---------------------------------------------------------------------- the floor
def volume_xml(name: str, capacity: int) -> str:
    """A qcow2 v3 volume, as vmapi makes its copy."""
    el = ET.Element("volume")
    ET.SubElement(el, "name").text = name
    ET.SubElement(el, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(el, "target")
    ET.SubElement(target, "format", type="qcow2")
    ET.SubElement(target, "compat").text = "1.1"
    return ET.tostring(el, encoding="unicode")


def mirror_ready(dom: Any, path: str) -> bool:
    """The block copy into ``path`` is in sync (as ``virsh blockjob --info`` and the live
    XML's ``<mirror ready='yes'>`` tell)."""
    info = dom.blockJobInfo(TARGET, 0)
    if not info:
        raise RuntimeError("the block copy ended before it was in sync")
    if info["cur"] != info["end"]:
        return False
    for disk in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk"):
        target, mirror = disk.find("target"), disk.find("mirror")
        if target is not None and target.get("dev") == TARGET and mirror is not None:
            return mirror.get("file") == path and mirror.get("ready") == "yes"
    return False


def floor_save(conn: Any, dom: Any, dest: Path) -> dict[str, float]:
    """The floor's calls; seconds of each step."""
    import libvirt

    flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
    began = time.monotonic()
    pool = conn.storagePoolLookupByName(POOL)
    vol = pool.createXML(volume_xml(FLOOR_VOLUME, dom.blockInfo(TARGET, 0)[0]), 0)
    try:
        disk = ET.Element("disk", type="file")
        ET.SubElement(disk, "source", file=vol.path())
        ET.SubElement(disk, "driver", type="qcow2")
        dom.blockCopy(TARGET, ET.tostring(disk, encoding="unicode"), {}, flags)
        while not mirror_ready(dom, vol.path()):
            time.sleep(READY_POLL)
        ready = time.monotonic()
        dom.blockJobAbort(TARGET, 0)
        aborted = time.monotonic()
        download(POOL, FLOOR_VOLUME, dest)
        downloaded = time.monotonic()
    except BaseException:
        if dom.blockJobInfo(TARGET, 0):
            dom.blockJobAbort(TARGET, 0)
        vol.delete(0)
        raise
    vol.delete(0)
    return {"copy": ready - began, "abort": aborted - ready, "download": downloaded - aborted,
            "delete": time.monotonic() - downloaded}  # fmt: skip


def download(pool: str, name: str, dest: Path) -> None:
    """``virsh vol-download``: a connection of its own, a stream, the bytes into a file."""
    import libvirt

    conn = libvirt.open(URI)
    try:
        vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
        stream = conn.newStream(0)
        vol.download(stream, 0, 0, 0)
        with dest.open("wb") as out:
            while data := stream.recv(CHUNK):
                out.write(data)
        stream.finish()
    finally:
        conn.close()


# ---------------------------------------------------------------------- the report
def report(out: dict[str, Any]) -> list[str]:
    api, floor = out["api"], out["floor"]

    def med(rows: list[dict], key: str) -> float:
        return median([row[key] for row in rows])

    def worst(rows: list[dict], key: str) -> float:
        return max(row[key] for row in rows)

    ratio = med(api, "seconds") / med(floor, "seconds")
    stop = worst(api, "stop") * 1000
    usual = median([row["usual_tick"] for row in api + floor])
    api_aborts = [row["abort"] for row in api if row["abort"] is not None]
    api_abort = (f"{median(api_aborts) * 1000:.0f} ms median, {max(api_aborts) * 1000:.0f} "
                 "max" if api_aborts else "not reported by the driver")  # fmt: skip

    def row(name: str, rows: list[dict]) -> str:
        stops = sum(r["stops"] for r in rows)
        return (
            f"| {name} | {med(rows, 'seconds'):.2f} | {min(r['seconds'] for r in rows):.2f}"
            f" | {worst(rows, 'seconds'):.2f} | {worst(rows, 'tick_gap'):.2f} |"
            f" {worst(rows, 'stop') * 1000:.0f} ({stops}) |"
            f" {med(rows, 'poll') * 1000:.1f} / {worst(rows, 'poll_max') * 1000:.0f} |"
        )

    size = f"{out['size'] / MIB:.0f} MiB" if out["size"] else "?"
    return [
        f"{ROUNDS} alternating rounds after one warm-up of each; vmapi in-process on {URI}; "
        f"the test guest (TCG, 256 MiB) ticking on its console, its root disk "
        f"{ROOT_SIZE // GIB} GiB holding {out['data'] // MIB} MiB (a raw image of the guest "
        f"and random bytes, under a qcow2 overlay); the saved image: {size} (qcow2). Floor: "
        "a qcow2 volume, virDomainBlockCopy (REUSE_EXT | TRANSIENT_JOB) polled every 10 ms "
        "until in sync, virDomainBlockJobAbort without pivot, the volume read through a "
        "libvirt stream into a file (no hash, no sync), the volume deleted.",
        "",
        "| | median s | min s | max s | longest tick gap s | longest not running ms "
        "(times) | state poll median / max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("vmapi POST /vm/<id>/image", api),
        row("floor: the same calls by hand", floor),
        "",
        f"Floor's steps (median s): copy until in sync {med(floor, 'copy'):.2f}, "
        f"blockJobAbort {med(floor, 'abort') * 1000:.0f} ms (max "
        f"{worst(floor, 'abort') * 1000:.0f} ms), download {med(floor, 'download'):.2f}, "
        f"delete {med(floor, 'delete') * 1000:.0f} ms. vmapi's blockJobAbort (its driver's "
        f"log): {api_abort}.",
        "",
        f"The guest's ticks arrive {usual:.3f} s apart as a rule; the longest gap while "
        f"vmapi saved was {worst(api, 'tick_gap'):.3f} s (+"
        f"{(worst(api, 'tick_gap') - usual) * 1000:.0f} ms).",
        "",
        f"Target vmapi ≤ 1.2 x the floor: {ratio:.2f} x — {verdict(ratio <= 1.2)}. Target "
        f"the guest's longest pause ≤ 100 ms: not running for {stop:.0f} ms at most (state "
        f"polled every ~5 ms) — {verdict(stop <= 100)}.",
        "",
    ]
