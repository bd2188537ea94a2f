"""Network protection on a real libvirtd (issue 23).

1. POST /vm with the guard and a security group of 20 rules against POST /vm without
   any filter (the node in QEMU's ``user`` mode, which vmapi does not guard), alternating
   in the same run (target: at most 1.15 x). Disk-less guests (SeaBIOS only): what is
   timed is vmapi's work and libvirt's, not a boot.
2. A rule change reaching 20 running guests on one node: POST /security_group_rule (its
   answer comes once libvirt re-applied the group's filter to every guest using it)
   against the floor, the same filter redefined by hand with ``virsh nwfilter-define``,
   side by side (target: at most 1.2 x).

vmapi runs in-process (Flask's test client) on ``qemu:///system``; the bridge is one of
the benchmark's own with no address (nothing leaves it), removed at the end with
everything the run defined.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import GIB, INSTALLATION, MIB, admin_token, database, median, p95, populate
from bench.placement import verdict
from tests.conftest import node_body
from vmapi.app import create_app
from vmapi.extensions import db

URI = "qemu:///system"
ROUNDS = 6
GUESTS = 20
RULES = 20


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def remove_ours(conn: Any) -> None:
    """Every domain and network filter this run's installation made."""
    for dom in conn.listAllDomains():
        if dom.name().startswith(f"{INSTALLATION}-"):
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    names = [n for n in conn.listNWFilters() if n.startswith(f"{INSTALLATION}-")]
    order = {"nic": 0, "sg": 1}
    start = len(INSTALLATION) + 1
    for name in sorted(names, key=lambda n: order.get(n[start:].split("-")[0], 2)):
        conn.nwfilterLookupByName(name).undefine()


def run() -> list[str]:
    import libvirt

    try:
        conn = libvirt.open(URI)
        conn.listNWFilters()
    except libvirt.libvirtError as exc:
        return ["#### Network filters", "", f"Not run: libvirtd or its filters: {exc}", ""]
    bridge = f"vmapi-bf{uuid.uuid4().hex[:6]}"
    plain_ms, guarded_ms, change_ms, floor_ms = [], [], [], []
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        populate(url, 0, 0, URI, addresses=2 * ROUNDS + GUESTS + 10)
        app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "LIBVIRT_TIMEOUT": 120.0,
                          "INSTALLATION_ID": INSTALLATION, "SHUTDOWN_TIMEOUT": 0.5,
                          "IMAGE_DIR": tmp})  # fmt: skip
        client = app.test_client()
        headers = {"Authorization": f"Bearer {admin_token(url)}"}

        def call(method: str, path: str, **kw: Any) -> Any:
            answer = client.open(f"/api/v1/{path}", method=method, headers=headers, **kw)
            assert answer.status_code < 300, answer.json
            return answer.json["data"] if answer.is_json else None

        def create(node: int, **fields: Any) -> tuple[float, int]:
            body = {"cores": 1, "ram": 64 * MIB, "virt_method": {"id": method},
                    "node": {"id": node}, **fields}  # fmt: skip
            started = time.perf_counter()
            vm = call("POST", "vm", json=body)
            return (time.perf_counter() - started) * 1000, vm["id"]

        try:
            ip("link", "add", bridge, "type", "bridge")
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{bridge}.disable_ipv6=1"],
                           check=True, timeout=30)  # fmt: skip
            ip("link", "set", bridge, "up")
            plain = call("POST", "virt_node", json={
                "node": node_body(libvirt_uri=URI, interface_mode="user", cores=64, ram=64 * GIB),
                "virt_method": {"name": "QEMU"}})  # fmt: skip
            method = plain["virt_method"]["id"]
            guarded = call("POST", "virt_node", json={
                "node": node_body(libvirt_uri=URI, interface_mode="bridge", bridge=bridge,
                                  cores=64, ram=64 * GIB),
                "virt_method": {"id": method}})  # fmt: skip
            group = call("POST", "security_group", json={"name": "web"})
            for n in range(RULES):
                call("POST", "security_group_rule", json={
                    "security_group": {"id": group["id"]}, "direction": "ingress",
                    "ethertype": "ipv4" if n % 2 else "ipv6", "protocol": "tcp",
                    "port_min": 8000 + n, "port_max": 8000 + n})  # fmt: skip
            groups = [{"id": group["id"]}]
            for fields in ({}, {"security_groups": groups}):  # warm-up, not timed
                _ms, vm = create(plain["node"]["id"] if not fields else guarded["node"]["id"],
                                 **fields)  # fmt: skip
                call("DELETE", f"vm/{vm}")
            for _ in range(ROUNDS):
                ms, vm = create(plain["node"]["id"])
                plain_ms.append(ms)
                call("DELETE", f"vm/{vm}")
                ms, vm = create(guarded["node"]["id"], security_groups=groups)
                guarded_ms.append(ms)
                call("DELETE", f"vm/{vm}")
            for _ in range(GUESTS):
                create(guarded["node"]["id"], security_groups=groups)
            name = f"{INSTALLATION}-sg-{group['id']}"
            held = conn.nwfilterLookupByName(name).XMLDesc()
            rule = {"security_group": {"id": group["id"]}, "direction": "ingress",
                    "ethertype": "ipv4", "protocol": "tcp", "port_min": 9000,
                    "port_max": 9000}  # fmt: skip
            for _ in range(ROUNDS):
                started = time.perf_counter()
                made = call("POST", "security_group_rule", json=rule)
                change_ms.append((time.perf_counter() - started) * 1000)
                changed = conn.nwfilterLookupByName(name).XMLDesc()
                call("DELETE", f"security_group_rule/{made['id']}")
                # the floor: the same change of the same filter, by hand
                path = Path(tmp) / "changed.xml"
                path.write_text(changed)
                started = time.perf_counter()
                subprocess.run(["virsh", "-c", URI, "nwfilter-define", str(path)],
                               check=True, capture_output=True, timeout=300)  # fmt: skip
                floor_ms.append((time.perf_counter() - started) * 1000)
                path.write_text(held)
                subprocess.run(["virsh", "-c", URI, "nwfilter-define", str(path)],
                               check=True, capture_output=True, timeout=300)  # fmt: skip
        finally:
            with app.app_context():
                db.engine.dispose()
            remove_ours(conn)
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
            conn.close()
    ratio = median(guarded_ms) / median(plain_ms)
    change = median(change_ms) / median(floor_ms)
    return [
        "#### Network filters: POST /vm with the guard and a group, and a rule change",
        "",
        f"{ROUNDS} alternating rounds after a warm-up; vmapi in-process on {URI}; disk-less "
        f"guests. 'guarded': a node in bridge mode, the VM's NIC guarded and in a group of "
        f"{RULES} rules; 'without': a node in user mode (no filter).",
        "",
        "| POST /vm | median ms | p95 ms |",
        "|---|---:|---:|",
        f"| without filters | {median(plain_ms):.1f} | {p95(plain_ms):.1f} |",
        f"| guarded, group of {RULES} rules | {median(guarded_ms):.1f} | {p95(guarded_ms):.1f} |",
        "",
        f"Target guarded ≤ 1.15 x without: {ratio:.2f} x — {verdict(ratio <= 1.15)}.",
        "",
        f"A rule added to the group of {GUESTS} running guests on one node (POST "
        "/security_group_rule, answered once libvirt re-applied the filter) against the "
        "same filter redefined by hand (`virsh nwfilter-define`), alternating:",
        "",
        "| | median ms | p95 ms |",
        "|---|---:|---:|",
        f"| floor: virsh nwfilter-define | {median(floor_ms):.1f} | {p95(floor_ms):.1f} |",
        f"| POST /security_group_rule | {median(change_ms):.1f} | {p95(change_ms):.1f} |",
        "",
        f"Target ≤ 1.2 x the floor: {change:.2f} x — {verdict(change <= 1.2)}.",
        "",
    ]
