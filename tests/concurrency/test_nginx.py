"""A real nginx, with the shipped proxy settings, in front of a real gunicorn."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.concurrency.conftest import ROOT, free_port
from tests.conftest import unavailable

pytestmark = [pytest.mark.concurrency]

SITE = (ROOT / "deploy/nginx/vmapi-site.conf").read_text()
#: run as root, nginx's workers would be nobody; they must reach the test's files
WORKER_USER = "user root;\n" if os.geteuid() == 0 else ""


@pytest.fixture(scope="module")
def nginx(served, tmp_path_factory):
    """The module's nginx in front of the module's gunicorn (``served``)."""
    with serve_nginx(served.url, tmp_path_factory.mktemp("nginx")) as url:
        yield url


def local_paths(site: str, tmp_path: Path, store: Path | None = None) -> str:
    """The site's own files in ``tmp_path``: the spool's socket (in a short directory of
    its own: a socket's path has at most 107 bytes) and temporary files, and the image
    store it serves downloads from (``store``)."""
    sockets = Path(tempfile.mkdtemp(prefix="vmapi-nginx-"))
    sockets.chmod(0o755)  # nginx's workers connect to the socket in it
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    site = (site.replace("/run/nginx-vmapi-spool.sock", f"{sockets}/spool.sock")
            .replace("client_body_temp_path /var/lib/nginx/vmapi-spool;",
                     f"client_body_temp_path {spool};"))  # fmt: skip
    if store is not None:
        site = site.replace("alias /var/lib/vmapi/images/;", f"alias {store}/;")
    return site


@contextlib.contextmanager
def serve_nginx(upstream_url, tmp_path, site=SITE, store=None):
    """The shipped site (made local) in front of ``upstream_url``, until the block ends;
    downloads vmapi hands to nginx come from ``store``."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        unavailable("nginx is not installed")
    port = free_port()
    upstream = upstream_url.removeprefix("http://")
    # The shipped site, made local: plain HTTP on a free port, the test's gunicorn upstream.
    site = (site.replace("server 127.0.0.1:8000;", f"server {upstream};")
            .replace("listen 443 ssl;", f"listen 127.0.0.1:{port};")
            .replace("listen 80;", f"listen 127.0.0.1:{free_port()};")
            .replace("include /etc/nginx/vmapi-proxy.conf;", f"include {ROOT}/deploy/nginx/vmapi-proxy.conf;"))  # fmt: skip
    site = local_paths(site, tmp_path, store)
    site = "\n".join(line for line in site.splitlines() if "ssl_certificate" not in line)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        # nginx's workers read the test's image store and write its spool under the
        # test's private temporary directory (as root: the user the test runs as)
        f"{WORKER_USER}daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        "events {}\nhttp {\n"
        f"access_log off;\nclient_body_temp_path {tmp_path};\nproxy_temp_path {tmp_path};\n"
        f"{site}\n}}\n"
    )
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        process.kill()
        raise RuntimeError((tmp_path / "error.log").read_text())
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        for socket_dir in re.findall(r"listen unix:(\S+)/spool\.sock;", site):
            shutil.rmtree(socket_dir, ignore_errors=True)


def call(url, token, method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/api/v1/{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_every_verb_through_nginx(server, nginx):
    status, headers, body = call(nginx, server.token, "POST", "node_state", {"name": "draining"})
    assert status == 201 and body["data"]["name"] == "draining"
    ident = body["data"]["id"]
    assert len(headers["X-Request-Id"]) == 32  # nginx's $request_id, handed on and echoed
    status, _, body = call(
        nginx, server.token, "UPDATE", "node_state", {"id": ident, "schedulable": True}
    )
    assert status == 200 and body["data"]["schedulable"] is True
    status, _, body = call(nginx, server.token, "UPDATE", f"node_state/{ident}", {"name": "drain2"})
    assert status == 200 and body["data"]["name"] == "drain2"
    status, _, body = call(
        nginx, server.token, "PATCH", f"node_state/{ident}", {"schedulable": False}
    )
    assert status == 200 and body["data"]["schedulable"] is False
    status, _, body = call(nginx, server.token, "GET", "node_state?name=drain2")
    assert status == 200 and list(body["data"]) == [str(ident)]
    status, _, body = call(nginx, server.token, "DELETE", f"node_state/{ident}")
    assert status == 200 and body["data"]["id"] == ident
    status, _, body = call(nginx, server.token, "GET", f"node_state/{ident}")
    assert status == 404 and body["error_id"] == "node_state/not_found"


def test_oversized_body_is_an_envelope_from_nginx(server, nginx):
    status, _, body = call(
        nginx, server.token, "POST", "node_state", {"name": "x" * (2 * 1024 * 1024)}
    )
    assert status == 413 and body["error_id"] == "general/body_too_large"


def test_a_client_request_id_passes_through(server, nginx):
    status, headers, _ = call(nginx, server.token, "GET", "node_state",
                              headers={"X-Request-Id": "puppet-run-42"})  # fmt: skip
    assert status == 200 and headers["X-Request-Id"] == "puppet-run-42"


def test_metrics_are_not_served_to_the_outside(server, nginx):
    request = urllib.request.Request(f"{nginx}/metrics")
    request.add_header("Authorization", f"Bearer {server.token}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403  # nginx's deny, before gunicorn
    request = urllib.request.Request(f"{server.url}/metrics")  # gunicorn's own port
    request.add_header("Authorization", f"Bearer {server.token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert b"vmapi_http_requests_total" in response.read()
