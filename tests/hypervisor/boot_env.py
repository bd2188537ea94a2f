"""A vmapi of its own on the real libvirtd for the boot-from-image tests: a database, an app
and a node on ``qemu:///system``, shared by a module's tests so a booted guest (about 10 s
under TCG) serves them all.

Everything it makes on the host carries this session's test installation id (domains,
volumes, and the pools it uses in place of the shared ``vmapi`` one), so parallel runs
never meet, and is removed at the end, also when a test failed. Pools an interrupted
run left behind are removed once they are a day old.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from flask import Flask

from tests.conftest import (
    GIB,
    MIB,
    Api,
    create_database,
    drop_database,
    make_token,
    migrate,
    node_body,
)
from tests.domains import tagged_domains
from tests.guest import console
from tests.hypervisor.qemu_host import INSTALLATION, MARKER, URI
from tests.image_files import OCTET
from vmapi.app import create_app
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

#: pools of this session (the seeded local-qcow2 type is pointed at IMAGE_POOL)
IMAGE_POOL = f"{INSTALLATION}-images"
LOG_POOL = f"{INSTALLATION}-logs"
LOG_DIR = f"/var/lib/libvirt/{LOG_POOL}"
#: a test pool untouched this long belongs to no running session (a session lasts hours)
LEFTOVER_AGE = 24 * 3600.0


def config(database_url: str, image_dir: Path) -> dict[str, Any]:
    return {"DATABASE_URL": database_url, "TESTING": True, "INSTALLATION_ID": INSTALLATION,
            "LIBVIRT_TIMEOUT": 60.0, "SHUTDOWN_TIMEOUT": 1.0, "IMAGE_DIR": str(image_dir),
            "CONSOLE_LOG_POOL": LOG_POOL, "CONSOLE_LOG_DIR": LOG_DIR}  # fmt: skip


@dataclass
class BootEnv:
    app: Flask
    api: Api
    conn: libvirt.virConnect
    node: dict[str, Any]
    method: int  # QEMU (domain type qemu: this machine's KVM cannot run a guest kernel)

    def create(self, image_id: int, **fields: Any) -> dict[str, Any]:
        body = {"cores": 1, "ram": 256 * MIB, "virt_method": {"id": self.method},
                "image": {"id": image_id}, **fields}  # fmt: skip
        response = self.api.post("vm", json=body)
        assert response.status_code == 201, response.json
        return response.json["data"]

    def upload(self, path: Path, name: str = "guest", fmt: str = "raw") -> dict[str, Any]:
        made = self.api.post("image", json={"name": name, "format": fmt})
        assert made.status_code == 201, made.json
        with open(path, "rb") as body:
            sent = self.api.call("PUT", f"image/{made.json['data']['id']}/file", data=body,
                                 headers=OCTET)  # fmt: skip
        assert sent.status_code == 200, sent.json
        return sent.json["data"]

    def console(self, vm_id: int) -> Callable[[], str]:
        """A reader of the VM's console log through the API."""

        def read() -> str:
            answer = self.api.get(f"vm/{vm_id}/console_log?bytes=1048576")
            assert answer.status_code == 200, answer.json
            return answer.json["data"]["text"]

        return read

    def pool_volumes(self, pool: str = IMAGE_POOL) -> list[str]:
        try:
            found = self.conn.storagePoolLookupByName(pool)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise  # (a timeout or a lost connection is no clean host)
            return []
        found.refresh(0)
        return sorted(found.listVolumes())

    def filters(self) -> list[str]:
        """This installation's network filters on the host."""
        return sorted(f for f in self.conn.listNWFilters() if f.startswith(f"{INSTALLATION}-"))

    def ours(self) -> list[str]:
        """Every volume of this installation in its pools, its domains and its network
        filters (the last VM using one takes it with it)."""
        volumes = [v for pool in (IMAGE_POOL, LOG_POOL) for v in self.pool_volumes(pool)]
        domains = [d.name() for d in tagged_domains(self.conn, INSTALLATION)]
        return sorted(volumes + domains + self.filters())


def remove_pool(conn: libvirt.virConnect, name: str) -> None:
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        return
    if not pool.isActive():
        pool.create(0)
    pool.refresh(0)
    for vol in pool.listAllVolumes():
        vol.delete(0)
    pool.destroy()
    pool.delete(0)
    pool.undefine()


def remove_domains(conn: libvirt.virConnect, marker: str) -> None:
    for dom in tagged_domains(conn, marker):
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def remove_filters(conn: libvirt.virConnect, marker: str) -> None:
    """The installation's network filters, those that reference others first."""
    names = [name for name in conn.listNWFilters() if name.startswith(f"{marker}-")]
    order = {"nic": 0, "sg": 1}
    for name in sorted(names, key=lambda n: order.get(n[len(marker) + 1 :].split("-")[0], 2)):
        conn.nwfilterLookupByName(name).undefine()


def remove_leftovers(conn: libvirt.virConnect) -> None:
    """The pools an interrupted run of an earlier session left. Only old ones: a pool of
    another session running now (its own installation id) must stay."""
    for pool in conn.listAllStoragePools():
        name = pool.name()
        if not (name.startswith(MARKER) and name.endswith(("-images", "-logs"))):
            continue
        path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or ""
        try:
            idle = time.time() - os.stat(path).st_mtime
        except OSError:
            idle = LEFTOVER_AGE
        if name not in (IMAGE_POOL, LOG_POOL) and idle >= LEFTOVER_AGE:
            remove_pool(conn, name)


@contextmanager
def boot_env(pg_server: str, image_dir: Path) -> Iterator[BootEnv]:
    conn = libvirt.open(URI)
    url = create_database(pg_server)
    app = None
    try:
        remove_leftovers(conn)
        migrate(url)
        app = create_app(config(url, image_dir))
        api = Api(app.test_client(), make_token(app, "admin"))
        assert api.update("storage_type/1", json={"pool": IMAGE_POOL}).status_code == 200
        for network, gateway in (("198.51.100.0/24", "198.51.100.1"),
                                 ("2001:db8:100::/64", "2001:db8:100::1")):  # fmt: skip
            version = "ipv4" if "." in network else "ipv6"
            assert (
                api.post(version, json={"network": network, "gateway": gateway}).status_code == 201
            )
        body = {"node": node_body(libvirt_uri=URI, interface_mode="user"),
                "virt_method": {"name": "QEMU"}}  # fmt: skip
        made = api.post("virt_node", json=body)
        assert made.status_code == 201, made.json
        node = api.get(f"node/{made.json['data']['node']['id']}").json["data"]
        yield BootEnv(app, api, conn, node, made.json["data"]["virt_method"]["id"])
    finally:
        remove_domains(conn, INSTALLATION)
        remove_filters(conn, INSTALLATION)
        for pool in (IMAGE_POOL, LOG_POOL):
            remove_pool(conn, pool)
        if app is not None:
            with app.app_context():
                db.session.remove()
                db.engine.dispose()
            app.extensions[DRIVER_KEY].connections.clear()
        drop_database(pg_server, url)
        conn.close()


def wait_for_guest(read: Callable[[], str], ticks: int = 1) -> console.Boot:
    """The guest's (last) boot once it printed ``ticks`` ticks."""
    text = console.wait_for(
        read, lambda t: bool(console.boots(t)) and len(console.boots(t)[-1].ticks) >= ticks,
        f"the guest's line and {ticks} tick(s) in the console log",
    )  # fmt: skip
    return console.boots(text)[-1]


def seconds(start: float) -> float:
    return round(time.monotonic() - start, 2)


GIB_SECTORS = GIB // 512
