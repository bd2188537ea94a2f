"""Failures of a multi-host deployment under a load of creates, deletes and reads.

The fleet (tests/failover/conftest.py): etcd, two PostgreSQL members under Patroni in
synchronous mode, HAProxy in front of them, two gunicorn API hosts behind nginx, each in a
network namespace. Each test prints what it measured (run with -s, or read the captured
output of a failure).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from tests.concurrency.conftest import ROOT, our_domains
from tests.failover.conftest import API_HOSTS, Fleet, restore
from tests.failover.hosts import PROXIES
from tests.failover.load import MIB, Load, UnixHTTPConnection, call
from vmapi.services.images.transfers import upload_key

#: the test's nginx log_format (tests/failover/conftest.py)
LOG_LINE = re.compile(r'(\S+) (\S+) (\S+) "([^"]*)" "([^"]*)"')

pytestmark = [pytest.mark.failover, pytest.mark.needs_postgres, pytest.mark.needs_libvirt]


def other(member: str) -> str:
    return "n2" if member == "n1" else "n1"


def wait_until(check: Callable[[], object], timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic()


def created_after(load: Load, since: float) -> Callable[[], bool]:
    return lambda: any(a.op == "create" and a.status == 201 and a.start > since
                       for a in list(load.answers))  # fmt: skip


def vm_rows(fleet: Fleet, member: str) -> dict[int, str]:
    """id -> hostname of every VM row on ``member`` (the primary now)."""
    conn = fleet.hosts.pg(member, "vmapi")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, hostname FROM vm")
            return dict(cur.fetchall())
    finally:
        conn.close()


def domain_ids(fleet: Fleet) -> set[int]:
    prefix = f"{fleet.installation}-vm-"
    return {int(name.removeprefix(prefix)) for name in our_domains(fleet.installation)
            if name.startswith(prefix)}  # fmt: skip


def check_answers(load: Load) -> None:
    """No 5xx but 503 (with Retry-After), no request without an answer, at any time."""
    assert not load.server_errors(), load.server_errors()[:5]
    assert not load.unavailable_without_retry_after(), load.unavailable_without_retry_after()[:5]


def check_acknowledged(load: Load, fleet: Fleet, primary: str) -> None:
    """Every VM whose create answered 201 is in the database and has its domain, unless
    its delete answered 200; a deleted VM has neither."""
    rows, domains = vm_rows(fleet, primary), domain_ids(fleet)
    made = set(load.made.values())
    kept = made - load.deleted
    assert not kept - set(rows), f"acknowledged VMs lost: {sorted(kept - set(rows))}"
    assert not kept - domains, f"acknowledged VMs without a domain: {sorted(kept - domains)}"
    assert not load.deleted & set(rows), f"deleted VMs still there: {load.deleted & set(rows)}"


def summary(load: Load, since: float) -> str:
    statuses: dict[tuple[str, int], int] = {}
    for a in load.answers:
        statuses[a.op, a.status] = statuses.get((a.op, a.status), 0) + 1
    outage = load.outage(since)
    seconds = f"{outage[1] - outage[0]:.2f} s" if outage and outage[1] else "none"
    return (f"requests {len(load.answers)}, failed {len(load.failed())}, "
            f"creates outage {seconds} (first failed to first 201), longest time without a "
            f"201 {load.longest_gap(since):.2f} s, answers {sorted(statuses.items())}")  # fmt: skip


def test_primary_node_killed_under_load(fleet: Fleet) -> None:
    """The primary's node dies (its Patroni and its postmaster, SIGKILL): the standby is
    promoted about ttl later; meanwhile 503s with Retry-After, never a 500; every
    acknowledged create is there afterwards."""
    hosts = fleet.hosts
    leader = hosts.wait_healthy()
    with Load(fleet.nginx, fleet.token, fleet.body) as load:
        time.sleep(2)
        killed = time.monotonic()
        hosts.kill_member(leader)
        promoted = wait_until(lambda: hosts.writable(other(leader)), 30, "standby promoted")
        wait_until(created_after(load, promoted), 30, "a create succeeds after the promotion")
        time.sleep(0.5)
    print(f"\nnode of {leader} killed: promoted after {promoted - killed:.2f} s; "
          + summary(load, killed))  # fmt: skip
    check_answers(load)
    outage = load.outage(killed)
    assert outage is not None, "no create failed: the kill did not reach the load"
    assert outage[1] is not None and outage[1] - outage[0] <= 30, outage
    check_acknowledged(load, fleet, other(leader))
    # reconcile finds and removes the domains of creates whose commit was lost with the
    # primary; afterwards no domain of the installation is without its row
    done = reconcile(fleet, other(leader))
    assert done.returncode == 0, done.stdout + done.stderr
    orphans = domain_ids(fleet) - set(vm_rows(fleet, other(leader)))
    assert not orphans, (sorted(orphans), done.stdout)
    check_acknowledged(load, fleet, other(leader))


def reconcile(fleet: Fleet, primary: str) -> subprocess.CompletedProcess:
    """``flask vmapi reconcile --fix`` against the new primary (over its Unix socket; builds
    left by a dead request count as stale at once)."""
    env = {**fleet.env, "VMAPI_DATABASE_URL": fleet.local_url(primary),
           "VMAPI_BUILD_TIMEOUT": "0"}  # fmt: skip
    command = [sys.executable, "-m", "flask", "--app", "wsgi", "vmapi", "reconcile", "--fix"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    print(f"reconcile --fix: {done.stdout.strip().splitlines()[-1:]}")
    return done


def test_a_create_retried_with_its_key_after_a_503_is_made_once(fleet: Fleet) -> None:
    """The primary's postmaster is killed (Patroni restarts it in place): every create
    that answered 503 and was retried with its key ends in 201 with exactly one VM."""
    hosts = fleet.hosts
    leader = hosts.wait_healthy()
    with Load(fleet.nginx, fleet.token, fleet.body, creators=6, deleters=0, readers=0) as load:
        time.sleep(1.5)
        killed = time.monotonic()
        assert hosts.signal_postmaster(leader, signal.SIGKILL)
        back = wait_until(lambda: hosts.leader(), 30, "a primary again")
        wait_until(created_after(load, back), 30, "a create succeeds afterwards")
        time.sleep(0.5)
    print(f"\npostmaster of {leader} killed; {len(load.retried)} keys retried; "
          + summary(load, killed))  # fmt: skip
    assert load.retried, "no create was retried: the kill did not reach the load"
    check_retried_made_once(load, vm_rows(fleet, hosts.leader()))


def check_retried_made_once(load: Load, rows: dict[int, str]) -> None:
    """Every key retried after a 503 ended in 201, with exactly one VM of its hostname on
    the primary (none if that VM's delete answered 200)."""
    by_hostname: dict[str, list[int]] = {}
    for ident, hostname in rows.items():
        by_hostname.setdefault(hostname, []).append(ident)
    finals = {}
    for a in sorted(load.of("create"), key=lambda a: a.end):
        finals[a.key] = a
    wrong = {}
    for key in load.retried:
        made = by_hostname.get(f"k{key[:20]}", [])
        expected = 0 if load.made.get(key) in load.deleted else 1
        if finals[key].status != 201 or len(made) != expected:
            wrong[key] = (finals[key].status, finals[key].error_id, made)
    assert not wrong, f"retried keys not answered with exactly one VM: {wrong}"


def test_only_the_primarys_patroni_killed(fleet: Fleet) -> None:
    """Only the primary's Patroni dies (SIGKILL): its PostgreSQL keeps running and taking
    connections, and once the standby is promoted its commits would wait forever for a
    synchronous standby that is gone. HAProxy's check of Patroni's ``GET /primary`` fails:
    it marks the member down and cuts its sessions (the requests on them answer 503 and
    are retried with their keys); the standby is promoted about ttl later and creates
    succeed again through HAProxy; every acknowledged VM is on the new primary, none only
    on the old one. Restarting the member's Patroni demotes and rewinds it (restore)."""
    hosts = fleet.hosts
    leader = hosts.wait_healthy()
    standby = other(leader)
    with Load(fleet.nginx, fleet.token, fleet.body) as load:
        time.sleep(2)
        assert hosts.sessions_from(leader, "dbproxy"), "no connection through HAProxy"
        killed = time.monotonic()
        hosts.kill(f"patroni-{leader}")
        hosts.processes[f"patroni-{leader}"].wait(timeout=10)
        down = wait_until(lambda: hosts.haproxy_states().get(leader) == "DOWN", 10,
                          "HAProxy marks the old primary down")  # fmt: skip
        cut = wait_until(lambda: all(hosts.sessions_from(leader, h) == 0 for h in PROXIES.values()),
                         5, "the HAProxies cut their sessions to the old primary")  # fmt: skip
        promoted = wait_until(lambda: hosts.writable(standby), 30, "standby promoted")
        # the trap HAProxy is there for: the old primary still runs and is writable
        assert hosts.writable(leader), "the old primary's PostgreSQL stopped"
        wait_until(created_after(load, promoted), 30, "a create succeeds after the promotion")
        time.sleep(0.5)
    print(f"\nPatroni of {leader} killed: HAProxy marked it down after {down - killed:.2f} s, "
          f"its sessions gone after {cut - killed:.2f} s, {standby} promoted after "
          f"{promoted - killed:.2f} s; {len(load.retried)} keys retried; "
          + summary(load, killed))  # fmt: skip
    check_answers(load)
    assert load.retried, "no create was retried: the kill did not reach the load"
    assert load.longest_gap(killed) <= 30, summary(load, killed)
    outage = load.outage(killed)
    assert outage is None or (outage[1] is not None and outage[1] - outage[0] <= 30), outage
    new_rows, old_rows = vm_rows(fleet, standby), vm_rows(fleet, leader)
    check_acknowledged(load, fleet, standby)
    check_retried_made_once(load, new_rows)
    only_old = (set(load.made.values()) - load.deleted) & (set(old_rows) - set(new_rows))
    assert not only_old, f"acknowledged VMs only on the old primary: {sorted(only_old)}"
    # its Patroni started again: the old primary is demoted, rewound and becomes the new
    # primary's synchronous standby; HAProxy keeps sending everything to the new one
    started = time.monotonic()
    restore(fleet)
    assert hosts.wait_healthy() == standby
    assert hosts.writable(leader) is False
    print(f"{leader} back as the synchronous standby after {time.monotonic() - started:.2f} s")


def test_an_haproxy_host_killed_under_load(fleet: Fleet) -> None:
    """The first HAProxy of the API hosts' multi-host URL dies (SIGKILL): the requests on
    its connections fail with 503 (retried with their keys), new connections go to the
    second one (libpq tries the next host of the URL), and creates go on; nothing
    acknowledged is lost, and the primary never changed."""
    hosts = fleet.hosts
    leader = hosts.wait_healthy()
    first, second = PROXIES.values()
    with Load(fleet.nginx, fleet.token, fleet.body) as load:
        time.sleep(2)
        assert hosts.sessions_from(leader, first), "no connection through the first HAProxy"
        killed = time.monotonic()
        hosts.kill("haproxy")
        hosts.processes["haproxy"].wait(timeout=10)
        wait_until(created_after(load, killed), 30, "a create succeeds after the kill")
        moved = wait_until(lambda: hosts.sessions_from(leader, second), 10,
                           "connections through the second HAProxy")  # fmt: skip
        time.sleep(2)
    print(f"\nHAProxy on {first} killed: connections through {second} after "
          f"{moved - killed:.2f} s; {summary(load, killed)}")  # fmt: skip
    check_answers(load)
    assert hosts.wait_healthy() == leader
    assert load.longest_gap(killed) <= 10, summary(load, killed)
    check_acknowledged(load, fleet, leader)
    check_retried_made_once(load, vm_rows(fleet, leader))


def test_an_api_host_killed_under_load(fleet: Fleet) -> None:
    """One API host's gunicorn is killed (SIGKILL, master and workers): only the requests
    in flight on it fail (nginx sends a POST on to no other host); nginx sends it nothing
    more (passive health check), everything else is answered by the other host."""
    with Load(fleet.nginx, fleet.token, fleet.body) as load:
        time.sleep(2)
        killed_wall = time.time()
        fleet.kill_api("api1")
        # a request sent between the signal and the processes' end was in flight on it
        killed = time.monotonic()
        time.sleep(5)
    print(f"\napi1 killed; {summary(load, killed)}")
    failed = load.failed()
    assert all(a.start < killed for a in failed), [a for a in failed if a.start >= killed]
    # nginx's 502: the host's connection broke under a POST, which nginx does not send on
    # (a DELETE it sent on, whose first try had committed, finds the VM gone); no answer
    # (0): nginx had begun relaying the killed host's answer, which it cannot send on
    assert all(a.status in (502, 0) or (a.op, a.status) == ("delete", 404) for a in failed), failed
    assert not [a for a in load.answers if a.status == 500]
    api1 = f"{fleet.hosts.ip('api1')}:8000"
    api2 = f"{fleet.hosts.ip('api2')}:8000"
    later = []
    for line in (fleet.hosts.base / "nginx/access.log").read_text().splitlines():
        msec, _method, _status, upstream, _statuses = LOG_LINE.fullmatch(line).groups()
        if float(msec) > killed_wall + 0.5:
            later.append(upstream)
    assert later, "nginx logged nothing after the kill"
    assert all(u.split(", ")[-1] == api2 for u in later), [u for u in later if api2 not in u]
    tried = sum(api1 in u for u in later)
    print(f"after the kill: {len(later)} requests, {tried} first tried on api1 (refused)")
    assert tried <= 1  # one probe within fail_timeout (10 s) at most


def test_partitioned_primary_is_fenced(fleet: Fleet) -> None:
    """The primary's link is cut: its Patroni cannot renew the leader key and demotes it
    before the key expires and the standby is promoted; at no time are both members
    writable (seen from the test, which still reaches the cut member over its Unix
    socket); every acknowledged create is on the new primary."""
    hosts = fleet.hosts
    leader = hosts.wait_healthy()
    standby = other(leader)
    samples: list[tuple[float, bool | None, bool | None]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), hosts.writable(leader), hosts.writable(standby)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with Load(fleet.nginx, fleet.token, fleet.body) as load:
            time.sleep(2)
            cut = time.monotonic()
            hosts.cut(leader)
            promoted = wait_until(lambda: hosts.writable(standby), 40, "standby promoted")
            wait_until(created_after(load, promoted), 30, "a create succeeds after it")
            time.sleep(0.5)
    finally:
        stop.set()
        sampler.join(timeout=10)
    demoted = next((t for t, old, _new in samples if t > cut and old is not True), None)
    first_new = next(t for t, _old, new in samples if new is True)
    assert demoted is not None, "the cut-off primary stayed writable"
    print(
        f"\n{leader} cut off: it stopped being writable after {demoted - cut:.2f} s, "
        f"{standby} writable after {first_new - cut:.2f} s; {summary(load, cut)}"
    )
    assert not [s for s in samples if s[1] is True and s[2] is True], "two writable primaries"
    assert demoted < first_new
    check_answers(load)
    check_acknowledged(load, fleet, standby)


def put_file(
    sock: str, token: str, image: int, data: bytes, held: threading.Event, answer: list
) -> None:
    """An upload over ``sock``: its headers and first 64 KiB, then nothing until
    ``held`` is set, then the rest; ``answer`` gets (status, envelope)."""
    head = (f"PUT /api/v1/image/{image}/file HTTP/1.1\r\nHost: vmapi.test\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(90)
        conn.connect(sock)
        conn.sendall(head.encode() + data[: 64 * 1024])
        held.wait(60)
        with contextlib.suppress(BrokenPipeError):  # (answered early: the answer says why)
            conn.sendall(data[64 * 1024 :])
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    answer.append((status, json.loads(reply.split(b"\r\n\r\n", 1)[1])))


def test_the_image_store_and_upload_lock_hold_across_api_hosts(fleet: Fleet) -> None:
    """The image store is one directory both API hosts mount (VMAPI_IMAGE_DIR, as README
    says) and an image's upload lock is PostgreSQL's: while an upload crawls into api1,
    api2 refuses a second upload of that image (409 image/busy, before it reads a byte);
    the file api1 wrote is what api2 serves."""
    hosts = fleet.hosts
    api1, api2 = (str(hosts.base / f"{host}.sock") for host in API_HOSTS)
    status, _, made = call(api1, "POST", "/api/v1/image", fleet.token,
                           {"name": "shared", "format": "raw"})  # fmt: skip
    assert status == 201, made
    image = made["data"]["id"]
    data = os.urandom(4 * MIB)
    held, answer = threading.Event(), []
    upload = threading.Thread(target=put_file, daemon=True,
                              args=(api1, fleet.token, image, data, held, answer))  # fmt: skip
    upload.start()
    leader = hosts.wait_healthy()
    try:
        # the upload holds the image's upload lock (PostgreSQL's, taken before a byte is
        # read): then api2 is asked to take an upload of its own
        asked = time.monotonic()
        wait_until(lambda: upload_locked(fleet, leader, image) or answer, 30,
                   "api1's upload holding the image's lock")  # fmt: skip
        assert not answer, f"the upload on api1 ended early: {answer}"
        refused = time.monotonic()
        status, body = put_bytes(api2, fleet.token, image, b"second upload")
        assert (status, body.get("error_id")) == (409, "image/busy"), body
    finally:
        held.set()
        upload.join(90)
    assert answer and answer[0][0] == 200, answer
    assert answer[0][1]["data"]["checksum"] == hashlib.sha256(data).hexdigest()
    # the lock went with the upload; the image is active: its file never changes
    status, body = put_bytes(api2, fleet.token, image, b"second upload")
    assert (status, body.get("error_id")) == (409, "image/immutable"), body
    served = served_file(api2, fleet.token, image)
    assert served == data
    print(f"\napi1's upload held the lock {refused - asked:.2f} s after it was sent; api2 "
          f"refused a second one, and served the {len(served)} bytes api1 stored")  # fmt: skip


def upload_locked(fleet: Fleet, member: str, image: int) -> bool:
    """Whether a session holds ``image``'s upload lock (an advisory lock on one bigint key:
    pg_locks shows its high and low 32 bits)."""
    key = upload_key(image) & 0xFFFFFFFFFFFFFFFF
    held = fleet.hosts.scalar(
        member, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s"
        " AND objid::bigint = %s AND objsubid = 1 AND granted", (key >> 32, key & 0xFFFFFFFF),
        dbname="vmapi")  # fmt: skip
    return held == 1


def put_bytes(sock: str, token: str, image: int, data: bytes) -> tuple[int, dict]:
    conn = UnixHTTPConnection(sock, 30)
    try:
        conn.request("PUT", f"/api/v1/image/{image}/file", body=data,
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/octet-stream"})  # fmt: skip
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def served_file(sock: str, token: str, image: int) -> bytes:
    conn = UnixHTTPConnection(sock, 30)
    try:
        conn.request("GET", f"/api/v1/image/{image}/file",
                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        response = conn.getresponse()
        assert response.status == 200, response.read()[:300]
        return response.read()
    finally:
        conn.close()


def test_the_shipped_proxy_never_retries_a_post() -> None:
    """nginx sends a POST on to the next host only when it never reached the first;
    ``non_idempotent`` would re-send a create whose first host may have made it."""
    from tests.failover.conftest import ROOT

    for conf in (ROOT / "deploy/nginx").glob("*.conf"):
        directives = [line.split("#")[0] for line in conf.read_text().splitlines()]
        assert not [d for d in directives if "non_idempotent" in d], conf
