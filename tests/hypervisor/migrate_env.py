"""A vmapi of its own over the two private libvirtd hosts of ``host_pair``: a database, an
app, the test guest's image uploaded through the API, and nodes ``a`` and ``b`` whose
libvirt (and migration) URIs are the two daemons' sockets, each with its own pool folder.
Shared by a module's tests, so booted guests (about 10 s each under TCG) serve several.

Everything it makes carries this session's test installation id; what the hosts keep is
removed by ``host_pair`` itself at the end of the session (every domain and pool of the
two private daemons), the database when the module ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from flask import Flask

from tests.conftest import MIB, Api, create_database, drop_database, make_token, migrate, node_body
from tests.guest import console
from tests.hypervisor.boot_env import remove_filters
from tests.hypervisor.two_hosts import PrivateHost, TwoHosts
from tests.image_files import OCTET
from vmapi.app import create_app
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

#: at most 16 characters: it goes into every name this vmapi makes
INSTALLATION = f"vmapi-m-{uuid.uuid4().hex[:8]}"
ADDRESS = "127.0.0.1"  # where each host's QEMU listens for a migration stream


@dataclass
class MigrateEnv:
    app: Flask
    api: Api
    hosts: TwoHosts
    nodes: dict[str, dict[str, Any]]  # "a" and "b"
    method: int
    image: dict[str, Any]

    def host(self, name: str) -> PrivateHost:
        return getattr(self.hosts, name)

    def pool(self, name: str) -> Path:
        """Node ``name``'s pool folder (its virt_node's local_storage_path)."""
        return self.host(name).pool / INSTALLATION

    def create(self, on: str, **fields: Any) -> dict[str, Any]:
        """A VM booted from the test image on node ``on``."""
        body = {"cores": 1, "ram": 256 * MIB, "virt_method": {"id": self.method},
                "image": {"id": self.image["id"]}, "node": {"id": self.nodes[on]["id"]},
                **fields}  # fmt: skip
        made = self.api.post("vm", json=body)
        assert made.status_code == 201, made.json
        return made.json["data"]

    def console(self, vm_id: int) -> Callable[[], str]:
        """A reader of the VM's console log through the API (on whichever node it is)."""

        def read() -> str:
            answer = self.api.get(f"vm/{vm_id}/console_log?bytes=1048576")
            assert answer.status_code == 200, answer.json
            return answer.json["data"]["text"]

        return read

    def domains(self, name: str) -> dict[str, str]:
        """This installation's domains on host ``name`` and their states, as libvirt says."""
        conn = libvirt.open(self.host(name).uri)
        try:
            states = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                      libvirt.VIR_DOMAIN_SHUTOFF: "shutoff"}  # fmt: skip
            return {
                dom.name(): states.get(dom.state()[0], str(dom.state()[0]))
                for dom in conn.listAllDomains()
                if dom.name().startswith(INSTALLATION)
            }
        finally:
            conn.close()

    def volumes(self, name: str, pool: str = "vmapi") -> list[str]:
        """The volumes of a pool of host ``name``, as libvirt finds them now."""
        conn = libvirt.open(self.host(name).uri)
        try:
            try:
                found = conn.storagePoolLookupByName(pool)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise  # (a timeout or a lost connection is no clean host)
                return []
            found.refresh(0)
            return sorted(found.listVolumes())
        finally:
            conn.close()

    def reconcile(self, *args: str) -> tuple[int, str]:
        result = self.app.test_cli_runner().invoke(args=["vmapi", "reconcile", *args])
        return result.exit_code, result.output

    def sql(self, statement: str, **params: Any) -> list[tuple]:
        import sqlalchemy as sa

        with self.app.app_context():
            rows = db.session.execute(sa.text(statement), params)
            found = [tuple(row) for row in rows.all()] if rows.returns_rows else []
            db.session.commit()
            db.session.remove()
        return found


def config(database_url: str, image_dir: Path) -> dict[str, Any]:
    return {"DATABASE_URL": database_url, "TESTING": True, "INSTALLATION_ID": INSTALLATION,
            "LIBVIRT_TIMEOUT": 30.0, "SHUTDOWN_TIMEOUT": 1.0, "IMAGE_DIR": str(image_dir),
            "MIGRATION_TIMEOUT": 120.0}  # fmt: skip


@contextmanager
def migrate_env(pg_server: str, hosts: TwoHosts, image: Path, store: Path) -> Iterator[MigrateEnv]:
    url = create_database(pg_server)
    app = None
    try:
        migrate(url)
        app = create_app(config(url, store))
        api = Api(app.test_client(), make_token(app, "admin"))
        for network, gateway in (("198.51.100.0/24", "198.51.100.1"),
                                 ("2001:db8:100::/64", "2001:db8:100::1")):  # fmt: skip
            version = "ipv4" if "." in network else "ipv6"
            made = api.post(version, json={"network": network, "gateway": gateway})
            assert made.status_code == 201, made.json
        nodes, method = {}, None
        for name in ("a", "b"):
            host = getattr(hosts, name)
            body = {
                "node": node_body(libvirt_uri=host.uri, interface_mode="user", reserved_ram=0,
                                  migration_address=ADDRESS),
                "virt_method": {"name": "QEMU"},
                # each node its own pool folder (in the host's, beside other modules' pools)
                "local_storage_path": str(host.pool / INSTALLATION),
            }  # fmt: skip
            made = api.post("virt_node", json=body)
            assert made.status_code == 201, made.json
            nodes[name] = api.get(f"node/{made.json['data']['node']['id']}").json["data"]
            method = made.json["data"]["virt_method"]["id"]
        yield MigrateEnv(app, api, hosts, nodes, method, upload(api, image))
    finally:
        for host in hosts.hosts:
            remove_ours(host)
        if app is not None:
            with app.app_context():
                db.session.remove()
                db.engine.dispose()
            app.extensions[DRIVER_KEY].connections.clear()
        drop_database(pg_server, url)


#: the pools this vmapi (and its tests) define on the hosts
POOLS = ("vmapi", "vmapi-logs", "vmapi-shared")


def remove_ours(host: PrivateHost) -> None:
    """This installation's domains and the pools it made, off the host (the session's
    other modules share the pair; their folders go with it at the session's end)."""
    conn = libvirt.open(host.uri)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(INSTALLATION):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        remove_filters(conn, INSTALLATION)
        for pool in conn.listAllStoragePools():
            if pool.name() in POOLS:
                if pool.isActive():
                    # the volumes too: the session's next module of this installation
                    # defines its pools on the same folders, and ids start at 1 again
                    pool.refresh(0)
                    for volume in pool.listAllVolumes():
                        volume.delete(0)
                    pool.destroy()
                pool.undefine()
    finally:
        conn.close()


def upload(api: Api, path: Path) -> dict[str, Any]:
    made = api.post("image", json={"name": "guest", "format": "raw"})
    assert made.status_code == 201, made.json
    with open(path, "rb") as body:
        sent = api.call("PUT", f"image/{made.json['data']['id']}/file", data=body, headers=OCTET)
    assert sent.status_code == 200, sent.json
    return sent.json["data"]


def ticks(text: str) -> list[int]:
    """Every tick the console text shows, in order (a log that began after a move has no
    boot line before them)."""
    return [int(m.group(1)) for line in console.lines(text) if (m := console.TICK.search(line))]


def boots(text: str) -> int:
    """How many times the guest booted in the text (its VMAPI-GUEST lines)."""
    return len(console.boots(text))


def wait_for_ticks(read: Callable[[], str], count: int, after: int = 0) -> str:
    """Wait until the log shows ``count`` ticks above ``after``; the log's text."""
    return console.wait_for(read, lambda t: len([n for n in ticks(t) if n > after]) >= count,
                            f"{count} ticks after {after}")  # fmt: skip
