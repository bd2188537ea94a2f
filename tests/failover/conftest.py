"""One fleet per module: etcd, two PostgreSQL members under Patroni, two gunicorn API hosts
and nginx, each host a network namespace (tests/failover/hosts.py).

The API hosts run the shipped files: deploy/gunicorn.conf.py, deploy/patroni/patroni.yml
(with tight timings), deploy/nginx/vmapi-site.conf with vmapi-upstreams.conf and
vmapi-proxy.conf, and the database URL the README documents: through two HAProxy hosts
in libpq's multi-host form (deploy/haproxy/vmapi-db.cfg, each a host of its own), which
send connections only to the member Patroni's REST API names the primary. Their nodes are
libvirtd's test driver (``test+unix:///default``, reached through libvirtd's Unix socket),
so both API hosts see one hypervisor and a VM's domain can be looked up by the test.

Each test gets the fleet back healthy (``fleet``): a cut link joined again, a killed
member's Patroni started again (it rejoins with pg_rewind), a killed API host started
again, whatever the test before did.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from tests.concurrency.conftest import SHARED_URI, remove_domains
from tests.concurrency.test_nginx import SITE, WORKER_USER, local_paths
from tests.conftest import GIB, make_token, migrate, node_body, unavailable
from tests.failover.hosts import PROXIES, SUPERUSER_PASSWORD, Hosts, missing_tools
from tests.failover.load import MIB, call
from vmapi.app import create_app
from vmapi.extensions import db

ROOT = Path(__file__).resolve().parents[2]
API_HOSTS = ("api1", "api2")
WORKERS = 3
#: the README's URL options: a connection to a member (or HAProxy) that went silent (a
#: partition) breaks after tcp_user_timeout instead of hanging a worker until gunicorn
#: kills it; target_session_attrs keeps a connection HAProxy sent to a standby unused
DATABASE_OPTIONS = ("target_session_attrs=read-write&connect_timeout=2&tcp_user_timeout=5000"
                    "&keepalives_idle=5&keepalives_interval=2&keepalives_count=2")  # fmt: skip


@dataclass
class Fleet:
    hosts: Hosts
    installation: str
    token: str
    body: dict  # a create's body
    env: dict

    @property
    def nginx(self) -> str:
        return str(self.hosts.base / "nginx.sock")

    def local_url(self, member: str) -> str:
        """The vmapi database on ``member``, over its Unix socket (for the test's checks)."""
        return f"postgresql://postgres@/vmapi?host={self.hosts.base / member}"

    def kill_api(self, host: str) -> None:
        """The API host's gunicorn dies at once, master and workers (SIGKILL to its
        process group: it was started in a session of its own); returns once its master
        is reaped."""
        process = self.hosts.processes[host]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)  # (gone, its sockets closed: the signal is not the death)
        deadline = time.monotonic() + 10
        while living_in_group(process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # (its workers, which share the listening socket)
        process.wait(timeout=10)


def living_in_group(pgid: int) -> list[int]:
    """Processes of the process group that are not yet dead (zombies have closed their
    sockets: they count as dead)."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                living.append(int(stat.parent.name))
    return living


def start_api(hosts: Hosts, host: str, env: dict) -> None:
    sock = hosts.base / f"{host}.sock"
    sock.unlink(missing_ok=True)
    metrics = hosts.base / f"metrics-{host}"  # in the folder close() removes
    metrics.mkdir(exist_ok=True)
    env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    hosts.start(host, host, [
        sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py",
        "--workers", str(WORKERS), "--bind", f"unix:{sock}", "--bind", f"{hosts.ip(host)}:8000",
        "--access-logfile", "/dev/null", "wsgi:app",
    ], env=env, cwd=ROOT)  # fmt: skip
    deadline = time.monotonic() + 60
    while call(str(sock), "GET", "/health")[0] != 200:
        assert hosts.alive(host) and time.monotonic() < deadline, hosts.log_tail(host)
        time.sleep(0.2)


def start_nginx(hosts: Hosts) -> None:
    """The shipped site with the shipped upstream block over the two API hosts; the
    test's side of it is a Unix socket (the root namespace has no route to the hosts)."""
    upstreams = (ROOT / "deploy/nginx/vmapi-upstreams.conf").read_text()
    upstreams = upstreams.replace("192.0.2.21", hosts.ip("api1"))
    upstreams = upstreams.replace("192.0.2.22", hosts.ip("api2"))
    pattern = re.compile(r"upstream vmapi \{.*?\n\}", re.S)
    block = pattern.search(upstreams)[0]
    site, count = pattern.subn(lambda _: block, SITE, count=1)
    assert count == 1
    base = hosts.base
    site = (site.replace("listen 443 ssl;", f"listen unix:{base}/nginx.sock;")
            .replace("listen 80;", f"listen unix:{base}/nginx-80.sock;")
            .replace("include /etc/nginx/vmapi-proxy.conf;",
                     f"include {ROOT}/deploy/nginx/vmapi-proxy.conf;"))  # fmt: skip
    folder = base / "nginx"
    folder.mkdir()
    site = local_paths(site, folder)
    hosts.folders += [Path(d) for d in re.findall(r"listen unix:(\S+)/spool\.sock;", site)]
    site = "\n".join(line for line in site.splitlines() if "ssl_certificate" not in line)
    (folder / "nginx.conf").write_text(
        f"{WORKER_USER}daemon off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
        "events {}\nhttp {\n"
        'log_format failover \'$msec $request_method $status "$upstream_addr" '
        '"$upstream_status"\';\n'
        f"access_log {folder}/access.log failover;\n"
        f"client_body_temp_path {folder};\nproxy_temp_path {folder};\n{site}\n}}\n"
    )
    hosts.start("nginx", "lb", ["nginx", "-c", str(folder / "nginx.conf"), "-p", str(folder)])
    deadline = time.monotonic() + 20
    while call(str(base / "nginx.sock"), "GET", "/health")[0] != 200:
        assert hosts.alive("nginx") and time.monotonic() < deadline, hosts.log_tail("nginx")
        time.sleep(0.1)


def setup_vmapi(hosts: Hosts, leader: str, installation: str) -> tuple[str, dict]:
    """The database on the cluster, migrated and seeded; an admin token; the env of the
    API hosts."""
    conn = hosts.pg(leader)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE vmapi")
    conn.close()
    local = f"postgresql://postgres@/vmapi?host={hosts.base / leader}"
    migrate(local)
    # both HAProxy hosts (deploy/haproxy/vmapi-db.cfg), in libpq's multi-host form
    proxy = ",".join(f"{hosts.ip(host)}:5000" for host in PROXIES.values())
    env = {**os.environ, "VMAPI_INSTALLATION_ID": installation, "VMAPI_LIBVIRT_TIMEOUT": "10",
           "VMAPI_DATABASE_URL":
               f"postgresql://postgres:{SUPERUSER_PASSWORD}@{proxy}/vmapi?{DATABASE_OPTIONS}",
           # a retry waiting on a key whose first request is gone waits this long, not 55 s
           "VMAPI_IDEMPOTENCY_WAIT": "2", "VMAPI_LOG_REQUESTS": "false",
           # the image store every API host mounts (README: one shared directory)
           "VMAPI_IMAGE_DIR": str(hosts.base / "images")}  # fmt: skip
    seed = {**env, "VMAPI_DATABASE_URL": local}
    flask = [sys.executable, "-m", "flask", "--app", "wsgi", "vmapi", "seed"]
    subprocess.run(flask, cwd=ROOT, env=seed, check=True, capture_output=True)
    app = create_app({"DATABASE_URL": local, "TESTING": True, "INSTALLATION_ID": installation})
    token = make_token(app, "admin")
    with app.app_context():
        db.engine.dispose()
    return token, env


def setup_fleet(sock: str, token: str) -> dict:
    """A test-driver node with room for thousands of small VMs (4,096 vCPUs), and 4,094
    IPv4 addresses (a benchmark run makes about 2,000 VMs)."""
    status, _, method = call(sock, "POST", "/api/v1/virt_method", token,
                             {"name": "TEST", "domain_type": "test"})  # fmt: skip
    assert status == 201, method
    node = node_body(libvirt_uri=SHARED_URI, cores=1024, ram=4096 * GIB,
                     cpu_allocation_ratio=4.0, ram_allocation_ratio=1.0, reserved_ram=0)  # fmt: skip
    status, _, answer = call(sock, "POST", "/api/v1/virt_node", token,
                             {"node": node, "virt_method": {"id": method["data"]["id"]}})  # fmt: skip
    assert status == 201, answer
    for path, body in (("ipv4", {"network": "10.64.0.0/20", "gateway": "10.64.0.1"}),
                       ("ipv6", {"network": "2001:db8:64::/64", "gateway": "2001:db8:64::1"})):  # fmt: skip
        status, _, answer = call(sock, "POST", f"/api/v1/{path}", token, body)
        assert status == 201, answer
    return {"cores": 1, "ram": 128 * MIB, "virt_method": {"id": method["data"]["id"]}}


def check_machine() -> None:
    """Skip (fail in CI) where the tier cannot run."""
    if os.geteuid() != 0:
        unavailable("the failover tier makes network namespaces: it runs as root")
    if missing := missing_tools():
        unavailable(f"missing for the failover tier: {missing} (make test installs them)")
    try:
        libvirt.open(SHARED_URI).close()
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd's test driver does not answer on {SHARED_URI}: {exc}")


@contextlib.contextmanager
def deployment() -> Iterator[Fleet]:
    """The whole fleet, up and healthy, until the block ends; then nothing of it is left
    (also used by bench/failover.py)."""
    hosts = Hosts()
    installation = f"vmapi-f-{hosts.tag}"
    try:
        hosts.network()
        hosts.start_etcd()
        for member in ("n1", "n2"):
            hosts.start_patroni(member)
        leader = hosts.wait_healthy()
        for proxy in PROXIES:
            hosts.start_haproxy(proxy)
        hosts.wait_routed(leader)
        token, env = setup_vmapi(hosts, leader, installation)
        for host in API_HOSTS:
            start_api(hosts, host, env)
        start_nginx(hosts)
        body = setup_fleet(str(hosts.base / "nginx.sock"), token)
        yield Fleet(hosts, installation, token, body, env)
    finally:
        hosts.close()
        remove_domains(installation)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Fleet]:
    check_machine()
    with deployment() as fleet:
        yield fleet


@pytest.fixture
def fleet(cluster: Fleet) -> Fleet:
    """The module's fleet, healthy: every link up, both members running with one the
    other's synchronous standby, both API hosts serving."""
    restore(cluster)
    return cluster


def restore(fleet: Fleet) -> None:
    hosts = fleet.hosts
    for host in ("n1", "n2", "api1", "api2"):
        if hosts.is_cut(host):
            hosts.heal(host)
    for member in ("n1", "n2"):
        # a member whose Patroni alone was killed still runs its PostgreSQL: the Patroni
        # started again finds it, demotes it and rewinds it when the other one is leader
        if not hosts.alive(f"patroni-{member}"):
            hosts.start_patroni(member)
    for proxy in PROXIES:
        if not hosts.alive(proxy):
            hosts.start_haproxy(proxy)
    leader = hosts.wait_healthy()
    hosts.wait_routed(leader)
    # libpq keeps the first host of the URL that takes the connection: one an API host
    # made while the first HAProxy had no primary to send it to (a postmaster restarting)
    # went through the second and stays there, in the pool. Every test starts as after a
    # fresh start, every connection through the first HAProxy (the tests that kill it or
    # a primary's Patroni check that their load went through it): API hosts holding one
    # through the second start again.
    second = hosts.sessions_from(leader, PROXIES["haproxy2"])
    for host in API_HOSTS:
        if second or not hosts.alive(host):
            fleet.kill_api(host)  # workers a dead master may have left
            start_api(hosts, host, fleet.env)
