"""Image uploads: throughput of ``PUT /image/<id>/file`` through gunicorn, and through the
shipped nginx site (which spools the whole body to disk, then hands it to gunicorn),
against ``cp`` of the same file on the same disk (target ≥ 50%), and the worker's peak
memory after a 64 MiB and a 1 GiB upload (it must not grow with the file).
``BENCH_IMAGE_MIB`` sets the size of the large file (default 1024).

The upload hashes (sha256) and fsyncs what it writes, and runs qemu-img on the result;
``cp`` does neither, so ``cp`` + ``sync`` is shown too. The source file is read from the
page cache in every case (it was just written), so the disk's write speed, the hash
and the HTTP path are what is compared.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import GIB, MIB, admin_token, database, median, worker_pids
from bench.placement import verdict
from tests.concurrency.conftest import gunicorn
from tests.concurrency.test_nginx import serve_nginx

SIZE = int(os.environ.get("BENCH_IMAGE_MIB", GIB // MIB)) * MIB
ROUNDS = 3
PIECE = MIB


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise LookupError(pid)


def connection(base: str) -> http.client.HTTPConnection:
    host, port = base.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=600)


def call(base: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    conn = connection(base)
    conn.request(method, f"/api/v1/{path}", body=json.dumps(body) if body else None,
                 headers={"Authorization": f"Bearer {token}",
                          "Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    answer = json.loads(response.read())
    if response.status >= 300:
        raise RuntimeError(answer)
    return answer["data"]


def upload(base: str, token: str, source: Path) -> float:
    """Seconds to upload ``source`` as a new raw image, until the answer (then deleted)."""
    ident = call(base, token, "POST", "image", {"name": "bench", "format": "raw"})["id"]
    conn = connection(base)
    began = time.perf_counter()
    conn.putrequest("PUT", f"/api/v1/image/{ident}/file")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(source.stat().st_size))
    conn.endheaders()
    with source.open("rb") as handle:
        while piece := handle.read(PIECE):
            conn.send(piece)
    response = conn.getresponse()
    body = response.read()
    took = time.perf_counter() - began
    if response.status != 200:
        raise RuntimeError(body[:500])
    call(base, token, "DELETE", f"image/{ident}")
    return took


def copy(source: Path, target: Path, sync: bool) -> float:
    began = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    if sync:
        subprocess.run(["sync", str(target)], check=True)
    took = time.perf_counter() - began
    target.unlink()
    return took


def source_file(directory: Path, size: int) -> Path:
    path = directory / f"source-{size}"
    block = os.urandom(MIB)
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(block)
    return path


def run() -> list[str]:
    if shutil.which("qemu-img") is None:
        raise RuntimeError("qemu-img (Debian: qemu-utils) is needed")
    with tempfile.TemporaryDirectory(prefix="vmapi-bench-images-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        store = work / "store"
        big, small = source_file(work, SIZE), source_file(work, 64 * MIB)
        with database() as url:
            token = admin_token(url)
            env = {"VMAPI_DATABASE_URL": url, "VMAPI_IMAGE_DIR": str(store),
                   "VMAPI_LOG_LEVEL": "WARNING", "VMAPI_LOG_REQUESTS": "false"}  # fmt: skip
            with gunicorn("wsgi:app", env, workers=1) as (base, master):
                (worker,) = worker_pids(master)
                upload(base, token, small)
                rss_small = peak_rss(worker)
                uploads, proxied = [], []
                with serve_nginx(base, work, store=store) as proxy:
                    for _ in range(ROUNDS):  # alternating: the machine is shared
                        uploads.append(upload(base, token, big))
                        proxied.append(upload(proxy, token, big))
                rss_big = peak_rss(worker)
                if worker_pids(master) != [worker]:
                    raise RuntimeError("the worker was replaced; its memory is not comparable")
        copies = [copy(big, work / "copy", sync=False) for _ in range(ROUNDS)]
        synced = [copy(big, work / "copy", sync=True) for _ in range(ROUNDS)]
    rows = (("upload", uploads), ("upload through nginx", proxied), ("cp", copies),
            ("cp + sync", synced))  # fmt: skip
    rate = {name: SIZE / MIB / median(times) for name, times in rows}
    ratio = rate["upload"] / rate["cp"]
    through = rate["upload through nginx"] / rate["cp"]
    growth = (rss_big - rss_small) / MIB
    return [
        "#### Image upload: PUT /image/<id>/file through gunicorn, and through nginx, vs cp",
        "",
        f"A {SIZE // MIB} MiB raw image, median of {ROUNDS}; one sync gunicorn worker; the "
        "upload hashes (sha256), fdatasyncs every 64 MiB and runs qemu-img before it "
        "answers. Through nginx: the shipped site, whose spool writes the whole body to "
        "its temporary file (same disk) before gunicorn gets it.",
        "",
        "| copy | seconds | MiB/s | vs cp |",
        "|---|---:|---:|---:|",
        *[
            f"| {name} | {median(times):.2f} | {rate[name]:.0f} | {rate[name] / rate['cp']:.2f} x |"
            for name, times in rows
        ],
        "",
        f"Worker peak RSS (VmHWM): after a 64 MiB upload {rss_small / MIB:.1f} MiB, after "
        f"{2 * ROUNDS} uploads of {SIZE // MIB} MiB {rss_big / MIB:.1f} MiB "
        f"({growth:+.1f} MiB).",
        "",
        f"Target upload ≥ 50% of cp: {ratio:.0%} — {verdict(ratio >= 0.5)}; through nginx "
        f"{through:.0%} — {verdict(through >= 0.5)}. Memory flat "
        f"(< 32 MiB of growth): {verdict(growth < 32)}.",
        "",
    ]
