"""Image uploads through a real gunicorn (the shipped settings: sync workers, here with a
worker timeout of only 5 s) and through the shipped nginx site.

- A client that trickles its upload for longer than the worker timeout still gets its
  image, from the same worker (the transfer beats the worker's heartbeat per chunk).
- Directly, the file reaches the store while the client is still sending (no buffering
  of the whole body on the way); through nginx, nginx's spool holds it until it is
  whole and vmapi sees nothing before (no worker waits on the client).
- A body that ends before its Content-Length, or a chunked body that breaks off, leaves
  no file and no active image.
- The worker's peak memory does not grow with the upload's size (1 GiB vs 64 MiB).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.concurrency.conftest import ROOT, gunicorn
from tests.concurrency.test_nginx import serve_nginx
from tests.conftest import create_database, drop_database, migrate, unavailable

pytestmark = [pytest.mark.concurrency]

WORKER_TIMEOUT = 5
MIB = 1024**2
GIB = 1024**3
PIECE = 64 * 1024


@dataclass
class Uploads:
    url: str
    token: str
    store: Path
    master: int

    def connection(self, url: str | None = None) -> http.client.HTTPConnection:
        host, port = (url or self.url).removeprefix("http://").split(":")
        return http.client.HTTPConnection(host, int(port), timeout=120)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = self.connection()
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        conn.request(method, f"/api/v1/{path}", body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    def new_image(self) -> int:
        status, body = self.call("POST", "image", {"name": "upload", "format": "raw"})
        assert status == 201, body
        return body["data"]["id"]

    def start_upload(self, ident: int, length: int, url: str | None = None):
        conn = self.connection(url)
        conn.putrequest("PUT", f"/api/v1/image/{ident}/file")
        conn.putheader("Authorization", f"Bearer {self.token}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        return conn

    def temporary_files(self) -> list[Path]:
        return list(self.store.glob(".upload-*")) if self.store.is_dir() else []


def answer(conn: http.client.HTTPConnection) -> tuple[int, dict]:
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def worker_pids(master: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise LookupError(pid)


@pytest.fixture
def uploads(pg_server, tmp_path):
    if shutil.which("qemu-img") is None:
        unavailable("qemu-img (Debian: qemu-utils) is not installed")
    db_url = create_database(pg_server)
    try:
        migrate(db_url)
        store = tmp_path / "images"
        env = {**os.environ, "VMAPI_DATABASE_URL": db_url, "VMAPI_IMAGE_DIR": str(store),
               "VMAPI_IMAGE_MAX_SIZE": str(GIB), "VMAPI_LOG_REQUESTS": "false",
               "GUNICORN_TIMEOUT": str(WORKER_TIMEOUT)}  # fmt: skip
        flask = [sys.executable, "-m", "flask", "--app", "wsgi", "vmapi"]
        out = subprocess.run([*flask, "token", "create", "--admin"], cwd=ROOT, env=env,
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        token = out.strip().splitlines()[-1]
        with gunicorn("wsgi:app", env, workers=1) as (url, master):
            yield Uploads(url, token, store, master)
    finally:
        drop_database(pg_server, db_url)


def wait_for_partial_file(uploads: Uploads, at_least: int) -> None:
    """Until the store holds a temporary file of ``at_least`` bytes (the app is writing
    what has arrived so far); fails after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(p.stat().st_size >= at_least for p in uploads.temporary_files()):
            return
        time.sleep(0.05)
    pytest.fail(f"no partial upload of {at_least} bytes reached the store while the client sent")


def wait_for_spooled(spool: Path, at_least: int) -> None:
    """Until nginx's spool holds an upload of ``at_least`` bytes; fails after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(p.is_file() and p.stat().st_size >= at_least for p in spool.rglob("*")):
            return
        time.sleep(0.05)
    pytest.fail(f"nginx's spool never held {at_least} bytes of the upload")


@pytest.mark.parametrize("through", ["gunicorn", "nginx"])
def test_an_upload_slower_than_the_worker_timeout_completes(uploads, tmp_path, through):
    pieces = [os.urandom(PIECE) for _ in range(12)]
    data = b"".join(pieces)
    workers = worker_pids(uploads.master)
    ident = uploads.new_image()
    with serve_nginx(uploads.url, tmp_path) as proxy:
        conn = uploads.start_upload(ident, len(data), proxy if through == "nginx" else None)
        started = time.monotonic()
        for number, piece in enumerate(pieces):
            conn.send(piece)
            if number == 5 and through == "nginx":  # half sent: nginx keeps it, not vmapi
                wait_for_spooled(tmp_path / "spool", 3 * PIECE)
                assert uploads.temporary_files() == []
            elif number == 5:  # half sent: the app must already be writing it
                wait_for_partial_file(uploads, 4 * PIECE)
            time.sleep(0.75)
        status, body = answer(conn)
        took = time.monotonic() - started
    assert status == 200, body
    assert body["data"]["state"] == "active"
    assert body["data"]["checksum"] == hashlib.sha256(data).hexdigest()
    assert took > WORKER_TIMEOUT  # the premise: the upload outlasted the worker timeout
    assert worker_pids(uploads.master) == workers  # served by the worker it started on


def test_a_body_that_ends_early_leaves_nothing(uploads):
    ident = uploads.new_image()
    conn = uploads.start_upload(ident, 2 * MIB)
    conn.send(os.urandom(MIB))
    conn.sock.shutdown(socket.SHUT_WR)  # the client stops sending, and says so
    status, body = answer(conn)
    assert status == 400 and body["error_id"] == "image/invalid", body
    assert f"ended after {MIB} of {2 * MIB} bytes" in body["message"]
    assert list(uploads.store.iterdir()) == []
    status, body = uploads.call("GET", f"image/{ident}")
    assert body["data"]["state"] == "queued"


def test_a_chunked_body_that_breaks_off_leaves_nothing(uploads):
    ident = uploads.new_image()
    conn = uploads.connection()
    conn.putrequest("PUT", f"/api/v1/image/{ident}/file")
    conn.putheader("Authorization", f"Bearer {uploads.token}")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"%x\r\n%s\r\n" % (MIB, os.urandom(MIB)))  # and never the last chunk
    conn.sock.shutdown(socket.SHUT_WR)
    status, body = answer(conn)
    assert status == 400 and body["error_id"] == "image/invalid", body
    assert "broke off after" in body["message"]
    assert list(uploads.store.iterdir()) == []
    assert uploads.call("GET", f"image/{ident}")[1]["data"]["state"] == "queued"


def test_worker_memory_does_not_grow_with_the_upload(uploads):
    (worker,) = worker_pids(uploads.master)
    zeros = bytes(MIB)
    peaks = []
    for size in (64 * MIB, GIB):  # 1 GiB is also exactly the configured limit
        ident = uploads.new_image()
        conn = uploads.start_upload(ident, size)
        for _ in range(size // MIB):
            conn.send(zeros)
        status, body = answer(conn)
        assert status == 200, body
        assert body["data"]["size"] == size
        peaks.append(peak_rss(worker))
        assert uploads.call("DELETE", f"image/{ident}")[0] == 200
    assert worker_pids(uploads.master) == [worker]
    small, large = peaks
    # 960 MiB more sent; the worker's peak may move by a few buffers, not by the file
    assert large - small < 32 * MIB, (small // MIB, large // MIB)
