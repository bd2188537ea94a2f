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

The floor (bench/save_floor.py) is what one would type with virsh: a qcow2 volume of
the disk's capacity in the disk's pool, ``virDomainBlockCopy`` of the whole chain into
it (``REUSE_EXT | TRANSIENT_JOB``), polled every 10 ms until it is in sync,
``virDomainBlockJobAbort`` without a pivot, the volume read through a libvirt stream
into a file on the image store's disk (as ``virsh vol-download`` does: no hash, no
sync), the volume deleted. Where vmapi's time goes is shown too: its driver's calls
timed (bench/boot.py's ``Timed``), and the image store's own work (sha256, fdatasync,
qemu-img) measured on the floor's file after the floor's time was taken.

While each save runs, a process of the bench's own (bench/pauses.py) polls the domain's
state every ~5 ms, listens to libvirt's lifecycle events and follows the console log
file for the guest's ticks.

Everything the run makes on the host (the domain, its pools and their volumes) carries
the benchmarks' installation id and is removed at the end, also on failure; what an
interrupted run left is removed first.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.boot import Timed
from bench.common import GIB, INSTALLATION, MIB, admin_token, database, median, populate
from bench.pauses import Watch
from bench.placement import verdict
from bench.save_floor import TARGET, floor_save, store_work
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
    timed = app.extensions[DRIVER_KEY] = Timed(app.extensions[DRIVER_KEY])
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
                timed.ms.clear()
                started = time.monotonic()
                saved = call("POST", f"vm/{vm['id']}/image", json={"name": "bench"})["data"]
                ended = time.monotonic()
                calls = {name: ms / 1000 for name, ms in timed.ms.items()}
                time.sleep(SETTLE)
            call("DELETE", f"image/{saved['id']}")
            assert dom.blockJobInfo(TARGET, 0) == {}, "a block job is left on the disk"
            out["size"] = saved["size"]
            parts = {"abort": aborts.last, "copy": calls.get("copy_disk_live", 0.0),
                     "download": calls.get("download_volume", 0.0),
                     "calls": sum(calls.values())}  # fmt: skip
            return figures(watch, started, ended, parts)

        def floor_round() -> dict[str, Any]:
            dest = store / "floor.qcow2"
            with Watch(URI, vm["domain_name"], log) as watch:
                time.sleep(SETTLE)
                started = time.monotonic()
                steps = floor_save(URI, conn, dom, POOL, dest)
                ended = time.monotonic()
                time.sleep(SETTLE)
            steps |= store_work(dest)
            dest.unlink()
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
    gaps = seen.tick_gaps(start, end)
    gap, gap_least = max(g for g, _ in gaps), max(least for _, least in gaps)
    suspended = seen.suspensions(start, end)
    return {"seconds": end - start, "tick_gap": gap, "tick_gap_least": gap_least,
            "usual_tick": seen.usual_tick_gap(), "stop": seen.longest_stop(start, end),
            "stops": seen.stopped_polls(start, end), "suspended": max(suspended, default=0.0),
            "suspensions": len(suspended), "poll": median(polls), "poll_max": max(polls),
            **extra}  # fmt: skip


# ---------------------------------------------------------------------- the report
def report(out: dict[str, Any]) -> list[str]:
    api, floor = out["api"], out["floor"]

    def med(rows: list[dict], key: str) -> float:
        return median([row[key] for row in rows])

    def worst(rows: list[dict], key: str) -> float:
        return max(row[key] for row in rows)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f}"

    def row(name: str, rows: list[dict]) -> str:
        stops = sum(r["stops"] for r in rows)
        suspensions = sum(r["suspensions"] for r in rows)
        return (
            f"| {name} | {med(rows, 'seconds'):.2f} | {min(r['seconds'] for r in rows):.2f}"
            f" | {worst(rows, 'seconds'):.2f} | {worst(rows, 'tick_gap'):.2f}"
            f" ({worst(rows, 'tick_gap_least'):.2f}) | {ms(worst(rows, 'stop'))} ({stops}) |"
            f" {ms(worst(rows, 'suspended'))} ({suspensions}) |"
            f" {med(rows, 'poll') * 1000:.1f} / {ms(worst(rows, 'poll_max'))} |"
        )

    ratio = med(api, "seconds") / med(floor, "seconds")
    pause = max(worst(api, "stop"), worst(api, "suspended"))
    usual = median([row["usual_tick"] for row in api + floor])
    aborts = [row["abort"] for row in api if row["abort"] is not None]
    api_abort = f"{ms(median(aborts))} ms (max {ms(max(aborts))})" if aborts else "not logged"
    own = median([row["seconds"] - row["calls"] for row in api])
    size = f"{out['size'] / MIB:.0f} MiB" if out["size"] else "?"
    return [
        f"{ROUNDS} alternating rounds after one warm-up of each; vmapi in-process on {URI}; "
        f"the test guest (TCG, 256 MiB) ticking on its console, its root disk "
        f"{ROOT_SIZE // GIB} GiB holding {out['data'] // MIB} MiB (a raw image of the guest "
        f"and random bytes, under a qcow2 overlay); the saved image: {size} (qcow2). Floor: "
        "a qcow2 volume, virDomainBlockCopy (REUSE_EXT | TRANSIENT_JOB) polled every 10 ms "
        "until in sync, virDomainBlockJobAbort without pivot, the volume read through a "
        "libvirt stream into a file (no hash, no sync), the volume deleted. The guest "
        "watched by a process of the bench's own: its state polled every ~5 ms, libvirt's "
        "lifecycle events, its ticks in the console log file.",
        "",
        "| | median s | min s | max s | longest tick gap s (at least) | longest not running "
        "by polls ms (times) | longest suspended by events ms (times) | state poll median "
        "/ max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("vmapi POST /vm/<id>/image", api),
        row("floor: the same calls by hand", floor),
        "",
        f"Where the time goes (medians, s). vmapi: the live copy (`copy_disk_live`: the "
        f"volume, the block copy until in sync, polled every 100 ms, the abort) "
        f"{med(api, 'copy'):.2f}; waiting on the download stream {med(api, 'download'):.2f}; "
        f"all driver calls {med(api, 'calls'):.2f}; vmapi's own work (hashing and writing "
        f"the copy, fdatasync every 64 MiB and at the end, qemu-img, the rows, the rename) "
        f"{own:.2f}. Floor: the copy until in sync {med(floor, 'copy'):.2f}, blockJobAbort "
        f"{ms(med(floor, 'abort'))} ms (max {ms(worst(floor, 'abort'))}), the download "
        f"{med(floor, 'download'):.2f}, the delete {ms(med(floor, 'delete'))} ms. vmapi's "
        f"blockJobAbort (its driver's log): {api_abort}. The image store's work on the "
        f"floor's file, after the floor's time: sha256 {med(floor, 'sha256'):.2f}, "
        f"fdatasync {med(floor, 'fdatasync'):.2f}, qemu-img info {ms(med(floor, 'qemu_img'))} "
        "ms.",
        "",
        f"The guest's ticks arrive {usual:.3f} s apart as a rule; the longest gap while "
        f"vmapi saved: {worst(api, 'tick_gap'):.3f} s as seen, at least "
        f"{worst(api, 'tick_gap_least'):.3f} s.",
        "",
        f"Target vmapi ≤ 1.2 x the floor: {ratio:.2f} x — {verdict(ratio <= 1.2)}. Target "
        f"the guest's longest pause ≤ 100 ms: {ms(pause)} ms (not running by the polls or "
        f"suspended by the events) — {verdict(pause <= 0.1)}.",
        "",
    ]
