"""What every benchmark shares: throwaway databases, bulk-built fleets, gunicorn, wrk.

Fleets are bulk-inserted in SQL (nodes, virt_nodes, placed VMs with one interface each,
free addresses), so building 10,000 nodes with 200,000 VMs takes seconds; requests then
go through the real application. Figures are medians and p95s of repeated requests;
compare ratios within one run, never absolute times across runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import create_database, drop_database, make_token, migrate
from vmapi.app import create_app
from vmapi.extensions import db

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("VMAPI_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SERVER = sa.engine.make_url(PG_URL).set(database="postgres").render_as_string(False)
GIB = 1024**3
MIB = 1024**2
SHARED_URI = "test+unix:///default"  # libvirtd's test driver: one hypervisor for all workers
INSTALLATION = "vmapi-bench"


def median(values: list[float]) -> float:
    return statistics.median(values)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A fresh PostgreSQL database built by the migrations, dropped afterwards."""
    url = create_database(SERVER)
    try:
        migrate(url)
        yield url
    finally:
        drop_database(SERVER, url)


#: Where the benchmarks' test-driver node files are made (tempfile's folder): the apps
#: they start may open test:// files there (VMAPI_TEST_DRIVER_DIR).
TEST_DRIVER_DIR = tempfile.gettempdir()


def host_file(directory: Path, cores: int = 64, ram_kib: int = 268435456) -> Path:
    """A libvirt test-driver node description (a host of ``cores`` and ``ram_kib``)."""
    path = directory / f"host-{cores}-{ram_kib}.xml"
    path.write_text(
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>"
        f"<cores>{cores}</cores><threads>1</threads></cpu><memory>{ram_kib}</memory></node>"
    )
    return path


@dataclass
class Fleet:
    url: str
    method: int  # virt_method id
    vm_ids: list[int]
    running: int  # vm_state id


def populate(
    url: str,
    nodes: int,
    vms_per_node: int,
    uri: str,
    addresses: int,
    cores: int = 64,
    ram: int = 256 * GIB,
    analyze: bool = True,
) -> Fleet:
    """Nodes of ``cores`` vCPUs and ``ram`` bytes on ``uri``, ``vms_per_node`` placed VMs of
    1 vCPU and 256 MiB each (with an interface), free capacity to match, and
    ``addresses`` free IPv4 addresses plus an IPv6 pool. ``analyze=False`` leaves the
    planner's statistics as they were (a fleet registered in bulk, autovacuum off)."""
    app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING"})
    vm_ram = 256 * MIB
    with app.app_context():
        x = db.session.execute
        method = x(
            sa.text(
                "INSERT INTO virt_method (name, domain_type) VALUES ('TEST', 'test') RETURNING id"
            )
        ).scalar_one()
        running = x(sa.text("SELECT id FROM vm_state WHERE name = 'running'")).scalar_one()
        x(
            sa.text(
                "INSERT INTO node (fqdn, ipv4_addr_ext, ipv6_addr_ext, ipv4_gw_ext, ipv6_gw_ext,"
                " node_state_id, libvirt_uri, cores, ram, cpu_allocation_ratio,"
                " ram_allocation_ratio, reserved_ram, free_cores, free_ram)"
                " SELECT 'node' || i || '.bench.example', '192.0.2.10/24', '2001:db8::10/64',"
                " '192.0.2.1', '2001:db8::1', 1, :uri, :cores, :ram, 1.0, 1.0, 0,"
                " :cores - :per, :ram - CAST(:per AS bigint) * :vm_ram"
                " FROM generate_series(1, :n) AS i"
            ),
            {"uri": uri, "cores": cores, "ram": ram, "n": nodes, "per": vms_per_node,
             "vm_ram": vm_ram},
        )  # fmt: skip
        x(
            sa.text("INSERT INTO virt_node (node_id, virt_method_id) SELECT id, :m FROM node"),
            {"m": method},
        )
        x(
            sa.text(
                "INSERT INTO vm (cores, ram, customer_id, uuid, node_id, virt_method_id,"
                " vm_state_id, created_at)"
                " SELECT 1, :vm_ram, (n.id * :per + k) % 1000, gen_random_uuid()::text, n.id,"
                " :m, :s, now() FROM node n CROSS JOIN generate_series(1, :per) AS k"
                " ORDER BY n.id, k"
            ),
            {"vm_ram": vm_ram, "per": vms_per_node, "m": method, "s": running},
        )
        # MACs 02:00:xx:xx:xx:xx and device suffixes from the VM id (unique per VM)
        x(
            sa.text(
                "INSERT INTO interface (vm_id, mac, device_suffix) SELECT id, '02:00:'"
                " || regexp_replace(lpad(to_hex(id), 8, '0'), '(..)(..)(..)(..)',"
                " '\\1:\\2:\\3:\\4'), to_hex(id) FROM vm"
            )
        )
        x(
            sa.text(
                "INSERT INTO ipv4_address (address, prefix, gateway)"
                " SELECT '10.' || (i / 65536) || '.' || (i / 256 % 256) || '.' || (i % 256),"
                " 8, '10.255.255.254' FROM generate_series(1, :n) AS i"
            ),
            {"n": addresses},
        )
        x(
            sa.text(
                "INSERT INTO ipv6_pool (network, prefix, gateway, next_host, size)"
                " VALUES ('2001:db8::/64', 64, '2001:db8::1', 1, 4611686018427387904)"
            )
        )
        db.session.commit()
        ids = list(x(sa.text("SELECT id FROM vm ORDER BY id")).scalars())
        state = running
        db.session.remove()
        db.engine.dispose()
    if analyze:
        vacuum_analyze(url)
    return Fleet(url, method, ids, state)


def vacuum_analyze(url: str) -> None:
    """Statistics for the planner, and the bulk insert's dirty pages written now rather
    than by the checkpointer in the middle of a measurement."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1),
                              isolation_level="AUTOCOMMIT")  # fmt: skip
    with engine.connect() as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
        conn.execute(sa.text("CHECKPOINT"))
    engine.dispose()


def interleaved(calls: list, repeat: int, warmup: int = 10) -> list[list[float]]:
    """Milliseconds per call of each of ``calls``, taken in turns (a, b, c, a, b, c...)
    so that whatever else this shared machine does falls on all of them alike."""
    for _ in range(warmup):
        for fn in calls:
            fn()
    out: list[list[float]] = [[] for _ in calls]
    for _ in range(repeat):
        for fn, times in zip(calls, out, strict=True):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
    return out


def admin_token(url: str) -> str:
    app = create_app({"DATABASE_URL": url, "LOG_LEVEL": "WARNING"})
    token = make_token(app, "admin")
    with app.app_context():
        db.engine.dispose()
    return token


def recommended_workers() -> int:
    """gunicorn's documented starting point: (2 x cores) + 1."""
    return 2 * (os.cpu_count() or 1) + 1


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(pid)


def wrk(url: str, seconds: int, *, threads: int = 16, lua: str | None = None) -> dict[str, float]:
    """Run wrk with ``threads`` threads and as many connections; requests/s and the
    non-2xx count. ``lua`` sets method, body and headers."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua or "")
    try:
        out = subprocess.run(
            ["wrk", "-t", str(threads), "-c", str(threads), "-d", f"{seconds}s", "--latency",
             "-s", script.name, url],
            capture_output=True, text=True, check=True, timeout=seconds + 60,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rate, "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else ""}  # fmt: skip


def lua_request(method: str, token: str | None, body: str | None = None) -> str:
    """A wrk script sending one fixed request (JSON strings are quoted for Lua)."""
    lines = [f'wrk.method = "{method}"']
    if token:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {token}"')
    if body is not None:
        lines.append('wrk.headers["Content-Type"] = "application/json"')
        lines.append(f"wrk.body = [[{body}]]")
    return "\n".join(lines) + "\n"


def remove_domains(uri: str, marker: str) -> int:
    """Destroy and undefine the domains named ``marker...`` or whose vmapi metadata
    mentions ``marker`` (an installation id); how many."""
    import libvirt

    from tests.domains import tagged_domains

    conn = libvirt.open(uri)
    removed = 0
    try:
        named = [dom for dom in conn.listAllDomains() if dom.name().startswith(marker)]
        for dom in {d.UUIDString(): d for d in named + tagged_domains(conn, marker)}.values():
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            removed += 1
    finally:
        conn.close()
    return removed


@contextlib.contextmanager
def served_fleet(nodes: int = 10, vms_per_node: int = 20) -> Iterator[tuple[Fleet, dict, str]]:
    """A database whose nodes all point at libvirtd's test driver (shared by every
    worker), room for tens of thousands of creates, the environment for vmapi's
    gunicorn and an admin token. Domains made under it are removed afterwards."""
    remove_domains(SHARED_URI, INSTALLATION)  # what an interrupted run left behind
    remove_domains(SHARED_URI, "floor-")
    with database() as url:
        fleet = populate(url, nodes, vms_per_node, SHARED_URI, addresses=60_000,
                         cores=1_000_000, ram=1024**5)  # fmt: skip
        env = {"VMAPI_DATABASE_URL": url, "VMAPI_INSTALLATION_ID": INSTALLATION,
               "VMAPI_LOG_LEVEL": "WARNING", "VMAPI_LOG_REQUESTS": "false"}  # fmt: skip
        try:
            yield fleet, env, admin_token(url)
        finally:
            remove_domains(SHARED_URI, INSTALLATION)
            remove_domains(SHARED_URI, "floor-")
