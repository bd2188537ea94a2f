"""Fixtures in the style of Flask's tutorial: ``app``, ``client``, ``runner``, plus helpers.

Tests run against a real PostgreSQL (a throwaway database per session, built by the
real migrations) and, for tests marked ``embedded``, also against SQLite. libvirt is
the real library: the ``test`` driver, with node XML files for hosts of chosen sizes.
With ``CI=true`` a skipped test is a failed test: nothing may silently not run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from xdist.scheduler import LoadScopeScheduling

from tests.pg_reset import PostgresReset
from vmapi.app import create_app
from vmapi.extensions import db
from vmapi.hypervisor.uri import UriPolicy
from vmapi.telemetry import LIBVIRT_ERRORS, LIBVIRT_SECONDS

CI = os.environ.get("CI", "").lower() == "true"
PG_URL = os.environ.get("VMAPI_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
GIB = 1024**3
MIB = 1024**2


def unavailable(reason: str) -> None:
    """Skip locally; fail in CI, where every tier must run."""
    if CI:
        pytest.fail(f"{reason} (CI=true: nothing may be skipped)")
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any):
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


#: every test under these folders carries its tier's marker (``make test-fast`` leaves them out)
TIERS = {"hypervisor": pytest.mark.hypervisor, "concurrency": pytest.mark.concurrency,
         "docs": pytest.mark.docs, "failover": pytest.mark.failover}  # fmt: skip


#: ``make test`` runs three pytest-xdist workers on two cores. The hypervisor tier goes to
#: them as two units of work, each whole to one worker, so that the two run side by side
#: (their guests and daemons keep them waiting about half the time; the third worker takes
#: the other tests meanwhile). ``APART`` holds the modules whose guests and daemons are all
#: their own: on private libvirtd hosts (the two-host pair, the leased pair) with user
#: networking, in the Ceph cluster alone, libvirt's own domains of a name prefix of their
#: own (test_guest), network namespaces (test_capture, test_ruleset); the other unit holds
#: the rest, which share the session's vmapi on qemu:///system (``boot_vmapi``; its test
#: domains and pools are found and removed by name prefix), its streamtest pools and its
#: one libvirt secret of Ceph's ``client.libvirt``. Every guest on a filtered bridge is in
#: that second unit, test_migrate_filters' and test_migrate_guard's on private hosts too:
#: libvirt names taps vnetN in each daemon, and a filter test reads the host's
#: ebtables/iptables by tap name. A session fixture is made once per unit that uses it:
#: the vmapi on qemu:///system in the second only, the leased pair in the first; the
#: two-host pair and a Ceph cluster in both (made for that: each cluster and pair has its
#: own folder, ports and owner, and a live session's are never taken for leftovers).
#: The concurrency tier goes whole to one worker, as one unit: each of its modules makes its
#: gunicorn once and first removes every domain a server of the tier left on the shared
#: test driver (``vmapi-r-*``), so no two of its modules may run at once. Each module of
#: the docs and failover tiers goes whole to one worker (its nginx or its hosts are made
#: once per module); every other test is a unit of its own,
#: taken by whichever worker is free. Units start longest first (``FIRST``, then by number
#: of tests), so that no long one is left for the end. (xdist's own ``--dist loadgroup``
#: cannot do this under pytest 9: it renames items by ``_nodeid``, which pytest 9 no
#: longer reads.)
APART = frozenset({
    "test_disk_leases", "test_ha", "test_ha_kill", "test_ha_leases", "test_migrate_api",
    "test_migration", "test_rbd_boot", "test_rbd_moves", "test_save_two_hosts",
    "test_two_hosts", "test_rbd_client", "test_ceph_cluster", "test_guest", "test_guest_build",
    "test_capture", "test_ruleset", "test_rbd_librbd",
})  # fmt: skip
HYPERVISOR_UNITS = ("tests/hypervisor [apart]", "tests/hypervisor [qemu:///system]")
#: the units that begin first (in this order): the hypervisor tier's two, then the three
#: minutes of the contract fuzzer (one test); the rest follow, those of most tests first
FIRST = (*HYPERVISOR_UNITS, "tests/api/test_fuzz.py::test_contract")


class TierScheduling(LoadScopeScheduling):
    """xdist's scheduling by scope, with the scopes above (``FIRST`` first, then the units
    of the largest first)."""

    def _split_scope(self, nodeid: str) -> str:
        if nodeid.startswith("tests/hypervisor/"):
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[1].removesuffix(".py")
            return HYPERVISOR_UNITS[0] if module in APART else HYPERVISOR_UNITS[1]
        if nodeid.startswith("tests/concurrency/"):
            return "tests/concurrency"
        if nodeid.startswith(("tests/docs/", "tests/failover/")):
            return nodeid.split("::", 1)[0]
        return nodeid

    def _assign_work_unit(self, node: Any) -> None:
        if not getattr(self, "_first_moved", False):
            for scope in reversed(FIRST):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            self._first_moved = True
        super()._assign_work_unit(node)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> TierScheduling:
    return TierScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        if tests in Path(item.path).parents:
            folder = Path(item.path).relative_to(tests).parts[0]
            if folder in TIERS:
                item.add_marker(TIERS[folder])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        embedded = metafunc.definition.get_closest_marker("embedded") is not None
        metafunc.parametrize("backend", ["postgresql", "sqlite"] if embedded else ["postgresql"])


def _with_database(url: str, name: str) -> str:
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


def migrate(url: str) -> None:
    """Build a schema with the real migrations (``flask db upgrade``)."""
    from flask_migrate import upgrade

    app = create_app({"DATABASE_URL": url, "TESTING": True})
    with app.app_context():
        upgrade()
        db.engine.dispose()


@pytest.fixture(scope="session")
def pg_server() -> str:
    url = _with_database(PG_URL, sa.engine.make_url(PG_URL).database or "postgres")
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        unavailable(f"PostgreSQL does not answer at {PG_URL}: {exc}")
    finally:
        engine.dispose()
    return url


def _server_ddl(server_url: str, statement: str, name: str) -> None:
    """Run ``CREATE DATABASE`` or ``DROP DATABASE IF EXISTS`` for ``name`` (quoted by the
    dialect: DDL takes no bind parameters)."""
    engine = sa.create_engine(
        server_url.replace("postgresql://", "postgresql+psycopg2://", 1),
        isolation_level="AUTOCOMMIT",
    )
    with engine.connect() as conn:
        quoted = conn.dialect.identifier_preparer.quote(name)
        suffix = " WITH (FORCE)" if statement.startswith("DROP") else ""
        conn.execute(sa.text(f"{statement} {quoted}{suffix}"))
    engine.dispose()


def create_database(server_url: str) -> str:
    name = f"vmapi_test_{uuid.uuid4().hex[:12]}"
    _server_ddl(server_url, "CREATE DATABASE", name)
    return _with_database(server_url, name)


def drop_database(server_url: str, url: str) -> None:
    _server_ddl(server_url, "DROP DATABASE IF EXISTS", sa.engine.make_url(url).database)


@pytest.fixture(scope="session")
def pg_database(pg_server: str) -> Iterator[str]:
    """One migrated PostgreSQL database for the session; tables are emptied per test."""
    url = create_database(pg_server)
    migrate(url)
    yield url
    if url in RESETS:
        RESETS.pop(url).dispose()
    drop_database(pg_server, url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "template.sqlite3"
    migrate(f"sqlite:///{path}")
    return str(path)


#: each test database's resets (tests/pg_reset.py), by URL
RESETS: dict[str, PostgresReset] = {}


def reset_postgres(app: Flask, url: str) -> None:
    """Put the test database at ``url`` back as every test finds it (tests/pg_reset.py)."""
    if url not in RESETS:
        RESETS[url] = PostgresReset(url)
    RESETS[url](app)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path) -> str:
    if backend == "postgresql":
        return request.getfixturevalue("pg_database")
    template = request.getfixturevalue("sqlite_template")
    path = tmp_path / "vmapi.sqlite3"
    shutil.copy(template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def app_config() -> dict[str, Any]:
    """Extra configuration for the ``app`` of one test (override in a test module)."""
    return {}


def node_files_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The folder test:// node files may lie in (TEST_DRIVER_DIR): pytest's base temporary
    folder, under which every tmp_path and mktemp folder of the session lies."""
    return str(tmp_path_factory.getbasetemp())


@pytest.fixture
def uri_policy(tmp_path_factory: pytest.TempPathFactory) -> UriPolicy:
    """The URI policy of the ``app`` fixture, for drivers made outside an app."""
    return UriPolicy(test_driver_dir=node_files_dir(tmp_path_factory))


@pytest.fixture
def app(
    db_url: str, backend: str, app_config: dict[str, Any], tmp_path, tmp_path_factory
) -> Iterator[Flask]:
    config = {"DATABASE_URL": db_url, "TESTING": True, "LIBVIRT_TIMEOUT": 5.0,
              "IMAGE_DIR": str(tmp_path / "images"),
              "TEST_DRIVER_DIR": node_files_dir(tmp_path_factory), **app_config}  # fmt: skip
    # The process's libvirt metrics are labelled by node, and a test node's label is its
    # whole test:// URI, new in every test: the series of the worker's earlier tests
    # would pile up (~6 a test), and /metrics late in a worker's life would write, and
    # its test parse, thousands of them (seconds). A test starts with none of them.
    for metric in (LIBVIRT_SECONDS, LIBVIRT_ERRORS):
        metric.clear()
    app = create_app(config)
    yield app
    close_connections(app)
    if backend == "postgresql" and app.config["DATABASE_URL"].endswith(db_url.split("/")[-1]):
        reset_postgres(app, db_url)
    else:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


def close_connections(app: Flask) -> None:
    """Close the app's libvirt connections: their call threads end now instead of idling
    on for a minute, counted against the process's bound on idle threads."""
    from vmapi.services.nodes.hosts import DRIVER_KEY

    driver = app.extensions.get(DRIVER_KEY)
    while driver is not None and not hasattr(driver, "connections"):
        driver = getattr(driver, "real", None) or getattr(driver, "inner", None)
    if driver is not None:
        driver.connections.clear()


@pytest.fixture
def installation(app: Flask) -> str:
    """The app's installation id (configured, or kept in the test database by the
    migration or the seed): domains are ``<it>-vm-<id>``, volumes ``<it>-storage-<id>``."""
    from vmapi.services.names import installation_id

    with app.app_context():
        return installation_id()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask):
    return app.test_cli_runner()


def make_token(app: Flask, role: str = "admin", customer_id: int | None = None, **kw: Any) -> str:
    from vmapi.services.tokens import create_token

    with app.app_context():
        _token, plain = create_token(role, customer_id, **kw)
        db.session.remove()
    return plain


class Api:
    """The test client with a token and the /api/v1 prefix: ``api.post("node", json=...)``."""

    def __init__(self, client: FlaskClient, token: str | None) -> None:
        self.client = client
        self.token = token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra or {})
        return headers

    def call(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any):
        url = path if path.startswith("/") else f"/api/v1/{path}"
        return self.client.open(url, method=method, headers=self.headers(headers), **kw)

    def get(self, path: str, **kw: Any):
        return self.call("GET", path, **kw)

    def post(self, path: str, **kw: Any):
        return self.call("POST", path, **kw)

    def update(self, path: str, **kw: Any):
        return self.call("UPDATE", path, **kw)

    def patch(self, path: str, **kw: Any):
        return self.call("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any):
        return self.call("DELETE", path, **kw)


@pytest.fixture
def api(app: Flask, client: FlaskClient) -> Api:
    """An admin's view of the API."""
    return Api(client, make_token(app, "admin"))


@pytest.fixture
def customer_api(app: Flask, client: FlaskClient):
    """``customer_api(7)``: the API as customer 7 sees it."""

    def make(customer_id: int) -> Api:
        return Api(client, make_token(app, "customer", customer_id))

    return make


@pytest.fixture
def host_uri(tmp_path):
    """``host_uri(cores=8, ram=16 * GIB)``: a libvirt test-driver host of that size."""
    counter = itertools.count()

    def make(cores: int = 8, ram: int = 16 * GIB) -> str:
        path = tmp_path / f"host{next(counter)}.xml"
        path.write_text(
            "<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes>"
            f"<sockets>1</sockets><cores>{cores}</cores><threads>1</threads></cpu>"
            f"<memory>{ram // 1024}</memory></node>"
        )
        return f"test://{path}"

    return make


def node_body(**overrides: Any) -> dict[str, Any]:
    # Unique without a counter: pytest may import this module twice (as conftest and
    # as tests.conftest), and two counters would hand out the same names.
    n = uuid.uuid4().int % 10_000
    body = {
        "fqdn": f"node-{uuid.uuid4().hex[:12]}.example.com",
        "ipv4_addr_ext": f"192.0.2.{n % 250 + 1}/24",
        "ipv6_addr_ext": f"2001:db8::{n:x}/64",
        "ipv4_gw_ext": "192.0.2.254",
        "ipv6_gw_ext": "2001:db8::1",
        "node_state": {"id": 1},
        "libvirt_uri": "test:///default",
    }
    body.update(overrides)
    return body


@pytest.fixture
def make_node(api: Api):
    """``make_node(**fields)``: POST a node and return its JSON object."""

    def make(**overrides: Any) -> dict[str, Any]:
        response = api.post("node", json=node_body(**overrides))
        assert response.status_code == 201, response.json
        return response.json["data"]

    return make


@pytest.fixture
def test_method(api: Api) -> int:
    """A virt_method for libvirt's test driver (domain type ``test``)."""
    response = api.post("virt_method", json={"name": "TEST", "domain_type": "test"})
    return response.json["data"]["id"]


@pytest.fixture
def vm_host(api: Api, host_uri, test_method: int, address_pools):
    """``vm_host(cores=8, ram=16 * GIB)``: a schedulable node on its own test-driver host,
    with exact capacity (ratios 1.0, nothing reserved) and the TEST virt method; address
    pools exist."""

    def make(cores: int = 8, ram: int = 16 * GIB, **fields: Any) -> dict[str, Any]:
        body = node_body(libvirt_uri=host_uri(cores=cores, ram=ram), cpu_allocation_ratio=1.0,
                         ram_allocation_ratio=1.0, reserved_ram=0, **fields)  # fmt: skip
        node = api.post("node", json=body).json["data"]
        vn = api.post(
            "virt_node", json={"node": {"id": node["id"]}, "virt_method": {"id": test_method}}
        )
        assert vn.status_code == 201, vn.json
        return node

    return make


@dataclass
class Sent:
    """A statement the app sent to the database."""

    statement: str
    parameters: Any
    executemany: bool


@pytest.fixture
def sql_log(app: Flask) -> Iterator[list[Sent]]:
    """Every statement the app's engine sends while the test runs (clear it to start over)."""
    sent: list[Sent] = []
    with app.app_context():
        engine = db.engine

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append(Sent(statement, parameters, executemany))

    sa.event.listen(engine, "before_cursor_execute", record)
    yield sent
    sa.event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def driver(app: Flask):
    """The app's hypervisor driver (to look at domains the way libvirt sees them)."""
    from vmapi.services.nodes.hosts import DRIVER_KEY

    return app.extensions[DRIVER_KEY]


def vm_body(method: int, **overrides: Any) -> dict[str, Any]:
    """The seed's example: 2 cores, 1 GiB."""
    return {"cores": 2, "ram": GIB, "virt_method": {"id": method}, **overrides}


@pytest.fixture
def silent_host():
    """A TCP port that accepts connections and never answers: a hung libvirtd."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"qemu+tcp://127.0.0.1:{server.getsockname()[1]}/system"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture(scope="session")
def guest_image():
    """The test guest's bootable disk image (tests/guest/): built at most once per session
    and reused from its cache outside the repository by later sessions."""
    from tests.guest.build import GuestUnavailable, ensure_guest_image

    try:
        return ensure_guest_image()
    except GuestUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture
def address_pools(api: Api) -> dict[str, Any]:
    """A /24 of IPv4 addresses (253 hosts) and an IPv6 /64 pool, for VMs to take from."""
    v4 = api.post("ipv4", json={"network": "198.51.100.0/24", "gateway": "198.51.100.1"})
    v6 = api.post("ipv6", json={"network": "2001:db8:100::/64", "gateway": "2001:db8:100::1"})
    assert v4.status_code == v6.status_code == 201, (v4.json, v6.json)
    return {"ipv4": v4.json["data"], "ipv6_pool": v6.json["data"]}


@pytest.fixture
def faults(app: Flask):
    """The app's driver wrapped in tests/faults.py's FaultyDriver (a module may define its
    own ``faults`` where its driver lives elsewhere)."""
    from tests.faults import FaultyDriver
    from vmapi.services.nodes.hosts import DRIVER_KEY

    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    yield app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = real


@pytest.fixture
def relay(pg_database: str):
    """A TCP relay to the test's PostgreSQL database that a test can cut
    (tests/dbproxy.py): sessions through it break as in a failover."""
    from tests.dbproxy import DbRelay

    relay = DbRelay(pg_database)
    yield relay
    relay.close()
