"""Boot from an image on a real libvirtd (issue 13): POST /vm from an image whose copy is
on the node against POST /vm without an image, alternating in the same run (target: at
most 1.2 x, plus the libvirt calls the root disk needs); and the first VM of an image on
a node (which copies it there) against the later ones, with the copy's own time.

vmapi runs in-process (Flask's test client) on ``qemu:///system`` with everything a
create does. The images are raw files of random bytes (nothing boots from them: the
firmware finds no system and waits, which costs the API nothing). Each VM is deleted
after it is timed (not timed). The libvirt calls are timed by a wrapper of the real
driver, so the root disk's own calls (the overlay) show apart from vmapi's work.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import INSTALLATION, MIB, admin_token, database, median, p95, populate
from bench.placement import verdict
from tests.conftest import node_body
from vmapi.app import create_app
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

URI = "qemu:///system"
ROUNDS = 10
FIRSTS = 3  # images copied to the node by their first VM
IMAGE_SIZE = 256 * MIB
POOL = f"{INSTALLATION}-boot"
LOG_POOL = f"{INSTALLATION}-boot-logs"
#: what a VM from an image asks of libvirt that one without asks not
ROOT_DISK_CALLS = ("create_overlay",)
COPY_CALLS = ("upload_volume", "download_volume")


class Timed:
    """The real driver, each call's time added up by name (a download's, while read);
    while ``recording`` is a list, each call's name and arguments go on it (an upload's
    chunks kept as bytes), for the floor to make the same calls again."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.ms: dict[str, float] = defaultdict(float)
        self.recording: list[tuple[str, tuple, dict]] | None = None

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.real, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.recording is not None:
                if name == "upload_volume":  # the chunks are an iterator: keep the bytes
                    args = (*args[:4], list(args[4]), *args[5:])
                self.recording.append((name, args, kwargs))
            started = time.perf_counter()
            try:
                result = target(*args, **kwargs)
            finally:
                self.ms[name] += (time.perf_counter() - started) * 1000
            if name == "download_volume":
                return self._counted(name, result)
            return result

        return call

    def _counted(self, name: str, chunks: Any) -> Any:
        while True:
            started = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                self.ms[name] += (time.perf_counter() - started) * 1000
            yield chunk

    def take(self, names: tuple[str, ...]) -> float:
        spent = sum(self.ms.get(name, 0.0) for name in names)
        self.ms.clear()
        return spent


#: driver calls that make a volume: (pool, name) are their 2nd and 3rd arguments
MAKES_VOLUME = ("create_overlay", "create_volume", "upload_volume")


def floor_create(driver: Any, cursor: Any, calls: list[tuple[str, tuple, dict]]) -> float:
    """The floor of a create from an image: one INSERT and a commit, and the libvirt calls
    vmapi's create made, made again through the same driver (the VM vmapi made is deleted
    first, so the names are free); ms."""
    started = time.perf_counter()
    cursor.execute("INSERT INTO floor_vm (name) VALUES (%s) RETURNING id", ("floor",))
    cursor.fetchone()
    cursor.connection.commit()
    for name, args, kwargs in calls:
        if name == "upload_volume":
            args = (*args[:4], iter(args[4]), *args[5:])
        getattr(driver, name)(*args, **kwargs)
    return (time.perf_counter() - started) * 1000


def floor_cleanup(driver: Any, calls: list[tuple[str, tuple, dict]]) -> None:
    """Remove what :func:`floor_create` made: the domain and the volumes."""
    for name, args, _kwargs in calls:
        if name == "define":
            uri, spec = args[0], args[1]
            driver.destroy(uri, spec.name)
            driver.undefine(uri, spec.name)
    for name, args, _kwargs in calls:
        if name in MAKES_VOLUME:
            driver.delete_volume(args[0], args[1], args[2])


def remove_pool(conn: Any, name: str) -> None:
    import libvirt

    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        return
    if pool.isActive():
        pool.refresh(0)
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
    pool.delete(0)
    pool.undefine()


def run() -> list[str]:
    import libvirt

    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        return ["#### Boot from an image", "", f"Not run: libvirtd does not answer: {exc}", ""]
    plain_ms, image_ms, overlay_ms, first_ms, later_ms, copy_ms = [], [], [], [], [], []
    floor_ms: list[float] = []
    calls_made: list[str] = []
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        populate(url, 0, 0, URI, addresses=2 * ROUNDS + 2 * FIRSTS + 10)
        app = create_app({
            "DATABASE_URL": url, "LOG_LEVEL": "WARNING", "LIBVIRT_TIMEOUT": 120.0,
            "INSTALLATION_ID": INSTALLATION, "SHUTDOWN_TIMEOUT": 0.5, "IMAGE_DIR": tmp,
            "CONSOLE_LOG_POOL": LOG_POOL, "CONSOLE_LOG_DIR": f"/var/lib/libvirt/{LOG_POOL}",
        })  # fmt: skip
        timed = app.extensions[DRIVER_KEY] = Timed(app.extensions[DRIVER_KEY])
        client = app.test_client()
        headers = {"Authorization": f"Bearer {admin_token(url)}"}

        def call(method: str, path: str, extra: dict[str, str] | None = None, **kw: Any) -> Any:
            sent = {**headers, **(extra or {})}
            answer = client.open(f"/api/v1/{path}", method=method, headers=sent, **kw)
            assert answer.status_code < 300, answer.json
            return answer.json["data"] if answer.is_json else None

        def upload(name: str) -> int:
            path = Path(tmp) / f"{name}.raw"
            path.write_bytes(os.urandom(IMAGE_SIZE))
            image = call("POST", "image", json={"name": name, "format": "raw"})
            with open(path, "rb") as body:
                octet = {"Content-Type": "application/octet-stream"}
                call("PUT", f"image/{image['id']}/file", octet, data=body)
            path.unlink()
            return image["id"]

        def create(**fields: Any) -> tuple[float, int]:
            started = time.perf_counter()
            vm = call("POST", "vm", json={"cores": 1, "ram": 256 * MIB,
                                          "virt_method": {"id": method}, **fields})  # fmt: skip
            return (time.perf_counter() - started) * 1000, vm["id"]

        try:
            call("UPDATE", "storage_type/1", json={"pool": POOL})
            made = call("POST", "virt_node", json={
                "node": node_body(libvirt_uri=URI, interface_mode="user"),
                "virt_method": {"name": "QEMU"}})  # fmt: skip
            method = made["virt_method"]["id"]
            image = upload("shared")
            ms, vm = create(image={"id": image})  # copies it; warms both paths up
            call("DELETE", f"vm/{vm}")
            ms, vm = create()
            call("DELETE", f"vm/{vm}")
            timed.take(tuple(timed.ms))
            import psycopg2

            floor_db = psycopg2.connect(url)
            cursor = floor_db.cursor()
            cursor.execute("CREATE TABLE floor_vm (id serial PRIMARY KEY, name text)")
            floor_db.commit()
            for _ in range(ROUNDS):
                ms, vm = create()
                plain_ms.append(ms)
                timed.take(tuple(timed.ms))
                call("DELETE", f"vm/{vm}")
                timed.recording = []
                ms, vm = create(image={"id": image})
                recorded, timed.recording = timed.recording, None
                image_ms.append(ms)
                overlay_ms.append(timed.take(ROOT_DISK_CALLS))
                call("DELETE", f"vm/{vm}")
                floor_ms.append(floor_create(timed.real, cursor, recorded))
                floor_cleanup(timed.real, recorded)
                calls_made = [name for name, _a, _k in recorded]
            for n in range(FIRSTS):
                fresh = upload(f"fresh-{n}")
                timed.take(tuple(timed.ms))
                ms, vm = create(image={"id": fresh})
                first_ms.append(ms)
                copy_ms.append(timed.take(COPY_CALLS))
                later, other = create(image={"id": fresh})
                later_ms.append(later)
                for ident in (vm, other):
                    call("DELETE", f"vm/{ident}")
                call("DELETE", f"image/{fresh}")
            call("DELETE", f"image/{image}")
            floor_db.close()
        finally:
            with app.app_context():
                db.engine.dispose()
            for name in (POOL, LOG_POOL):
                remove_pool(conn, name)
            conn.close()
    allowed = 1.2 * median(plain_ms) + median(overlay_ms)
    return [
        "#### Boot from an image: POST /vm on libvirtd with QEMU",
        "",
        f"{ROUNDS} alternating rounds after a warm-up; vmapi in-process; images of "
        f"{IMAGE_SIZE // MIB} MiB (raw). 'from an image' finds the image's copy on the node and"
        " makes the root disk (a qcow2 overlay on it).",
        "",
        "| POST /vm | median ms | p95 ms |",
        "|---|---:|---:|",
        f"| without an image | {median(plain_ms):.1f} | {p95(plain_ms):.1f} |",
        f"| from an image on the node | {median(image_ms):.1f} | {p95(image_ms):.1f} |",
        f"| (of which libvirt's overlay call) | {median(overlay_ms):.1f} | {p95(overlay_ms):.1f} |",
        "",
        f"Target from-image ≤ 1.2 x without + the overlay call = {allowed:.1f} ms: "
        f"{median(image_ms):.1f} ms — {verdict(median(image_ms) <= allowed)}.",
        "",
        "Against the floor (issue 17): one INSERT and commit, and the same libvirt calls the"
        f" create from an image made ({', '.join(calls_made)}), made again through the same"
        " driver right after vmapi's VM is deleted:",
        "",
        "| | median ms | creates/s |",
        "|---|---:|---:|",
        f"| floor | {median(floor_ms):.1f} | {1000 / median(floor_ms):.2f} |",
        f"| vmapi from an image | {median(image_ms):.1f} | {1000 / median(image_ms):.2f} |",
        "",
        f"Target vmapi ≥ 25% of the floor's creates/s: {median(floor_ms) / median(image_ms):.0%}"
        f" — {verdict(median(floor_ms) / median(image_ms) >= 0.25)}.",
        "",
        f"First VM of an image on the node (copies it) vs a later one, {FIRSTS} images:",
        "",
        "| | median ms | max ms |",
        "|---|---:|---:|",
        f"| first VM (with the copy) | {median(first_ms):.1f} | {max(first_ms):.1f} |",
        f"| (of which the copy: upload + checksum read-back) | {median(copy_ms):.1f} |"
        f" {max(copy_ms):.1f} |",
        f"| a later VM (the copy is there) | {median(later_ms):.1f} | {max(later_ms):.1f} |",
        "",
    ]
