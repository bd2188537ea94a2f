"""Item 4, a real hypervisor: POST /vm with the seed's example (2 vCPUs, 1 GiB, KVM)
on a real libvirtd with QEMU, against ``virsh define`` + ``virsh start`` of the same
domain XML, alternating in the same run. Target: median ≤ 1.25 x virsh's.

vmapi runs in-process (Flask's test client) with everything a create does: auth,
schemas, scheduler, claim, addresses, domain XML, define, start, state. virsh is two
processes, each connecting to libvirtd, as an admin would do it by hand. The XML given
to virsh is the one vmapi defined (inactive form), with a new name and UUID. Each
domain is removed after it is timed (not timed). KVM when /dev/kvm works, else TCG.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.common import GIB, INSTALLATION, admin_token, database, median, p95, populate
from bench.placement import verdict
from tests.conftest import node_body
from vmapi.app import create_app
from vmapi.extensions import db

URI = "qemu:///system"
ROUNDS = 15


def kvm_works() -> bool:
    done = subprocess.run(["virsh", "-c", URI, "domcapabilities", "--virttype", "kvm"],
                          capture_output=True, timeout=180)  # fmt: skip
    return done.returncode == 0


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", URI, *args], check=True, capture_output=True)


def run() -> list[str]:
    import libvirt

    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        return ["#### 4. Real hypervisor", "", f"Not run: libvirtd does not answer: {exc}", ""]
    kind = "KVM" if kvm_works() else "QEMU"
    vmapi_ms, virsh_ms = [], []
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        populate(url, 0, 0, URI, addresses=ROUNDS + 10)
        app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING", "LIBVIRT_TIMEOUT": 120.0,
                          "INSTALLATION_ID": INSTALLATION, "SHUTDOWN_TIMEOUT": 0.5})  # fmt: skip
        client = app.test_client()
        headers = {"Authorization": f"Bearer {admin_token(url)}"}
        body = {"node": node_body(libvirt_uri=URI, interface_mode="user"),
                "virt_method": {"name": kind}}  # fmt: skip
        made = client.post("/api/v1/virt_node", json=body, headers=headers)
        assert made.status_code == 201, made.json
        method = made.json["data"]["virt_method"]["id"]
        example = {"cores": 2, "ram": GIB, "virt_method": {"id": method}}
        try:
            for i in range(ROUNDS + 1):  # the first round warms both up and is not counted
                started = time.perf_counter()
                response = client.post("/api/v1/vm", json=example, headers=headers)
                elapsed = (time.perf_counter() - started) * 1000
                assert response.status_code == 201, response.json
                dom = conn.lookupByName(response.json["data"]["domain_name"])
                xml = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                gone = client.delete(f"/api/v1/vm/{response.json['data']['id']}", headers=headers)
                assert gone.status_code == 200, gone.json
                name = f"{INSTALLATION}-virsh-{i}"
                xml.find("name").text = name
                xml.find("uuid").text = str(uuid.uuid4())
                path = Path(tmp) / f"{name}.xml"
                ET.ElementTree(xml).write(path, encoding="unicode")
                started = time.perf_counter()
                virsh("define", str(path))
                virsh("start", name)
                by_hand = (time.perf_counter() - started) * 1000
                twin = conn.lookupByName(name)
                twin.destroy()
                twin.undefine()
                if i:
                    vmapi_ms.append(elapsed)
                    virsh_ms.append(by_hand)
        finally:
            with app.app_context():
                db.engine.dispose()
            conn.close()
    ratio = median(vmapi_ms) / median(virsh_ms)
    return [
        f"#### 4. Real hypervisor: the seed's POST /vm on libvirtd with {kind}",
        "",
        f"{ROUNDS} alternating rounds after one warm-up; vmapi in-process; virsh is"
        " `virsh define` + `virsh start` of the same XML.",
        "",
        "| | median ms | p95 ms |",
        "|---|---:|---:|",
        f"| vmapi POST /vm | {median(vmapi_ms):.1f} | {p95(vmapi_ms):.1f} |",
        f"| virsh define + start | {median(virsh_ms):.1f} | {p95(virsh_ms):.1f} |",
        "",
        f"Target vmapi ≤ 1.25 x virsh: {ratio:.2f} x — {verdict(ratio <= 1.25)}.",
        "",
    ]
