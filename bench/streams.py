"""Volume streams through libvirt (issue 13) against ``cp`` of the same 256 MiB file.

Four pairs, alternating in each round, on real libvirtd (qemu:///system) and one disk:
``upload_volume`` from a file (read in chunks, a connection of its own) vs ``cp`` of the
file into the pool's directory; ``download_volume`` into a file vs ``cp`` out of the
pool; ``volume_sha256`` vs hashing the file directly. Warm page cache for both sides of
each pair (nothing is synced, nothing dropped: the machine is shared).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import median
from vmapi.hypervisor import read_chunks

URI = "qemu:///system"
POOL = "vmapi-streamtest-bench"
FOLDER = Path("/var/lib/libvirt") / POOL
SIZE = 256 * 1024 * 1024
ROUNDS = 5


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def cp(source: Path, target: Path) -> None:
    subprocess.run(["cp", str(source), str(target)], check=True)


def remove_pool(pool) -> None:
    pool.refresh(0)
    for vol in pool.listAllVolumes():
        vol.delete(0)
    pool.destroy()
    pool.delete(0)
    pool.undefine()


def mb_s(seconds: list[float]) -> float:
    return SIZE / median(seconds) / 1e6


def run() -> list[str]:
    import libvirt

    from vmapi.hypervisor.libvirt import LibvirtDriver

    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        return ["#### Volume streams", "", f"Not run: libvirtd does not answer: {exc}", ""]
    driver = LibvirtDriver(timeout=30.0)
    driver.ensure_pool(URI, POOL, str(FOLDER))
    keys = ("upload", "cp in", "download", "cp out", "sha", "hash")
    times: dict[str, list[float]] = {key: [] for key in keys}
    # on the pool's own disk, so cp and libvirt read and write the same device
    with tempfile.TemporaryDirectory(dir=FOLDER.parent, prefix="vmapi-streamtest-") as tmp:
        source, back = Path(tmp) / "source.img", Path(tmp) / "back.img"
        with source.open("wb") as out:
            for _ in range(SIZE // (16 * 1024 * 1024)):
                out.write(os.urandom(16 * 1024 * 1024))

        def upload() -> None:
            with source.open("rb") as readable:
                driver.upload_volume(URI, POOL, "copy", SIZE, read_chunks(readable), 600)

        def download() -> None:
            with back.open("wb") as out:
                for chunk in driver.download_volume(URI, POOL, "copy", 600):
                    out.write(chunk)

        def digest() -> None:
            with source.open("rb") as readable:
                hashlib.file_digest(readable, "sha256")

        actions = {
            "upload": upload,
            "cp in": lambda: cp(source, FOLDER / "cp"),
            "download": download,
            "cp out": lambda: cp(FOLDER / "cp", back),
            "sha": lambda: driver.volume_sha256(URI, POOL, "copy", 600),
            "hash": digest,
        }
        try:
            for _ in range(ROUNDS):
                for key in keys:
                    times[key].append(timed(actions[key]))
                driver.delete_volume(URI, POOL, "copy")
                (FOLDER / "cp").unlink()
        finally:
            remove_pool(conn.storagePoolLookupByName(POOL))
            conn.close()
    rows = [
        ("upload_volume (file → pool)", "upload", "cp into the pool", "cp in"),
        ("download_volume (pool → file)", "download", "cp out of the pool", "cp out"),
        ("volume_sha256 (through the stream)", "sha", "sha256 of the file", "hash"),
    ]
    lines = [
        f"#### Volume streams through libvirt (256 MiB, median of {ROUNDS} alternating rounds)",
        "",
        "| stream | MB/s | direct | MB/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for label, key, direct, direct_key in rows:
        ours, theirs = mb_s(times[key]), mb_s(times[direct_key])
        lines.append(f"| {label} | {ours:.0f} | {direct} | {theirs:.0f} | {ours / theirs:.0%} |")
    lines.append("")
    return lines
