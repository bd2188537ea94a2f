"""Hosts for the failover tier: network namespaces on one bridge, all made by the test.

A "switch" namespace holds a bridge with no address; each host is a namespace of its own
with one end of a veth pair (its ``eth0``, an address in ``NET``) whose other end is a
port of the bridge. Nothing is added to the root namespace: no interface, no route, no
firewall rule; the test itself reaches the hosts only through Unix sockets in its folder
(PostgreSQL's, gunicorn's and nginx's), which cross namespaces. Cutting a host's port on
the switch is a network partition of that host.

Processes run in their namespace by ``ip netns exec``, which execs the command: the pid
of the ``Popen`` is the program's own (patroni, etcd, gunicorn's master, nginx).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

NET = "198.18.0"  # RFC 2544's benchmark range, only ever inside the test's namespaces
ADDRESSES = {"etcd": 2, "n1": 11, "n2": 12, "api1": 21, "api2": 22, "lb": 30, "dbproxy": 40,
             "dbproxy2": 41}  # fmt: skip
#: the HAProxy processes (deploy/haproxy/vmapi-db.cfg), each on a host of its own, both
#: in the API hosts' multi-host database URL (README: two HAProxy hosts)
PROXIES = {"haproxy": "dbproxy", "haproxy2": "dbproxy2"}
PATRONI_BIN = "/usr/bin/patroni"
ETCD_BIN = "/usr/bin/etcd"
HAPROXY_BIN = "/usr/sbin/haproxy"
PG_BIN = "/usr/lib/postgresql/15/bin"
SUPERUSER_PASSWORD = "failover-secret"
#: ttl 10 / loop_wait 2 / retry_timeout 4: the tightest settings that keep Patroni's rule
#: ttl >= loop_wait + 2 * retry_timeout (../shared/recipes/patroni.md: failover ~ ttl)
TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 2, 4


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def running(pid: int) -> bool:
    """A live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def missing_tools() -> list[str]:
    needed = ["ip", "setpriv", PATRONI_BIN, ETCD_BIN, f"{PG_BIN}/postgres", "nginx", HAPROXY_BIN]
    return [tool for tool in needed if not (shutil.which(tool) or Path(tool).exists())]


class Hosts:
    """The namespaces and the processes started in them; ``close`` removes everything."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        # short (Unix socket paths), and enterable by postgres (pytest's folders are not)
        self.base = Path(tempfile.mkdtemp(prefix="vmfo-", dir="/tmp"))
        self.base.chmod(0o755)
        self.namespaces: list[str] = []
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.folders: list[Path] = [self.base]  # removed by close

    # -- network -----------------------------------------------------------------
    def ns(self, host: str) -> str:
        return f"vmfo-{self.tag}-{host}"

    @staticmethod
    def ip(host: str) -> str:
        return f"{NET}.{ADDRESSES[host]}"

    def network(self) -> None:
        switch = self.ns("sw")
        sh("ip", "netns", "add", switch)
        self.namespaces.append(switch)
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        for host in ADDRESSES:
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            # made inside the switch, its peer moved at once into the host: the root
            # namespace never holds either end
            sh("ip", "-n", switch, "link", "add", f"p-{host}", "type", "veth",
               "peer", "name", "eth0", "netns", ns)  # fmt: skip
            sh("ip", "-n", switch, "link", "set", f"p-{host}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        """A partition: the host's port on the switch goes down."""
        sh("ip", "-n", self.ns("sw"), "link", "set", f"p-{host}", "down")

    def heal(self, host: str) -> None:
        sh("ip", "-n", self.ns("sw"), "link", "set", f"p-{host}", "up")

    def is_cut(self, host: str) -> bool:
        out = sh("ip", "-n", self.ns("sw"), "-o", "link", "show", f"p-{host}").stdout
        return "state DOWN" in out or ",UP" not in out

    # -- processes ---------------------------------------------------------------
    def start(self, name: str, host: str, command: list[str], env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:  # fmt: skip
        log = self.base / "log" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        self.logs[name] = log
        with open(log, "ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *command], stdout=out,
                stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
            )  # fmt: skip
        self.processes[name] = process
        return process

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            process.send_signal(sig)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        process = self.processes.get(name)
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def log_tail(self, name: str, size: int = 3000) -> str:
        log = self.logs.get(name)
        return log.read_text(errors="replace")[-size:] if log and log.exists() else ""

    # -- etcd and Patroni ----------------------------------------------------------
    def start_etcd(self) -> None:
        url = f"http://{self.ip('etcd')}"
        self.start("etcd", "etcd", [
            ETCD_BIN, "--name", "e1", "--data-dir", str(self.base / "etcd"),
            "--listen-client-urls", f"{url}:2379", "--advertise-client-urls", f"{url}:2379",
            "--listen-peer-urls", f"{url}:2380", "--initial-advertise-peer-urls", f"{url}:2380",
            "--initial-cluster", f"e1={url}:2380", "--initial-cluster-state", "new",
        ])  # fmt: skip

    def patroni_config(self, member: str) -> Path:
        """deploy/patroni/patroni.yml's settings, with the test's addresses and folders
        and the tight timings."""
        folder = self.base / member
        folder.mkdir(exist_ok=True)
        shutil.chown(folder, "postgres", "postgres")
        folder.chmod(0o700)
        text = (Path(__file__).resolve().parents[2] / "deploy/patroni/patroni.yml").read_text()
        other = "n2" if member == "n1" else "n1"
        replace = {
            "name: db1": f"name: {member}",
            "192.0.2.11": self.ip(member),
            "192.0.2.12": self.ip(other),
            "192.0.2.2:2379": f"{self.ip('etcd')}:2379",
            "192.0.2.0/24": f"{NET}.0/24",
            "local all postgres peer": "local all all trust",  # the test is root
            "/var/lib/postgresql/15/patroni": str(folder / "data"),
            "/var/lib/postgresql/.pgpass_patroni": str(folder / "pgpass"),
            "/var/run/postgresql": str(folder),
            "ttl: 30": f"ttl: {TTL}",
            "loop_wait: 10": f"loop_wait: {LOOP_WAIT}",
            "retry_timeout: 10": f"retry_timeout: {RETRY_TIMEOUT}",
            "<superuser password>": SUPERUSER_PASSWORD,
            "<replication password>": "failover-repl",
            "<rewind password>": "failover-rewind",
        }
        for old, new in replace.items():
            assert old in text, old
            text = text.replace(old, new)
        path = self.base / f"{member}.yml"
        path.write_text(text)
        return path

    def start_patroni(self, member: str) -> None:
        config = self.base / f"{member}.yml"
        if not config.exists():
            config = self.patroni_config(member)
        self.start(f"patroni-{member}", member, [
            "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", PATRONI_BIN,
            str(config),
        ])  # fmt: skip

    def postmaster_pid(self, member: str) -> int | None:
        try:
            return int((self.base / member / "data/postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def signal_postmaster(self, member: str, sig: int) -> int | None:
        """Signal the member's postmaster, if its pid file names a live postgres."""
        pid = self.postmaster_pid(member)
        try:
            if pid is None or Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
                return None
            os.kill(pid, sig)
        except (OSError, ProcessLookupError):
            return None
        return pid

    def kill_member(self, member: str) -> None:
        """The member's node dies: its Patroni and its postmaster, SIGKILL."""
        self.kill(f"patroni-{member}")
        self.signal_postmaster(member, signal.SIGKILL)
        self.processes[f"patroni-{member}"].wait(timeout=10)

    def pg(self, member: str, dbname: str = "postgres", timeout: int = 1):
        """A connection to ``member``'s PostgreSQL over its Unix socket (any namespace)."""
        return psycopg2.connect(host=str(self.base / member), port=5432, user="postgres",
                                dbname=dbname, connect_timeout=timeout)  # fmt: skip

    def scalar(self, member: str, sql: str, params: tuple = (), dbname: str = "postgres"):
        """The one value ``sql`` reads on ``member``'s PostgreSQL; None while it does not
        answer."""
        try:
            conn = self.pg(member, dbname)
        except psycopg2.Error:
            return None
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone()[0]
        except psycopg2.Error:
            return None
        finally:
            conn.close()

    def writable(self, member: str) -> bool | None:
        """True: a primary; False: a standby; None: not answering."""
        return self.scalar(member, "SELECT NOT pg_is_in_recovery()")

    def sync_standby(self, leader: str) -> bool:
        streaming = self.scalar(leader, "SELECT count(*) FROM pg_stat_replication "
                                "WHERE state = 'streaming' AND sync_state = 'sync'")  # fmt: skip
        return bool(streaming)

    def leader(self) -> str | None:
        writable = [m for m in ("n1", "n2") if self.writable(m)]
        return writable[0] if len(writable) == 1 else None

    def patroni_roles(self, member: str) -> dict[str, str]:
        """Patroni's view (its REST API's /cluster, asked from inside ``member``'s
        namespace): member name -> role, for the members that are running."""
        answer = sh("ip", "netns", "exec", self.ns(member), "curl", "-s", "--max-time", "1",
                    f"http://{self.ip(member)}:8008/cluster", check=False).stdout  # fmt: skip
        try:
            members = json.loads(answer)["members"]
        except (ValueError, KeyError):
            return {}
        return {m["name"]: m["role"] for m in members
                if m.get("state") in ("running", "streaming")}  # fmt: skip

    def wait_healthy(self, timeout: float = 60) -> str:
        """Both members running, one primary with the other as its synchronous standby, in
        PostgreSQL (pg_stat_replication) and in Patroni's state in etcd (only the member
        etcd names the synchronous standby may be promoted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader and self.sync_standby(leader):
                standby = "n2" if leader == "n1" else "n1"
                if self.patroni_roles(leader) == {leader: "leader", standby: "sync_standby"}:
                    return leader
            time.sleep(0.2)
        raise AssertionError(
            "no leader with a synchronous standby:\n"
            + "\n".join(self.log_tail(f"patroni-{m}", 1500) for m in ("n1", "n2"))
        )

    # -- HAProxy -------------------------------------------------------------------
    def start_haproxy(self, name: str = "haproxy") -> None:
        """deploy/haproxy/vmapi-db.cfg with the members' addresses (server names n1, n2)
        and a stats socket in the test's folder, on its host (:data:`PROXIES`)."""
        text = (Path(__file__).resolve().parents[2] / "deploy/haproxy/vmapi-db.cfg").read_text()
        stats = f"    stats socket {self.base}/{name}.sock mode 600 level admin\n"
        replace = {
            "server db1 192.0.2.11:": f"server n1 {self.ip('n1')}:",
            "server db2 192.0.2.12:": f"server n2 {self.ip('n2')}:",
            "\nglobal\n": f"\nglobal\n{stats}",
        }
        for old, new in replace.items():
            assert old in text, old
            text = text.replace(old, new)
        path = self.base / f"{name}.cfg"
        path.write_text(text)
        self.start(name, PROXIES[name], [HAPROXY_BIN, "-db", "-f", str(path)])

    def haproxy_states(self, name: str = "haproxy") -> dict[str, str]:
        """HAProxy's state of each member ("UP", "DOWN", "UP 1/2" going down...), from
        ``show stat`` on its stats socket; {} while it does not answer."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.base / f"{name}.sock"))
                sock.sendall(b"show stat\n")
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
        except OSError:
            return {}
        rows = csv.DictReader(raw.decode().removeprefix("# ").splitlines())
        return {row["svname"]: row["status"] for row in rows
                if row.get("svname") in ("n1", "n2")}  # fmt: skip

    def wait_routed(self, leader: str, timeout: float = 15) -> None:
        """Every HAProxy sends connections to ``leader`` and to no other member."""
        standby = "n2" if leader == "n1" else "n1"
        deadline = time.monotonic() + timeout
        for name in PROXIES:
            while (states := self.haproxy_states(name)) != {leader: "UP", standby: "DOWN"}:
                assert self.alive(name), self.log_tail(name)
                assert time.monotonic() < deadline, f"{name}'s states: {states}"
                time.sleep(0.1)

    def sessions_from(self, member: str, host: str) -> int | None:
        """Client connections to ``member``'s PostgreSQL from ``host``'s address."""
        return self.scalar(member, "SELECT count(*) FROM pg_stat_activity WHERE client_addr = %s",
                           (self.ip(host),))  # fmt: skip

    # -- teardown ----------------------------------------------------------------
    def close(self) -> None:
        """Everything goes, whatever state the test left: processes, namespaces, folder."""
        for name, process in self.processes.items():  # Patroni first: no restarts
            if name.startswith("patroni-") and process.poll() is None:
                process.kill()
        postmasters = [self.signal_postmaster(m, signal.SIGQUIT) for m in ("n1", "n2")]
        for name in list(self.processes):
            self.stop(name, signal.SIGTERM if not name.startswith("patroni-") else signal.SIGKILL)
        deadline = time.monotonic() + 15  # immediate shutdown: the postmasters go at once
        for pid in postmasters:
            while pid is not None and running(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        for ns in reversed(self.namespaces):
            # anything still running in a namespace would keep its processes; there is none
            sh("ip", "netns", "del", ns, check=False)
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
