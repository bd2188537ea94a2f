"""Moving a VM (issue 15): a live migration through the API against ``virsh migrate`` of the
same domain between the same two hosts, alternating in the same run (target: at most
1.2 x virsh's median), and the guest's downtime as libvirt reports it for each.

The hosts are two private libvirtd daemons on this machine (tests/hypervisor/two_hosts.py,
as the hypervisor tier uses). The guest is the test guest booted from its image through
the API, counting on its console; its disks (root overlay, seed) are in a pool both hosts
see, declared shared, so neither side copies disks and the two move the same thing: its
memory. vmapi runs in-process (Flask's test client) with everything a move does: the
lock, the claim on the target, the checks of the disks there, the console log's place,
the migration, the record. virsh is one process that connects to the source libvirtd and
asks for the same flags (``--live --p2p --persistent --undefinesource --unsafe``, the
stream on 127.0.0.1). Each round moves the guest a→b→a with vmapi, then a→b→a with virsh,
so the database is right whenever vmapi moves.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import INSTALLATION, MIB, admin_token, database, median, p95
from bench.placement import verdict
from tests.conftest import node_body

ROUNDS = 6
ADDRESS = "127.0.0.1"


def run() -> list[str]:
    from tests.guest import console
    from tests.guest.build import GuestUnavailable, ensure_guest_image
    from tests.hypervisor.two_hosts import HostUnavailable, check_machine, two_hosts

    title = "#### Moving a VM: POST /vm/<id>/migrate vs virsh migrate"
    try:
        check_machine()
        image = ensure_guest_image()
    except (HostUnavailable, GuestUnavailable) as exc:
        return [title, "", f"Not run: {exc}", ""]
    with two_hosts() as hosts, database() as url, tempfile.TemporaryDirectory() as tmp:
        shared = hosts.shared / "pool"
        shared.mkdir(mode=0o755)
        measured = measure(url, hosts, shared, image.path, Path(tmp), console)
    api_ms, virsh_ms, api_down, virsh_down = measured
    ratio = median(api_ms) / median(virsh_ms)
    return [
        title,
        "",
        f"{ROUNDS} alternating rounds after one warm-up, each moving the test guest (256 MiB,"
        " TCG, counting on its console) a→b→a through vmapi and a→b→a with virsh between two"
        " private libvirtd hosts on this machine; the disks in a shared pool (nothing copied).",
        "",
        "| | median ms | p95 ms | downtime median ms | downtime max ms |",
        "|---|---:|---:|---:|---:|",
        f"| vmapi POST /vm/<id>/migrate | {median(api_ms):.0f} | {p95(api_ms):.0f} |"
        f" {median(api_down):.0f} | {max(api_down):.0f} |",
        f"| virsh migrate --live --p2p | {median(virsh_ms):.0f} | {p95(virsh_ms):.0f} |"
        f" {median(virsh_down):.0f} | {max(virsh_down):.0f} |",
        "",
        f"Target vmapi ≤ 1.2 x virsh: {ratio:.2f} x — {verdict(ratio <= 1.2)}.",
        "",
    ]


def measure(url: str, hosts: Any, shared: Path, image: Path, store: Path, console: Any):
    from vmapi.app import create_app
    from vmapi.extensions import db
    from vmapi.services.nodes.hosts import DRIVER_KEY

    app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "LIBVIRT_TIMEOUT": 60.0,
                      "INSTALLATION_ID": INSTALLATION, "IMAGE_DIR": str(store),
                      "MIGRATION_TIMEOUT": 300.0})  # fmt: skip
    driver = app.extensions[DRIVER_KEY]
    client = app.test_client()
    headers = {"Authorization": f"Bearer {admin_token(url)}"}

    def call(method: str, path: str, extra: dict[str, str] | None = None, **kw: Any) -> Any:
        sent = {**headers, **(extra or {})}
        answer = client.open(f"/api/v1/{path}", method=method, headers=sent, **kw)
        assert answer.status_code < 300, answer.get_data(as_text=True)
        return answer.json["data"]

    try:
        # the root disks' and seeds' type is shared, in one folder both hosts see
        call("PATCH", "storage_type/1", json={"shared": True})
        call("POST", "ipv4", json={"network": "198.51.100.0/24", "gateway": "198.51.100.1"})
        call("POST", "ipv6", json={"network": "2001:db8:100::/64", "gateway": "2001:db8:100::1"})
        nodes = {}
        for name, host in (("a", hosts.a), ("b", hosts.b)):
            body = {"node": node_body(libvirt_uri=host.uri, interface_mode="user",
                                      reserved_ram=0, migration_address=ADDRESS),
                    "virt_method": {"name": "QEMU"}, "local_storage_path": str(shared)}  # fmt: skip
            nodes[name] = call("POST", "virt_node", json=body)["node"]["id"]
        made = call("POST", "image", json={"name": "guest", "format": "raw"})
        with open(image, "rb") as body:
            call("PUT", f"image/{made['id']}/file", {"Content-Type": "application/octet-stream"},
                 data=body)  # fmt: skip
        body = {"cores": 1, "ram": 256 * MIB, "virt_method": {"id": 2},
                "image": {"id": made["id"]}, "node": {"id": nodes["a"]}}  # fmt: skip
        vm = call("POST", "vm", json=body)
        log = f"vm/{vm['id']}/console_log?bytes=65536"
        console.wait_for(lambda: call("GET", log)["text"], lambda t: "VMAPI-TICK 2" in t,
                         "the guest's second tick")  # fmt: skip
        uris = {"a": hosts.a.uri, "b": hosts.b.uri}
        api_ms, virsh_ms, api_down, virsh_down = [], [], [], []
        for round_ in range(ROUNDS + 1):  # the first round warms both up, uncounted
            for there in ("b", "a"):
                started = time.perf_counter()
                call("POST", f"vm/{vm['id']}/migrate", json={"node": {"id": nodes[there]}})
                took = (time.perf_counter() - started) * 1000
                stats = driver.last_migration(uris[there], vm["domain_name"])
                if round_:
                    api_ms.append(took)
                    api_down.append((stats.downtime or 0) * 1000)
            for here, there in (("a", "b"), ("b", "a")):
                started = time.perf_counter()
                subprocess.run(
                    ["virsh", "-q", "-c", uris[here], "migrate", "--live", "--p2p",
                     "--persistent", "--undefinesource", "--unsafe", "--migrateuri",
                     f"tcp://{ADDRESS}", "--listen-address", ADDRESS, vm["domain_name"],
                     uris[there]],
                    check=True, capture_output=True, timeout=300,
                )  # fmt: skip
                took = (time.perf_counter() - started) * 1000
                stats = driver.last_migration(uris[there], vm["domain_name"])
                if round_:
                    virsh_ms.append(took)
                    virsh_down.append((stats.downtime or 0) * 1000)
        # the log of the node it ends on holds only what it printed after moving there
        assert "VMAPI-GUEST" not in call("GET", log)["text"], "the guest restarted"
        return api_ms, virsh_ms, api_down, virsh_down
    finally:
        with app.app_context():
            db.engine.dispose()
        driver.connections.clear()
