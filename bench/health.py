"""Issue 22, how long a sweep over a fleet with hung hosts takes: ``flask vmapi node check``
and ``flask vmapi reconcile`` with HUNG hosts that accept a connection and never answer
(loopback listeners) beside one healthy test-driver host, LIBVIRT_TIMEOUT = 1 s.

All nodes are asked at once, so hung hosts cost about one timeout in all, not one each:
the tests prove the overlap with a barrier (tests/api/test_node_check.py); the time it
buys is measured here. Target: each sweep under 2 x the timeout whatever HUNG is.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import TEST_DRIVER_DIR, admin_token, database, host_file
from tests.conftest import Api, node_body
from vmapi.app import create_app
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

TIMEOUT = 1.0
HUNG = (1, 4, 16)


@contextlib.contextmanager
def silent_host() -> Iterator[str]:
    """A TCP port on loopback that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"qemu+tcp://127.0.0.1:{server.getsockname()[1]}/system"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def sweep(hung: int, uri: str, folder: Path) -> tuple[float, float]:
    """Seconds for one node check and one reconcile over ``hung`` hung nodes and a healthy one."""
    with database() as url:
        app = create_app({"DATABASE_URL": url, "LIBVIRT_TIMEOUT": TIMEOUT,
                          "TEST_DRIVER_DIR": TEST_DRIVER_DIR, "LOG_LEVEL": "WARNING"})  # fmt: skip
        api = Api(app.test_client(), admin_token(url))
        uris = [f"test://{host_file(folder)}"] + [uri] * hung
        for libvirt_uri in uris:
            made = api.post("node", json=node_body(libvirt_uri=libvirt_uri, cores=64,
                                                   ram=64 * 1024**3))  # fmt: skip
            assert made.status_code == 201, made.json
        runner = app.test_cli_runner()
        took = []
        for command in (["vmapi", "node", "check"], ["vmapi", "reconcile"]):
            started = time.monotonic()
            result = runner.invoke(args=command)
            took.append(time.monotonic() - started)
            assert result.exit_code == 1, result.output  # the hung ones are reported
        app.extensions[DRIVER_KEY].connections.clear()
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
    return took[0], took[1]


def run() -> list[str]:
    lines = [
        "## Sweeps over hung hosts (issue 22)",
        "",
        f"One healthy test-driver host and HUNG hosts that never answer; LIBVIRT_TIMEOUT "
        f"{TIMEOUT:g} s. In series a sweep would take HUNG x {TIMEOUT:g} s at least.",
        "",
        "| hung hosts | node check (s) | reconcile (s) | in series at least (s) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    with silent_host() as uri, tempfile.TemporaryDirectory(dir=TEST_DRIVER_DIR) as folder:
        for hung in HUNG:
            check, reconcile = sweep(hung, uri, Path(folder))
            lines.append(f"| {hung} | {check:.2f} | {reconcile:.2f} | {hung * TIMEOUT:.0f} |")
    return lines
