"""Slow image transfers through the shipped nginx site and a real gunicorn (two sync
workers), and directly through gunicorn.

- Every transfer slot taken by crawling uploads (more of them than workers): /health
  and the API keep answering; a second upload of an image being sent is 409
  image/busy; the customer's next transfer is 429 with Retry-After. Released, each
  upload completes and its checksum is the file's.
- A download through nginx is the file, byte for byte, sent by nginx: vmapi's own
  answer is an X-Accel-Redirect without a body.
- Directly (no nginx), an upload below VMAPI_TRANSFER_MIN_RATE is cut with 400
  image/invalid while the client still holds its connection, and its worker is free.

Crawling clients are raw sockets driven from threads; the test waits on what they made
(nginx's spool files), never on how long anything took.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.concurrency.conftest import ROOT, gunicorn
from tests.concurrency.test_nginx import serve_nginx
from tests.conftest import create_database, drop_database, migrate, unavailable
from vmapi.config import DEFAULTS

pytestmark = [pytest.mark.concurrency]

#: transfers in flight per token in the shipped site (= VMAPI_TRANSFERS_PER_CUSTOMER)
CAP = DEFAULTS["TRANSFERS_PER_CUSTOMER"][0]  # the shipped site says the same
WORKERS = 2
PIECE = 64 * 1024
SIZE = 16 * PIECE
HELD = 60  # seconds a crawler waits for its release at most (a bound, not a timing)


@dataclass
class Site:
    gunicorn: str
    store: Path
    env: dict
    admin: str
    customer: str

    def call(self, base, token, method, path, body=None, headers=None, raw=None):
        data = json.dumps(body).encode() if body is not None else raw
        request = urllib.request.Request(f"{base}/api/v1/{path}", data=data, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        request.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def new_image(self, base, token):
        status, _, body = self.call(base, token, "POST", "image", {"name": "t", "format": "raw"})
        assert status == 201, body
        return json.loads(body)["data"]["id"]


def token(env, *args):
    flask = [sys.executable, "-m", "flask", "--app", "wsgi", "vmapi", "token", "create", *args]
    out = subprocess.run(flask, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def serve(pg_server, tmp_path, **config):
    if shutil.which("qemu-img") is None:
        unavailable("qemu-img (Debian: qemu-utils) is not installed")
    db_url = create_database(pg_server)
    try:
        migrate(db_url)
        store = tmp_path / "images"
        env = {**os.environ, "VMAPI_DATABASE_URL": db_url, "VMAPI_IMAGE_DIR": str(store),
               "VMAPI_LOG_REQUESTS": "false", "VMAPI_TRANSFERS_PER_CUSTOMER": str(CAP),
               **{f"VMAPI_{key}": str(value) for key, value in config.items()}}  # fmt: skip
        admin, customer = token(env, "--admin"), token(env, "--customer", "7")
        with gunicorn("wsgi:app", env, workers=WORKERS) as (url, _master):
            yield Site(url, store, env, admin, customer)
    finally:
        drop_database(pg_server, db_url)


@pytest.fixture
def behind_nginx(pg_server, tmp_path):
    yield from serve(pg_server, tmp_path, ACCEL_REDIRECT="/_vmapi_image_store/")


@pytest.fixture
def direct(pg_server, tmp_path):
    # No client moves a terabyte a second: the first chunk read is already too slow.
    yield from serve(pg_server, tmp_path, TRANSFER_MIN_RATE=10**12, TRANSFER_MIN_RATE_GRACE=0)


class Crawler(threading.Thread):
    """An upload over a raw socket: the headers and one piece, then nothing until
    released, then the rest (``hold`` False: nothing more, only the answer is read);
    ``answer`` is (status, envelope)."""

    def __init__(self, base: str, token: str, ident: int, data: bytes, hold=True,
                 authorization: str | None = None) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.base, self.token, self.image, self.data = base, token, ident, data
        self.authorization = authorization or f"Bearer {token}"
        self.hold = hold
        self.release = threading.Event()
        self.answer: tuple[int, dict] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        host, port = self.base.removeprefix("http://").split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=HELD + 30) as sock:
                sock.sendall(
                    f"PUT /api/v1/image/{self.image}/file HTTP/1.1\r\nHost: vmapi\r\n"
                    f"Authorization: {self.authorization}\r\n"
                    "Content-Type: application/octet-stream\r\n"
                    f"Content-Length: {len(self.data)}\r\nConnection: close\r\n\r\n".encode()
                )
                sock.sendall(self.data[:PIECE])
                if self.hold:
                    self.release.wait(HELD)
                    sock.sendall(self.data[PIECE:])
                self.answer = parse(read_all(sock))
        except BaseException as exc:  # reported by the test
            self.error = exc


def read_all(sock: socket.socket) -> bytes:
    """The answer, as soon as it is all there (its Content-Length), not at the close: a
    refused upload's connection lingers a while."""
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < length(raw):
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    return raw


def length(raw: bytes) -> int:
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1")
    found = re.search(r"^content-length:\s*(\d+)", head, re.IGNORECASE | re.MULTILINE)
    return int(found.group(1)) if found else 1 << 62


def parse(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def wait_for(what: str, check) -> None:
    deadline = time.monotonic() + HELD
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.05)


def spooled(spool: Path) -> int:
    """Uploads nginx's spool is receiving (a body past nginx's buffer goes to a file)."""
    return sum(1 for p in spool.rglob("*") if p.is_file() and p.stat().st_size > 0)


def test_crawling_uploads_take_no_worker_and_are_counted(behind_nginx, tmp_path):
    site = behind_nginx
    with serve_nginx(site.gunicorn, tmp_path, store=site.store) as proxy:
        # an active image to download later
        done = site.new_image(proxy, site.customer)
        payload = os.urandom(SIZE)
        request = urllib.request.Request(f"{proxy}/api/v1/image/{done}/file", data=payload,
                                         method="PUT")  # fmt: skip
        request.add_header("Authorization", f"Bearer {site.customer}")
        request.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["data"]["checksum"] == sha(payload)

        # every transfer slot of the token taken by a crawler: more than the workers
        assert CAP > WORKERS
        files = [os.urandom(SIZE) for _ in range(CAP)]
        crawlers = [Crawler(proxy, site.customer, site.new_image(proxy, site.customer), data)
                    for data in files]  # fmt: skip
        for crawler in crawlers:
            crawler.start()
        try:
            wait_for(f"{CAP} uploads in nginx's spool", lambda: spooled(tmp_path / "spool") == CAP)

            # the API answers while they crawl: the proof is that it answers at all
            with urllib.request.urlopen(f"{proxy}/health", timeout=30) as response:
                assert response.status == 200
            status, _, body = site.call(proxy, site.customer, "GET", "image")
            assert status == 200 and len(json.loads(body)["data"]) == CAP + 1
            # a second upload of an image being sent (another token: not counted with it)
            status, _, body = site.call(proxy, site.admin, "PUT",
                                        f"image/{crawlers[0].image}/file", body={"x": 1},
                                        headers={"Content-Type": "application/octet-stream"})  # fmt: skip
            assert status == 409 and json.loads(body)["error_id"] == "image/busy", body
            # the token's next transfer, a download
            status, headers, body = site.call(proxy, site.customer, "GET", f"image/{done}/file")
            assert status == 429, body
            assert json.loads(body)["error_id"] == "general/too_many_requests"
            assert int(headers["Retry-After"]) > 0
        finally:
            for crawler in crawlers:
                crawler.release.set()
            for crawler in crawlers:
                crawler.join(HELD + 60)
        for crawler, data in zip(crawlers, files, strict=True):
            assert crawler.error is None, crawler.error
            status, envelope = crawler.answer
            assert status == 200, envelope
            assert envelope["data"]["state"] == "active"
            assert envelope["data"]["checksum"] == sha(data)  # complete and verified
            assert envelope["data"]["size"] == SIZE

        # downloads: nginx sends the file, vmapi only says where it is
        status, headers, body = site.call(proxy, site.customer, "GET", f"image/{done}/file")
        assert status == 200 and body == payload
        assert headers["ETag"] == f'"{sha(payload)}"'
        assert headers["Content-Type"] == "application/octet-stream"
        assert "X-Accel-Redirect" not in headers
        status, headers, body = site.call(site.gunicorn, site.customer, "GET",
                                          f"image/{done}/file")  # fmt: skip
        assert status == 200 and body == b""
        assert headers["X-Accel-Redirect"].startswith("/_vmapi_image_store/image-")
        # no slot stayed taken by any of them; no ranges, as vmapi's own answer
        status, headers, body = site.call(proxy, site.customer, "GET", f"image/{done}/file",
                                          headers={"Range": "bytes=0-9"})  # fmt: skip
        assert status == 200 and body == payload
        # a token vmapi does not know is refused before nginx keeps any byte
        status, _, body = site.call(proxy, "not-a-token", "PUT", f"image/{done}/file",
                                    body={"x": 1},
                                    headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert status == 401 and json.loads(body)["error_id"] == "general/authentication/failed"


def test_only_who_may_upload_to_an_image_holds_its_upload_slot(behind_nginx, tmp_path):
    """Another customer's crawling upload to an image is refused before nginx keeps a
    byte or takes the image's slot, and the owner's upload goes on; so are one to a
    public image (403), to an active one (409) and one over the owner's quota."""
    site = behind_nginx
    other = token(site.env, "--customer", "8")
    with serve_nginx(site.gunicorn, tmp_path, store=site.store) as proxy:
        ident = site.new_image(proxy, site.customer)
        data = os.urandom(SIZE)
        intruder = Crawler(proxy, other, ident, data, hold=False)
        intruder.start()
        wait_for("the intruder answered, or its upload spooled",
                 lambda: intruder.answer or spooled(tmp_path / "spool"))  # fmt: skip
        assert intruder.answer is not None, "the intruder's upload was spooled"
        intruder.join(HELD)
        assert intruder.error is None, intruder.error
        status, envelope = intruder.answer
        assert status == 404 and envelope["error_id"] == "image/not_found", envelope
        assert spooled(tmp_path / "spool") == 0
        # the owner's upload, while the intruder would still be crawling
        owner = Crawler(proxy, site.customer, ident, data)
        owner.start()
        wait_for("the owner's upload in nginx's spool", lambda: spooled(tmp_path / "spool"))
        owner.release.set()
        owner.join(HELD + 60)
        assert owner.error is None, owner.error
        status, envelope = owner.answer
        assert status == 200 and envelope["data"]["checksum"] == sha(data), envelope

        public = site.new_image(proxy, site.admin)
        refusals = [(site.customer, public, 403, "general/authorization/forbidden"),
                    (site.customer, ident, 409, "image/immutable"),
                    ("not-a-token", ident, 401, "general/authentication/failed")]  # fmt: skip
        for caller, image, code, error_id in refusals:
            refused = Crawler(proxy, caller, image, data, hold=False)
            refused.run()
            assert refused.error is None, refused.error
            status, envelope = refused.answer
            assert (status, envelope["error_id"]) == (code, error_id), envelope
        # an image spelled otherwise than nginx counts it (here: escaped)
        status, _, body = site.call(proxy, site.customer, "PUT", f"image/%{ord(str(ident)[0]):x}"
                                    f"{str(ident)[1:]}/file", raw=data,
                                    headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert status == 400 and json.loads(body)["error_id"] == "general/bad_request", body
        # the announced length checked against the owner's quota, before any byte
        status, _, body = site.call(proxy, site.admin, "POST", "quota",
                                    {"customer_id": 7, "max_storage": SIZE + 1})  # fmt: skip
        assert status == 201, body
        fresh = site.new_image(proxy, site.customer)
        refused = Crawler(proxy, site.customer, fresh, data + data, hold=False)
        refused.run()
        status, envelope = refused.answer
        assert status == 403 and envelope["error_id"] == "image/quota_exceeded", envelope
        assert spooled(tmp_path / "spool") == 0


def test_one_token_however_spelled_has_one_cap(behind_nginx, tmp_path):
    """vmapi reads "Bearer <token>" in any case and with any spaces around the token;
    nginx counts all those spellings as the one token."""
    site = behind_nginx
    spellings = [f"Bearer {site.customer}", f"bearer {site.customer}",
                 f"BEARER  {site.customer}", f"bEaReR {site.customer}  ",
                 f"Bearer \t{site.customer}"]  # fmt: skip
    assert len(spellings) >= CAP + 1
    with serve_nginx(site.gunicorn, tmp_path, store=site.store) as proxy:
        done = site.new_image(proxy, site.customer)
        payload = os.urandom(SIZE)
        status, _, body = site.call(proxy, site.customer, "PUT", f"image/{done}/file",
                                    headers={"Content-Type": "application/octet-stream"},
                                    raw=payload)  # fmt: skip
        assert status == 200, body
        crawlers = [Crawler(proxy, site.customer, site.new_image(proxy, site.customer),
                            os.urandom(SIZE), authorization=spelling)
                    for spelling in spellings[:CAP]]  # fmt: skip
        for crawler in crawlers:
            crawler.start()
        try:
            wait_for(f"{CAP} uploads in nginx's spool", lambda: spooled(tmp_path / "spool") == CAP)
            for spelling in spellings:
                status, _, body = site.call(proxy, None, "GET", f"image/{done}/file",
                                                  headers={"Authorization": spelling})  # fmt: skip
                assert status == 429, (spelling, status)
                assert json.loads(body)["error_id"] == "general/too_many_requests"
        finally:
            for crawler in crawlers:
                crawler.release.set()
            for crawler in crawlers:
                crawler.join(HELD + 60)
        for crawler in crawlers:
            assert crawler.error is None, crawler.error
            assert crawler.answer[0] == 200, crawler.answer
        # every spelling is the one token vmapi knows
        for spelling in spellings:
            status, _, body = site.call(proxy, None, "GET", f"image/{done}/file",
                                        headers={"Authorization": spelling})  # fmt: skip
            assert status == 200 and body == payload, spelling


def test_an_upload_below_the_minimum_rate_is_cut_directly(direct):
    site = direct
    ident = site.new_image(site.gunicorn, site.customer)
    crawler = Crawler(site.gunicorn, site.customer, ident, os.urandom(SIZE), hold=False)
    crawler.start()
    # answered while the client still holds its connection, sending nothing more
    crawler.join(HELD)
    assert crawler.error is None, crawler.error
    assert crawler.answer is not None, "the crawling upload was never cut"
    status, envelope = crawler.answer
    assert status == 400 and envelope["error_id"] == "image/invalid", envelope
    assert "VMAPI_TRANSFER_MIN_RATE" in envelope["message"]
    assert not site.store.is_dir() or list(site.store.iterdir()) == []
    with urllib.request.urlopen(f"{site.gunicorn}/health", timeout=30) as response:
        assert response.status == 200


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
