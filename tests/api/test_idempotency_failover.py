"""Idempotency keys through a lost database (issue 27): a retry after a 503 answers the
VM that was committed, or makes it once — at once, never after IDEMPOTENCY_WAIT.

The app reaches the real test PostgreSQL through a relay (tests/dbproxy.py) the test
cuts at a chosen step of a create, as a primary that dies cuts it; the server ends
those sessions and their locks. libvirt is its test driver. Only a COMMIT that lands
and still fails is injected (the real one cannot be made to on demand).
"""

import logging
import socket
import threading
import time

import pytest
import sqlalchemy as sa
from flask import g

from tests.api.test_storage import disks, volume
from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from vmapi.config import database_url
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import IdempotencyKey
from vmapi.services.idempotency_lock import lock_ids

KEY = {"Idempotency-Key": "order-1"}


@pytest.fixture
def app_config(relay):
    # BUILD_TIMEOUT 0: reconcile --fix may clean a dead request's building row at once
    return {"DATABASE_URL": relay.url, "BUILD_TIMEOUT": 0}


def cut_at(faults, relay, method):
    """Lose the database when the create calls ``method`` on the node (once)."""

    def before(name, uri, args):
        if name == method and relay.up:
            relay.cut()

    faults.before = before


def running_vms(api):
    return {vm["id"]: vm for vm in api.get("vm").json["data"].values()}


def domains(driver, node):
    return [d.name for d in driver.domains(node["libvirt_uri"])]


def reconcile_fix(runner):
    result = runner.invoke(args=["vmapi", "reconcile", "--fix"])
    assert result.exit_code in (0, 1), result.output
    return result.output


@pytest.mark.parametrize("undone", [True, False])
def test_commit_lost_the_retry_makes_it_once_at_once(api, app, runner, vm_host, test_method,
                                                     faults, relay, driver, undone):  # fmt: skip
    """``undone``: the lost request undid its domain (as it does while its process
    lives); else its domain stayed (as when it died too), and the retry removes it."""
    node = vm_host()
    cut_at(faults, relay, "start")  # the row is building, the domain being started
    if not undone:
        faults.fail("destroy")
    lost = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert_error(lost, 503, "general/unavailable")
    assert lost.headers["Retry-After"] == "5"
    assert len(domains(driver, node)) == (0 if undone else 1)
    faults.before = None
    relay.restore()
    started = time.monotonic()
    retry = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert time.monotonic() - started < 5  # no IDEMPOTENCY_WAIT (55 s) on a dead owner
    assert retry.status_code == 201, retry.json
    assert "Idempotent-Replayed" not in retry.headers
    made = retry.json["data"]
    # the lost request's domain and building row are gone: by its undo or by the retry
    assert domains(driver, node) == [made["domain_name"]]
    assert list(running_vms(api)) == [made["id"]]
    assert "0 finding(s)" in reconcile_fix(runner)
    again = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json["data"]["id"] == made["id"]
    assert domains(driver, node) == [made["domain_name"]]


def test_answer_lost_after_the_commit_the_retry_answers_the_vm(api, app, vm_host, test_method,
                                                               relay, driver):  # fmt: skip
    node = vm_host()
    with app.app_context():
        engine = db.engine

    def before(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE idempotency_key SET status_code") and relay.up:
            relay.cut()  # the VM and its key are committed; the answer is not stored

    sa.event.listen(engine, "before_cursor_execute", before)
    try:
        lost = api.post("vm", json=vm_body(test_method), headers=KEY)
    finally:
        sa.event.remove(engine, "before_cursor_execute", before)
    assert_error(lost, 503, "general/unavailable")
    relay.restore()
    started = time.monotonic()
    retry = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert time.monotonic() - started < 5
    assert retry.status_code == 201, retry.json
    assert retry.headers["Idempotent-Replayed"] == "true"
    (vm,) = running_vms(api).values()
    assert retry.json["data"]["id"] == vm["id"]
    assert domains(driver, node) == [vm["domain_name"]]


@pytest.fixture
def commit_fails_after_landing(app, monkeypatch, relay):
    """The COMMIT that binds a key lands, then the connection breaks before its answer
    (``cut``: and the database stays away while the request asks about it)."""
    from sqlalchemy.exc import OperationalError

    armed = {"cut": False, "hit": False}
    with app.app_context():
        engine = db.engine
    pending = {"made": False}

    def saw(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE idempotency_key SET made"):
            pending["made"] = True

    sa.event.listen(engine, "before_cursor_execute", saw)
    real = db.session.commit

    def commit():
        real()
        if pending["made"] and not armed["hit"]:
            armed["hit"] = True
            if armed["cut"]:
                relay.cut()
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        pending["made"] = False

    with app.app_context():
        monkeypatch.setattr(db.session, "commit", commit)
    yield armed
    sa.event.remove(engine, "before_cursor_execute", saw)


def test_a_commit_that_failed_but_landed_answers_201(api, app, vm_host, test_method, driver,
                                                     commit_fails_after_landing):  # fmt: skip
    node = vm_host()
    with app.app_context():
        first = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert first.status_code == 201, first.json  # asked again: it had landed
    assert commit_fails_after_landing["hit"]
    assert domains(driver, node) == [first.json["data"]["domain_name"]]


def test_an_unknown_commit_keeps_the_domain_and_the_retry_answers_it(
    api, app, vm_host, test_method, driver, relay, commit_fails_after_landing
):
    node = vm_host()
    commit_fails_after_landing["cut"] = True
    with app.app_context():
        lost = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert_error(lost, 503, "general/unavailable")
    assert "cannot say whether it landed" in lost.json["message"]
    relay.restore()
    (vm,) = running_vms(api).values()
    # the domain was not undone under a row that had committed
    assert domains(driver, node) == [vm["domain_name"]]
    retry = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json["data"]["id"] == vm["id"]


def lose_the_commit_answer(app, relay, statement, delay):
    """The COMMIT after the create's ``statement`` (a prefix) reaches the server
    ``delay`` s after the app saw its connection break (tests/dbproxy.py), once."""
    with app.app_context():
        engine = db.engine
    armed = []

    def before(conn, cursor, sent, parameters, context, executemany):
        if sent.startswith(statement) and not armed:
            with socket.fromfd(cursor.connection.fileno(), socket.AF_INET,
                               socket.SOCK_STREAM) as sock:  # fmt: skip
                armed.append(sock.getsockname()[1])
            relay.lose_answer(armed[0], delay)

    sa.event.listen(engine, "before_cursor_execute", before)
    return lambda: sa.event.remove(engine, "before_cursor_execute", before) or armed


def vm_rows(app):
    with app.app_context():
        rows = db.session.execute(sa.text("SELECT id FROM vm ORDER BY id")).scalars().all()
        db.session.remove()
    return rows


@pytest.mark.parametrize("delay", [0, 0.5])
@pytest.mark.parametrize("array", [False, True])
def test_building_commit_landed_unanswered_the_retry_makes_it_once(
    api, app, runner, vm_host, test_method, relay, driver, delay, array
):
    """The commit of the building row reaches the server but its answer is lost (``delay``:
    the server commits it after the app's connection broke). The request answers 503 and
    keeps its key (never given up with the row committed): the retry removes that row and
    makes the VM once."""
    node = vm_host()
    body = [vm_body(test_method), vm_body(test_method)] if array else vm_body(test_method)
    stop = lose_the_commit_answer(app, relay, "UPDATE idempotency_key SET building", delay)
    try:
        lost = api.post("vm", json=body, headers=KEY)
    finally:
        assert stop(), "the building row's commit was not reached"
    assert_error(lost, 503, "general/unavailable")
    assert "retry with the same Idempotency-Key" in lost.json["message"]
    assert len(vm_rows(app)) == (2 if array else 1)  # it landed, building
    retry = api.post("vm", json=body, headers=KEY)
    assert retry.status_code == 201, retry.json
    assert "Idempotent-Replayed" not in retry.headers
    made = list(retry.json["data"].values()) if array else [retry.json["data"]]
    assert vm_rows(app) == sorted(vm["id"] for vm in made)
    assert sorted(domains(driver, node)) == sorted(vm["domain_name"] for vm in made)
    assert "0 finding(s)" in reconcile_fix(runner)


def test_a_row_its_undo_could_not_forget_keeps_the_key(api, app, runner, vm_host, test_method,
                                                       faults, relay, driver):  # fmt: skip
    """The database goes as the VM starts, so the undo cannot forget the building row; it
    is back (another proxy, a promoted standby) by the time the key would be given up:
    the key is kept, so the retry removes that row and makes the VM once."""
    node = vm_host()
    cut_at(faults, relay, "start")

    class Back(logging.Handler):
        def emit(self, record):
            if "undo step failed: forgetting vm-" in record.getMessage():
                relay.restore()

    back = Back()
    logging.getLogger("vmapi.services.undo").addHandler(back)
    try:
        lost = api.post("vm", json=vm_body(test_method), headers=KEY)
    finally:
        logging.getLogger("vmapi.services.undo").removeHandler(back)
    faults.before = None
    assert_error(lost, 503, "general/unavailable")
    assert relay.up and len(vm_rows(app)) == 1  # (restored: the undo's log was seen)
    retry = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert retry.status_code == 201, retry.json
    assert "Idempotent-Replayed" not in retry.headers
    assert vm_rows(app) == [retry.json["data"]["id"]]
    assert domains(driver, node) == [retry.json["data"]["domain_name"]]
    assert "0 finding(s)" in reconcile_fix(runner)


@pytest.mark.parametrize("delay", [0, 0.5])
def test_made_commit_landing_late_answers_201(api, app, vm_host, test_method, relay, driver,
                                              delay):  # fmt: skip
    """The commit naming the VM made reaches the server after the app saw the connection
    break: asked on a new connection, which waits for that transaction, it landed."""
    node = vm_host()
    stop = lose_the_commit_answer(app, relay, "UPDATE idempotency_key SET made", delay)
    try:
        first = api.post("vm", json=vm_body(test_method), headers=KEY)
    finally:
        assert stop()
    assert first.status_code == 201, first.json
    assert vm_rows(app) == [first.json["data"]["id"]]
    assert domains(driver, node) == [first.json["data"]["domain_name"]]


def test_two_retries_racing_for_a_dead_owners_key_make_one_vm(
    api, app, runner, vm_host, test_method, faults, relay, driver
):
    node = vm_host()
    cut_at(faults, relay, "start")
    assert_error(api.post("vm", json=vm_body(test_method), headers=KEY), 503,
                 "general/unavailable")  # fmt: skip
    faults.before = None
    relay.restore()
    answers = []
    barrier = threading.Barrier(2)

    def retry():
        client = app.test_client()
        barrier.wait()
        answers.append(client.post("/api/v1/vm", json=vm_body(test_method),
                                   headers=api.headers(KEY)))  # fmt: skip

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(a.status_code for a in answers) == [201, 201], [a.json for a in answers]
    assert sorted(a.headers.get("Idempotent-Replayed", "") for a in answers) == ["", "true"]
    assert answers[0].json["data"]["id"] == answers[1].json["data"]["id"]
    assert "0 finding(s)" in reconcile_fix(runner)
    assert list(running_vms(api)) == [answers[0].json["data"]["id"]]
    assert len(domains(driver, node)) == 1


def live_owner(app, relay, key):
    """A request that runs ``key`` and is alive: the key's row without an answer, and its
    lock held on a session of its own."""
    with app.app_context():
        token_id = db.session.scalar(sa.text("SELECT min(id) FROM api_token"))
        db.session.add(IdempotencyKey(token_id=token_id, key=key, owner="someone",
                                      fingerprint="", created_at=sa.func.now()))  # fmt: skip
        db.session.commit()
    engine = sa.create_engine(database_url(relay.url), poolclass=sa.pool.NullPool)
    conn = engine.connect()
    conn.execute(sa.select(sa.func.pg_advisory_lock(*lock_ids(token_id, key))))
    conn.commit()
    return engine, conn


def test_a_live_owner_is_waited_for_and_a_dead_one_is_not(api, app, vm_host, test_method,
                                                          relay):  # fmt: skip
    vm_host()
    app.config["IDEMPOTENCY_WAIT"] = 0.5
    engine, conn = live_owner(app, relay, "order-1")
    with app.app_context():  # the row's fingerprint: this request's
        from vmapi.services.idempotency import fingerprint

        stamp = fingerprint("POST", "/api/v1/vm", vm_body(test_method))
        db.session.execute(sa.update(IdempotencyKey).values(fingerprint=stamp))
        db.session.commit()
    started = time.monotonic()
    assert_error(api.post("vm", json=vm_body(test_method), headers=KEY), 409,
                 "general/idempotency_conflict")  # fmt: skip
    assert 0.5 <= time.monotonic() - started < 3
    conn.close()  # the owner's session ends (its process died)
    engine.dispose()
    started = time.monotonic()
    taken = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert taken.status_code == 201 and "Idempotent-Replayed" not in taken.headers
    assert time.monotonic() - started < 3
    assert len(running_vms(api)) == 1


def test_a_request_taken_over_while_alive_makes_nothing(api, app, vm_host, test_method,
                                                        faults, pg_database, driver):  # fmt: skip
    """Its lock's session ends while the request itself still runs (paused on its node):
    a retry takes the key over, removes its building VM and makes its own; the first
    one, resumed, fails and leaves nothing."""
    node = vm_host()
    paused, resume = threading.Event(), threading.Event()

    def before(name, uri, args):
        if name == "domain" and not paused.is_set():
            paused.set()
            resume.wait(30)

    faults.before = before
    answers = []

    def first():
        answers.append(app.test_client().post("/api/v1/vm", json=vm_body(test_method),
                                              headers=api.headers(KEY)))  # fmt: skip

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert paused.wait(30)
        with app.app_context():
            token_id = db.session.scalar(sa.text("SELECT min(id) FROM api_token"))
            db.session.remove()
        namespace, digest = lock_ids(token_id, KEY["Idempotency-Key"])
        admin = sa.create_engine(database_url(pg_database), poolclass=sa.pool.NullPool)
        with admin.connect() as conn:
            (pid,) = conn.execute(sa.text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2"
                " AND classid::bigint = :ns AND objid::bigint = :h AND database = (SELECT oid"
                " FROM pg_database WHERE datname = current_database())"),
                {"ns": namespace & 0xFFFFFFFF, "h": digest & 0xFFFFFFFF}).scalars().all()  # fmt: skip
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.dispose()
        retry = api.post("vm", json=vm_body(test_method), headers=KEY)
        assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    finally:
        resume.set()
        thread.join(30)
    (lost,) = answers
    assert lost.status_code == 502, lost.json  # its domain was gone: vm/hypervisor_error
    made = retry.json["data"]
    assert list(running_vms(api)) == [made["id"]]
    assert domains(driver, node) == [made["domain_name"]]
    again = api.post("vm", json=vm_body(test_method), headers=KEY)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json["data"]["id"] == made["id"]


def test_the_key_row_is_fenced_by_its_owner(app, api):
    """A request whose key was taken over cannot bind what it made (nor answer): its
    commit is refused before it happens."""
    from vmapi.errors import DatabaseLost
    from vmapi.services import idempotency

    with app.test_request_context():
        token_id = db.session.scalar(sa.text("SELECT min(id) FROM api_token"))
        assert idempotency.claim(token_id, "k", "print", 3600, "old-owner") is None
        record = idempotency.find(token_id, "k")
        assert idempotency.take_over(record, "new-owner")
        g.idempotency = idempotency.Running(token_id, "k", "old-owner")
        with pytest.raises(DatabaseLost):
            idempotency.commit_made([1])
        idempotency.store_answer(g.idempotency, 201, "application/json", b"{}")
        record = idempotency.find(token_id, "k")
        assert (record.owner, record.made, record.status_code) == ("new-owner", None, None)
        db.session.remove()


# ---------------------------------------------------------------------- POST /storage
# A storage row is committed before its volume is made, named building on its key's row;
# the key names it made only in the request's last commit. A retry that takes the key
# over from a request lost in between removes that row with its volume and disk.


def storage_body(vm):
    return {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}


@pytest.fixture
def disk_vm(api, vm_host, test_method, installation):
    node = vm_host()
    made = api.post("vm", json=vm_body(test_method)).json["data"]  # (no key: plain)
    return {**made, "uri": node["libvirt_uri"], "installation": installation}


def pool_volumes(driver, vm):
    """The storage volumes in the pool of storage type 1 (none while it does not exist)."""
    try:
        names = driver.volumes(vm["uri"], "vmapi")
    except HypervisorError:
        return []
    return sorted(name for name in names if "-storage-" in name)


def lose_the_database_at(app, relay, statement, then=None):
    """Cut the relay as the create sends ``statement`` (a prefix), once (and ``then``)."""
    with app.app_context():
        engine = db.engine

    def before(conn, cursor, sent, parameters, context, executemany):
        if sent.startswith(statement) and relay.up:
            relay.cut()
            if then is not None:
                then()

    sa.event.listen(engine, "before_cursor_execute", before)
    return lambda: sa.event.remove(engine, "before_cursor_execute", before)


def dies_with_it(faults):
    """The request's process dies with its database: its undo never redefines the
    domain, so its disk stays. (A lost request that lives on cannot delete its volumes
    either: which backend a volume is on is read from the database.)"""
    faults.fail("define")


def assert_only(api, driver, vm, made):
    """``made`` (the answer's storage objects) is all there is: rows, volumes, disks."""
    ids = [storage["id"] for storage in made]
    assert sorted(int(i) for i in api.get("storage").json["data"]) == ids
    assert pool_volumes(driver, vm) == sorted(volume(vm, i) for i in ids)
    found = disks(driver, vm)
    assert len(found) == len(ids)
    paths = {driver.volume(vm["uri"], "vmapi", volume(vm, i))[0] for i in ids}
    assert {disk.find("source").get("file") for disk in found.values()} == paths


@pytest.mark.parametrize("undone", [True, False])
def test_storage_lost_before_made_the_retry_makes_one_volume(api, app, disk_vm, faults, relay,
                                                             driver, undone):  # fmt: skip
    """The row, its volume and its disk were committed and made; the database goes just
    before the key names it made. ``undone``: the lost request took its disk out of the
    domain's definition (as it does while its process lives); else it stayed (it died
    too). Its row and volume stay either way."""
    body = storage_body(disk_vm)
    stop = lose_the_database_at(app, relay, "UPDATE idempotency_key SET made",
                                None if undone else lambda: dies_with_it(faults))  # fmt: skip
    try:
        lost = api.post("storage", json=body, headers=KEY)
    finally:
        stop()
    assert_error(lost, 503, "general/unavailable")
    assert pool_volumes(driver, disk_vm) == [volume(disk_vm, 1)]
    assert len(disks(driver, disk_vm)) == (0 if undone else 1)
    relay.restore()
    with app.app_context():  # the lost request's row is there (it could not forget it)
        assert db.session.scalar(sa.text("SELECT count(*) FROM storage")) == 1
        db.session.remove()
    started = time.monotonic()
    retry = api.post("storage", json=body, headers=KEY)
    assert time.monotonic() - started < 5
    assert retry.status_code == 201, retry.json
    assert "Idempotent-Replayed" not in retry.headers
    made = retry.json["data"]
    assert made["id"] == 2 and made["size"] == GIB
    assert_only(api, driver, disk_vm, [made])
    again = api.post("storage", json=body, headers=KEY)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json["data"]["id"] == made["id"]
    assert_only(api, driver, disk_vm, [made])


@pytest.mark.parametrize("undone", [True, False])
def test_storage_array_lost_part_way_the_retry_makes_it_once(api, app, disk_vm, faults, relay,
                                                             driver, undone):  # fmt: skip
    """An array dies at its second element (its row committed, its volume being made;
    the first element whole): the key names neither made, the retry removes both and
    makes the array once."""
    body = [storage_body(disk_vm), storage_body(disk_vm)]
    calls = []

    def before(name, uri, args):
        if name == "create_volume":
            calls.append(args)
            if len(calls) == 2 and relay.up:
                relay.cut()
                if not undone:
                    dies_with_it(faults)

    faults.before = before
    lost = api.post("storage", json=body, headers=KEY)
    faults.before = None
    assert_error(lost, 503, "general/unavailable")
    assert len(pool_volumes(driver, disk_vm)) == 2
    assert len(disks(driver, disk_vm)) == (0 if undone else 1)  # the first's
    relay.restore()
    retry = api.post("storage", json=body, headers=KEY)
    assert retry.status_code == 201, retry.json
    made = list(retry.json["data"].values())
    assert [storage["id"] for storage in made] == [3, 4]
    assert_only(api, driver, disk_vm, made)
    assert sorted(disks(driver, disk_vm)) == ["vdb", "vdc"]
    again = api.post("storage", json=body, headers=KEY)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert sorted(again.json["data"]) == sorted(retry.json["data"])


def test_storage_lost_before_its_pool_existed_is_removed(api, app, disk_vm, faults, relay,
                                                         driver):  # fmt: skip
    """The first volume of the node: the row is committed, then the database goes before
    the pool is made. Its volume was never made (nor its pool): the row alone goes."""
    body = storage_body(disk_vm)

    def before(name, uri, args):
        if name == "ensure_pool" and relay.up:
            relay.cut()
            faults.fail("ensure_pool")  # (and the request, dying, never makes it)

    faults.before = before
    assert_error(api.post("storage", json=body, headers=KEY), 503, "general/unavailable")
    faults.before = None
    relay.restore()
    with pytest.raises(HypervisorError, match="not found"):  # no pool yet
        driver.volumes(disk_vm["uri"], "vmapi")
    retry = api.post("storage", json=body, headers=KEY)
    assert retry.status_code == 201, retry.json
    assert_only(api, driver, disk_vm, [retry.json["data"]])


def test_storage_on_a_node_that_does_not_answer_waits_for_it(api, app, disk_vm, faults, relay,
                                                             driver):  # fmt: skip
    """The node does not answer while the retry removes what the lost request left: the
    retry makes nothing (its volume would be a second one) and says so; the key still
    names the lost row, and the next retry removes it and makes the one volume."""
    body = storage_body(disk_vm)
    stop = lose_the_database_at(app, relay, "UPDATE idempotency_key SET made",
                                lambda: dies_with_it(faults))  # fmt: skip
    try:
        assert_error(api.post("storage", json=body, headers=KEY), 503, "general/unavailable")
    finally:
        stop()
    relay.restore()
    faults.fail("domain", "unavailable")  # the removal's first look at the domain
    refused = api.post("storage", json=body, headers=KEY)
    error = assert_error(refused, 502, "vm/hypervisor_error")
    assert "left unfinished could not be removed yet" in error["message"]
    assert error["data"]["step"] == "detaching the disk"
    assert sorted(int(i) for i in api.get("storage").json["data"]) == [1]
    assert pool_volumes(driver, disk_vm) == [volume(disk_vm, 1)]
    retry = api.post("storage", json=body, headers=KEY)
    assert retry.status_code == 201, retry.json
    assert "Idempotent-Replayed" not in retry.headers
    assert_only(api, driver, disk_vm, [retry.json["data"]])


def test_storage_of_a_busy_vm_waits_for_it(api, app, disk_vm, faults, relay, driver,
                                           pg_database):  # fmt: skip
    """Another operation holds the VM's lock while the retry would remove what the lost
    request left: 409 ``vm/busy``, nothing made; once the VM is free a retry makes one."""
    from vmapi.services.locks import LOCK_SPACE

    body = storage_body(disk_vm)
    stop = lose_the_database_at(app, relay, "UPDATE idempotency_key SET made")
    try:
        assert_error(api.post("storage", json=body, headers=KEY), 503, "general/unavailable")
    finally:
        stop()
    relay.restore()
    app.config["VM_LOCK_TIMEOUT"] = 0.2
    engine = sa.create_engine(database_url(pg_database), poolclass=sa.pool.NullPool)
    with engine.connect() as other:
        other.execute(sa.select(sa.func.pg_advisory_lock(LOCK_SPACE, disk_vm["id"])))
        other.commit()
        error = assert_error(api.post("storage", json=body, headers=KEY), 409, "vm/busy")
        assert "left unfinished could not be removed yet" in error["message"]
        assert sorted(int(i) for i in api.get("storage").json["data"]) == [1]
    engine.dispose()
    retry = api.post("storage", json=body, headers=KEY)
    assert retry.status_code == 201, retry.json
    assert_only(api, driver, disk_vm, [retry.json["data"]])


def test_storage_building_commit_landed_unanswered_makes_one_volume(api, app, disk_vm, relay,
                                                                    driver):  # fmt: skip
    """The storage row's commit lands after its connection broke: 503, the key kept; the
    retry removes that row and makes the one volume."""
    body = storage_body(disk_vm)
    stop = lose_the_commit_answer(app, relay, "UPDATE idempotency_key SET building", 0.5)
    try:
        assert_error(api.post("storage", json=body, headers=KEY), 503, "general/unavailable")
    finally:
        assert stop()
    retry = api.post("storage", json=body, headers=KEY)
    assert retry.status_code == 201, retry.json
    assert "Idempotent-Replayed" not in retry.headers
    assert_only(api, driver, disk_vm, [retry.json["data"]])
