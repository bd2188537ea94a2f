"""Root disks in Ceph (issue 25): POST /vm with the root disk an RBD clone of the image
against the same create on the local-overlay path (target: at most 1.1 x, the clone
included); the first VM of an image on a new node, RBD (written into Ceph once, then
only clones) against local (a full copy to each node); and a live move of a running VM
with a 1 GiB root disk holding 1 GiB of data, on RBD against on local storage.

Everything runs on real daemons the bench starts itself and always removes: two private
libvirtd hosts ``a`` and ``b`` (tests/hypervisor/two_hosts.py, as ``migration`` uses),
a one-node Ceph cluster (tests/hypervisor/ceph_cluster.py: mon, mgr and one BlueStore
OSD on 127.0.0.1) and vmapi in-process over both hosts (tests/hypervisor/migrate_env.py:
its own database, the test guest's image uploaded through the API, each node its own
pool folder, so a local root disk is copied when its VM moves). The rbd storage type is
the hypervisor tier's (tests/hypervisor/rbd_env.py) with the cluster's ``client.libvirt``
key in a key folder of the run's own. The guests are the test guest (TCG, 256 MiB);
libvirt's calls are timed by bench/boot.py's ``Timed`` around the real driver.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.boot import COPY_CALLS, Timed
from bench.common import GIB, MIB, SERVER
from bench.rbd_report import report
from tests.guest.build import GuestUnavailable, ensure_guest_image
from tests.hypervisor.ceph_cluster import CephCluster, CephUnavailable, ceph_cluster
from tests.hypervisor.migrate_env import (
    INSTALLATION,
    MigrateEnv,
    migrate_env,
    ticks,
    wait_for_ticks,
)
from tests.hypervisor.rbd_env import make_rbd_type
from tests.hypervisor.two_hosts import HostUnavailable, check_machine, two_hosts
from tests.image_files import OCTET
from vmapi.extensions import db
from vmapi.hypervisor.librbd import LibRbdClient
from vmapi.hypervisor.rbd import CephAccess, RbdClient
from vmapi.services.images.copies import remove_if_unused
from vmapi.services.nodes.hosts import DRIVER_KEY
from vmapi.services.vms.rbd_boot import RbdClone

TITLE = "#### Root disks in Ceph: POST /vm and live moves, RBD clone vs local overlay"
ROUNDS = 8  # creates of each kind, after one warm-up of each
CLONES = 8  # vmapi's in-process clone (grown) by hand, to show the clone's own cost
FRESH = 3  # images of FRESH_SIZE whose first VMs are timed
FRESH_SIZE = 256 * MIB
MOVE_ROUNDS = 3  # after one warm-up round; each: local cold + rbd there, local warm + rbd back
DISK = GIB  # the moving VMs' root disks, and the data they hold
#: the log record of a create that wrote the image into Ceph ("... (12.3 s).")
#: the libvirt calls giving a node the Ceph user's key and the rbd pool
ACCESS_CALLS = ("ensure_ceph_secret", "ensure_rbd_pool")
WRITE_LOG = "vmapi.services.vms.rbd_boot"
WRITTEN = re.compile(r"written into Ceph pool \S+ \(([\d.]+) s\)")


def run() -> list[str]:
    try:
        check_machine()
        guest = ensure_guest_image()
    except (HostUnavailable, GuestUnavailable) as exc:
        return [TITLE, "", f"Not run: {exc}", ""]
    # quiet unless something goes wrong (the app's basicConfig is a no-op after this)
    logging.basicConfig(level=logging.WARNING)
    try:
        with ExitStack() as stack:
            ceph = stack.enter_context(ceph_cluster())
            hosts = stack.enter_context(two_hosts())
            folder = tempfile.TemporaryDirectory(prefix="vmapi-bench-rbd-", dir="/var/tmp")
            tmp = Path(stack.enter_context(folder))
            env = stack.enter_context(rbd_vmapi(ceph, hosts, guest.path, tmp))
            figures = measure(env, ceph, guest.path, tmp)
    except CephUnavailable as exc:
        return [TITLE, "", f"Not run: {exc}", ""]
    return [TITLE, "", *report(figures)]


@contextmanager
def rbd_vmapi(ceph: CephCluster, hosts: Any, guest: Path, tmp: Path) -> Iterator[MigrateEnv]:
    """vmapi over both hosts with the cluster's key and a timed driver; the hosts' domains
    and pools go when it ends (migrate_env), the cluster and hosts with their own ``with``."""
    keys = tmp / "ceph-keys"
    keys.mkdir()
    (keys / f"client.{ceph.user}.key").write_text(ceph.key + "\n")
    store = tmp / "store"
    store.mkdir()
    with migrate_env(SERVER, hosts, guest, store) as env:
        env.app.config["CEPH_KEY_DIR"] = str(keys)
        env.app.extensions[DRIVER_KEY] = Timed(env.app.extensions[DRIVER_KEY])
        yield env


class WriteTimes(logging.Handler):
    """The seconds of the last write of an image into Ceph, from the create's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        found = WRITTEN.search(record.getMessage())
        if found:
            self.last = float(found.group(1))


@contextmanager
def write_times() -> Iterator[WriteTimes]:
    logger = logging.getLogger(WRITE_LOG)
    handler = WriteTimes()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


class Bench:
    """The API of the run's vmapi, with its timed driver."""

    def __init__(self, env: MigrateEnv, rbd: int) -> None:
        self.env = env
        self.rbd = rbd
        self.timed: Timed = env.app.extensions[DRIVER_KEY]

    def call(self, method: str, path: str, **kw: Any) -> Any:
        answer = self.env.api.call(method, path, **kw)
        assert answer.status_code < 300, answer.get_data(as_text=True)[:2000]
        return answer.json["data"] if answer.is_json else None

    def upload(self, name: str, path: Path) -> int:
        image = self.call("POST", "image", json={"name": name, "format": "raw"})
        size = path.stat().st_size
        with path.open("rb") as body:
            self.call("PUT", f"image/{image['id']}/file", input_stream=body,
                      headers={**OCTET, "Content-Length": str(size)})  # fmt: skip
        return image["id"]

    def create(self, image: int, node: str, rbd: bool, **fields: Any) -> tuple[float, dict, dict]:
        """POST /vm of the image on the node (root disk in the rbd type or local): ms,
        the VM, and the driver's ms by call."""
        body = {"cores": 1, "ram": 256 * MIB, "virt_method": {"id": self.env.method},
                "image": {"id": image}, "node": {"id": self.env.nodes[node]["id"]},
                **fields}  # fmt: skip
        if rbd:
            body["root_storage_type"] = {"id": self.rbd}
        self.timed.ms.clear()
        started = time.perf_counter()
        vm = self.call("POST", "vm", json=body)
        took = (time.perf_counter() - started) * 1000
        calls = dict(self.timed.ms)
        self.timed.ms.clear()
        return took, vm, calls

    def delete(self, vm: dict) -> None:
        self.call("DELETE", f"vm/{vm['id']}")

    def move(self, vm: dict, node: str) -> dict[str, float]:
        """A live move: seconds, the copies' and the migration's, the guest's downtime."""
        target = {"node": {"id": self.env.nodes[node]["id"]}}
        self.timed.ms.clear()
        started = time.perf_counter()
        self.call("POST", f"vm/{vm['id']}/migrate", json=target)
        took = time.perf_counter() - started
        migrate = self.timed.ms.get("migrate", 0.0) / 1000
        copy = self.timed.take(COPY_CALLS) / 1000
        stats = self.timed.real.last_migration(self.env.host(node).uri, vm["domain_name"])
        return {"seconds": took, "copy": copy, "migrate": migrate,
                "downtime": (stats.downtime or 0.0) if stats else 0.0}  # fmt: skip

    def copy_id(self, image: int, node: str) -> int | None:
        found = self.env.sql("SELECT id FROM image_copy WHERE image_id = :i AND node_id = :n",
                             i=image, n=self.env.nodes[node]["id"])  # fmt: skip
        return found[0][0] if found else None

    def drop_copy(self, image: int, node: str) -> None:
        """The node's copy of the image removed (no VM there uses it): vmapi's own
        removal, as when an image's last VM leaves a node and the copy is not kept."""
        ident = self.copy_id(image, node)
        if ident is not None:
            with self.env.app.app_context():
                assert remove_if_unused(ident), f"the copy on {node} is still in use"
                db.session.remove()


def padded(guest: Path, path: Path, size: int) -> None:
    """A raw image of ``size`` bytes: the test guest's image, then random bytes (data
    every copy must carry: nothing in it is zero or sparse)."""
    with path.open("wb") as out:
        out.write(guest.read_bytes())
        left = size - out.tell()
        while left > 0:
            out.write(os.urandom(min(8 * MIB, left)))
            left -= 8 * MIB


def measure(env: MigrateEnv, ceph: CephCluster, guest: Path, tmp: Path) -> dict[str, Any]:
    rbd = make_rbd_type(env, ceph)["id"]
    bench = Bench(env, rbd)
    with write_times() as writes:
        out: dict[str, Any] = {"guest_size": guest.stat().st_size, "fresh_size": FRESH_SIZE,
                               "disk": DISK}  # fmt: skip
        out.update(creates(bench, ceph, tmp))
        out.update(firsts(bench, writes, guest, tmp))
        out.update(moves(bench, writes, guest, tmp))
    return out


@contextmanager
def clone_waits() -> Iterator[list[float]]:
    """The ms each create waits for its root disk's clone before the domain starts
    (:meth:`vmapi.services.vms.rbd_boot.RbdClone.ready`), while the block runs."""
    waits: list[float] = []
    real = RbdClone.ready

    def ready(self: RbdClone, host: Any) -> None:
        started = time.perf_counter()
        try:
            real(self, host)
        finally:
            waits.append((time.perf_counter() - started) * 1000)

    RbdClone.ready = ready  # type: ignore[method-assign]
    try:
        yield waits
    finally:
        RbdClone.ready = real  # type: ignore[method-assign]


def creates(bench: Bench, ceph: CephCluster, tmp: Path) -> dict[str, Any]:
    """POST /vm of the test image on node a, its copy on the node (local) or in Ceph
    (rbd), alternating; each VM deleted after it is timed (not timed)."""
    image = bench.env.image["id"]
    for rbd in (False, True):  # the warm-up: the copy on a, the image in Ceph, a's pools
        _ms, vm, _calls = bench.create(image, "a", rbd)
        bench.delete(vm)
    out: dict[str, Any] = {"local": [], "rbd": [], "local_calls": [], "rbd_calls": []}
    with clone_waits() as out["waits"]:
        rounds(bench, image, out)
    out["parent"] = bench.env.image["virtual_size"]
    out["clone"] = clones_by_hand(bench, ceph, tmp, image, out["size"])
    return {"creates": out}


def rounds(bench: Bench, image: int, out: dict[str, Any]) -> None:
    for _ in range(ROUNDS):
        for kind, rbd in (("local", False), ("rbd", True)):
            ms, vm, calls = bench.create(image, "a", rbd)
            out[kind].append(ms)
            out[f"{kind}_calls"].append(calls)
            [(out["size"],)] = bench.env.sql(
                "SELECT size FROM storage WHERE vm_id = :v AND boot", v=vm["id"]
            )
            bench.delete(vm)


def clones_by_hand(
    bench: Bench, ceph: CephCluster, tmp: Path, image: int, size: int
) -> dict[str, Any]:
    """vmapi's in-process client's clone of the image's snapshot grown to ``size``, as the
    create makes it, outside any request: the first on a connection of its own (which
    it makes: what a worker's first create pays), then CLONES on it; ms each (the clones
    removed, untimed)."""
    [(parent, snapshot)] = bench.env.sql(
        "SELECT rbd_name, snapshot FROM image_rbd WHERE image_id = :i", i=image
    )
    client = LibRbdClient(CephAccess(monitors=ceph.monitors, user=ceph.user,
                                     keyfile=str(tmp / "ceph-keys" / f"client.{ceph.user}.key"),
                                     timeout=61.0))  # fmt: skip
    tools = RbdClient(client.access)
    out: dict[str, Any] = {"first": 0.0, "warm": []}
    for n in range(CLONES + 1):
        name = f"{INSTALLATION}-hand-{n}"
        started = time.perf_counter()
        client.clone(ceph.pool, parent, snapshot, name, size)
        took = (time.perf_counter() - started) * 1000
        if n:
            out["warm"].append(took)
        else:
            out["first"] = took
        tools.remove_image(ceph.pool, name)
    return out


def firsts(bench: Bench, writes: WriteTimes, guest: Path, tmp: Path) -> dict[str, Any]:
    """Node b's first VM ever (of the test image), local and rbd; then, for FRESH new
    images, the first VM of each: local on a (a full copy), rbd on a (the image written
    into Ceph), rbd on b (a clone only), local on b (another full copy)."""
    out: dict[str, Any] = {"node_local": None, "node_rbd": None, "fresh": []}
    for kind, rbd, parts in (("node_local", False, COPY_CALLS), ("node_rbd", True, ACCESS_CALLS)):
        ms, vm, calls = bench.create(bench.env.image["id"], "b", rbd)
        out[kind] = (ms / 1000, sum(calls.get(c, 0.0) for c in parts) / 1000)
        bench.delete(vm)
    for n in range(FRESH):
        path = tmp / f"fresh-{n}.raw"
        padded(guest, path, FRESH_SIZE)
        image = bench.upload(f"fresh-{n}", path)
        path.unlink()
        row: dict[str, tuple[float, float]] = {}
        for kind, node, rbd in (("local_a", "a", False), ("rbd_a", "a", True),
                                ("rbd_b", "b", True), ("local_b", "b", False)):  # fmt: skip
            writes.last = None
            ms, vm, calls = bench.create(image, node, rbd)
            part = writes.last if rbd else sum(calls.get(c, 0.0) for c in COPY_CALLS) / 1000
            # (the write's seconds come from the create's log: a changed message shows here)
            assert (part is not None) == (kind != "rbd_b"), f"{kind}: a write logged: {part}"
            row[kind] = (ms / 1000, part or 0.0)
            bench.delete(vm)
        out["fresh"].append(row)
        bench.call("DELETE", f"image/{image}")
    return {"firsts": out}


def moves(bench: Bench, writes: WriteTimes, guest: Path, tmp: Path) -> dict[str, Any]:
    """Two running test guests from one 1 GiB image of data, each with a 1 GiB root disk:
    one local (an overlay on the node's copy of the image), one on RBD (a clone of it in
    Ceph), moved live between a and b in turns. A cold move goes to a node without the
    image's copy (vmapi's own removal dropped it when the VM left: the move copies the
    image's 1 GiB there, then libvirt the overlay); a warm one to a node that kept it."""
    path = tmp / "data.raw"
    padded(guest, path, DISK)
    image = bench.upload("data", path)
    path.unlink()
    out: dict[str, Any] = {"cold": [], "warm": [], "rbd": []}
    started = time.perf_counter()
    _ms, local, calls = bench.create(image, "a", False, root_size=DISK)
    out["setup_local"] = (time.perf_counter() - started,
                          sum(calls.get(c, 0.0) for c in COPY_CALLS) / 1000)  # fmt: skip
    writes.last = None
    started = time.perf_counter()
    _ms, on_rbd, _calls = bench.create(image, "a", True, root_size=DISK)
    out["setup_rbd"] = (time.perf_counter() - started, writes.last or 0.0)
    consoles = {vm["id"]: bench.env.console(vm["id"]) for vm in (local, on_rbd)}
    for vm in (local, on_rbd):
        wait_for_ticks(consoles[vm["id"]], 2)
    for round_ in range(MOVE_ROUNDS + 1):  # the first warms both up, uncounted
        bench.drop_copy(image, "b")  # left by the last cold move; the local VM is on a
        got = {"cold": bench.move(local, "b"), "rbd": [bench.move(on_rbd, "b")]}
        got["warm"] = bench.move(local, "a")  # a kept its copy
        got["rbd"].append(bench.move(on_rbd, "a"))
        if round_:
            out["cold"].append(got["cold"])
            out["warm"].append(got["warm"])
            out["rbd"] += got["rbd"]
    for vm in (local, on_rbd):  # both still the guests that booted, ticking on
        last = ticks(consoles[vm["id"]]())[-1]
        wait_for_ticks(consoles[vm["id"]], 1, after=last)
        assert bench.env.domains("a")[vm["domain_name"]] == "running"
    for vm in (local, on_rbd):
        bench.delete(vm)
    bench.call("DELETE", f"image/{image}")
    return {"moves": out}
