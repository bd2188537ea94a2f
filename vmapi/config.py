"""Configuration: built-in defaults, then ``instance/vmapi.cfg``, then ``VMAPI_*`` variables.

Nothing is read at import time; :func:`load_config` runs inside ``create_app``.
Every key below can be set in ``instance/vmapi.cfg`` (Python syntax, ``KEY = value``)
or as an environment variable ``VMAPI_<KEY>``; the environment wins.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

from flask import Flask

from vmapi.bridges import template_problem
from vmapi.database import libpq_multihost_url
from vmapi.hypervisor.uri import UriPolicy, validate_libvirt_uri

GIB = 1024**3
MIB = 1024**2
TIB = 1024**4
#: seconds a move may take unless configured (under gunicorn's default 60 s timeout and
#: the default LIBVIRT_TIMEOUT of 10 s there is room for 40)
DEFAULT_MIGRATION_TIMEOUT = 30.0

#: noVNC (served by the shipped nginx site under /console/) with what it reads from the
#: fragment, which browsers never send to a server: connect at once through the proxy's
#: websocket with the token, with the display password.
CONSOLE_URL = (
    "{base}console/vnc.html#autoconnect=true&reconnect=false&resize=scale"
    "&path=console%2Fwebsockify%3Ftoken%3D{token}&password={password}"
)
CONSOLE_URL_FIELDS = {"base": "", "token": "", "password": ""}

#: key -> (default, one-line description). The README's configuration table mirrors this.
DEFAULTS: dict[str, tuple[Any, str]] = {
    "DATABASE_URL": (None, "SQLAlchemy URL; default: SQLite file instance/vmapi.sqlite3"),
    "SECRET_KEY": ("dev-only-change-me", "Flask secret key (set it in production)"),
    "LIBVIRT_URI_TEMPLATE": (
        "qemu+ssh://root@{fqdn}/system",
        "libvirt URI for nodes whose libvirt_uri is null; {fqdn} is replaced",
    ),
    "TEST_DRIVER_DIR": (
        None,
        "the folder whose node XML files test:// URIs may name (tests); unset: the test "
        "driver only as test:///default",
    ),
    "LIBVIRT_CREDENTIAL_DIRS": (
        ["/etc/vmapi/ssh", "/etc/pki/vmapi", "/etc/pki/libvirt"],
        "folders (JSON list) under which a libvirt URI's keyfile, known_hosts and pkipath may lie",
    ),
    "LIBVIRT_TIMEOUT": (10.0, "seconds any single libvirt call may take before 504"),
    "LIBVIRT_KEEPALIVE_INTERVAL": (5, "seconds between libvirt keepalive probes"),
    "LIBVIRT_KEEPALIVE_COUNT": (3, "unanswered keepalive probes before a connection is dead"),
    "CPU_ALLOCATION_RATIO": (4.0, "vCPUs per physical core when a node's ratio is null"),
    "RAM_ALLOCATION_RATIO": (1.0, "RAM overcommit when a node's ratio is null"),
    "RESERVED_RAM": (GIB, "bytes of host RAM kept for the host when a node's value is null"),
    "INTERFACE_MODE": ("bridge", "VM NIC wiring when a node's interface_mode is null"),
    "BRIDGE_TEMPLATE": (
        "br-{suffix}",
        "the bridge a NIC in bridge mode joins, when its node's bridge is null: {suffix} (the "
        "interface's device suffix: a bridge per NIC) and {vlan} (its VLAN tag) are replaced; "
        "br0 for one shared bridge",
    ),
    "DNS_SERVERS": ([], "DNS servers (JSON list of addresses) in every guest's cloud-init seed"),
    "MAX_BODY": (MIB, "largest request body in bytes (413 above)"),
    "PAGE_DEFAULT_LIMIT": (100, "list page size when ?limit is not given"),
    "PAGE_MAX_LIMIT": (1000, "largest ?limit accepted"),
    "MAX_BATCH": (100, "largest array accepted by POST/UPDATE/DELETE"),
    "ARRAY_NODE_THREADS": (
        16,
        "threads a POST /vm array uses at most to call its nodes' libvirt at once (one per "
        "node; 1: one node after another)",
    ),
    "INSTALLATION_ID": (
        None,
        "this installation's id ([a-z0-9-], 1-16 characters) in the names and metadata of the "
        "domains and volumes it makes; default: generated once per database by flask vmapi seed",
    ),
    "SCHEDULER_WEIGHER": ("spread", "spread (most free RAM first) or pack (least that fits)"),
    "LIBVIRT_COOLOFF": (60, "seconds the scheduler skips a node after its libvirt failed"),
    "CPU_PERIOD": (100000, "cputune period in microseconds; cputime_limit is the quota"),
    "VM_MAX_VCPUS": (8, "vCPUs a domain is defined with at most, so cores can grow live"),
    "VM_MAX_RAM_FACTOR": (1.0, "a domain's maximum memory as a multiple of its ram"),
    "SHUTDOWN_TIMEOUT": (20.0, "seconds to wait for an ACPI shutdown before answering"),
    "BUILD_TIMEOUT": (600, "seconds after which reconcile treats a building VM as stale"),
    "STORAGE_POOL_DIR": (
        "/var/lib/libvirt/images/vmapi",
        "where a missing pool is made: <dir>/<pool name>, unless the node's virt_node sets "
        "local_storage_path",
    ),
    "STORAGE_MAX_SIZE": (16 * 1024**4, "largest volume in bytes"),
    "DETACH_TIMEOUT": (10.0, "seconds to wait for a running guest to release a disk"),
    "CEPH_KEY_DIR": (
        None,
        "a directory of cephx keys, client.<user>.key each (the base64 key as `ceph auth "
        "get-key` prints it), for the users rbd storage types name; unset: no rbd types",
    ),
    "IMAGE_DIR": (
        None,
        "the image store: a directory of image files (default: instance/images); shared "
        "by every API host when there are several",
    ),
    "IMAGE_MAX_SIZE": (64 * GIB, "largest image file in bytes (413 above)"),
    "IMAGE_MAX_VIRTUAL_SIZE": (TIB, "largest virtual size of an image in bytes"),
    "MIGRATION_TIMEOUT": (
        None,
        "seconds a move of a VM (POST /vm/<id>/migrate, node drain, evacuate) may take before "
        "it is aborted and undone; must stay below WORKER_TIMEOUT minus twice LIBVIRT_TIMEOUT; "
        f"default: {DEFAULT_MIGRATION_TIMEOUT:g}, or that room less a second when it is smaller",
    ),
    "WORKER_TIMEOUT": (
        None,
        "gunicorn's worker timeout in seconds, passed on by deploy/gunicorn.conf.py (unset: "
        "not served by gunicorn, no bound)",
    ),
    "IMAGE_COPY_TIMEOUT": (
        1800.0,
        "seconds copying an image to a node (upload and checksum, through libvirt) may take",
    ),
    "IMAGE_SAVE_TIMEOUT": (
        1800.0,
        "seconds saving a disk as an image (POST /vm/<id>/image, /storage/<id>/image, a "
        "backup) may take: the copy on the node and its download into the image store",
    ),
    "HA_INTERVAL": (5.0, "seconds between the checks `flask vmapi ha watch` makes of every node"),
    "HA_MISSES": (3, "checks in a row a node must miss before `ha watch` fences it"),
    "HA_DEFAULT": (
        False,
        "whether a VM without its own `ha` is restarted elsewhere when its node is fenced",
    ),
    "HA_FENCE_TIMEOUT": (30.0, "seconds each fence agent call (off, status) may take"),
    "HA_FENCE_AGENT_DIRS": (
        "/usr/sbin",
        "where the fence agents (fence_ipmilan, fence_redfish, ...: Debian's fence-agents) "
        "are looked for, colon-separated; a node's fence_agent must be one found there",
    ),
    "HA_FENCE_PASSWORD_DIR": (
        None,
        "a directory holding each node's fence password in a file named after its fqdn, "
        "readable by the vmapi user only; unset: fencing runs without a password",
    ),
    "TRANSFERS_PER_CUSTOMER": (
        4,
        "image uploads and downloads a customer may have in flight at once (429 beyond; "
        "admins exempt; 0: no cap); deploy/nginx/vmapi-site.conf repeats it per token",
    ),
    "TRANSFER_MIN_RATE": (
        32768,
        "bytes/s an image transfer served by Python must average once past "
        "TRANSFER_MIN_RATE_GRACE (slower: cut, 400 image/invalid for an upload; 0: no minimum)",
    ),
    "TRANSFER_MIN_RATE_GRACE": (30.0, "seconds a transfer runs before its rate is checked"),
    "ACCEL_REDIRECT": (
        None,
        "behind nginx: the internal location that serves the image store (e.g. "
        "/_vmapi_image_store/); downloads are then answered with X-Accel-Redirect and sent "
        "by nginx (unset: streamed by Python)",
    ),
    "IDEMPOTENCY_TTL": (86400, "seconds an Idempotency-Key and its answer are kept"),
    "VM_LOCK_TIMEOUT": (30.0, "seconds a request waits for another operation on the same VM"),
    "IDEMPOTENCY_WAIT": (55.0, "seconds a retry waits for the first request with its key"),
    "DB_PING_AFTER": (
        10.0,
        "seconds a pooled database connection may sit idle before it is checked on reuse",
    ),
    "TOKEN_CACHE_SECONDS": (
        5.0,
        "seconds a worker trusts a verified token without reading it again (0: never); a "
        "revocation takes effect within this time",
    ),
    "METRICS_ALLOW": (
        [],
        "networks (CIDR, JSON list) that may read /metrics without the admin token",
    ),
    "CONSOLE_ADDRESS": (
        "127.0.0.1",
        "address VNC displays listen on, on nodes whose console_address is null",
    ),
    "CONSOLE_LOG_POOL": (
        "vmapi-logs",
        "the storage pool (a directory on each node) domains log their serial console into",
    ),
    "CONSOLE_LOG_DIR": (
        "/var/lib/libvirt/vmapi-logs",
        "where CONSOLE_LOG_POOL is made on a node that lacks it",
    ),
    "CONSOLE_LOG_MAX": (MIB, "largest ?bytes of GET /vm/<id>/console_log"),
    "CONSOLE_TTL": (300, "seconds a console token and its display password are valid"),
    "CONSOLE_URL": (
        CONSOLE_URL,
        "the console URL answered by POST /vm/<id>/console; {base} (the API's own URL), "
        "{token} and {password} are filled in",
    ),
    "PUBLIC_URL": (
        None,
        "the API's public base URL (https://vmapi.example.com/) that console URLs are built "
        "on; unset: the URL the request was sent to (its Host header)",
    ),
    "LOG_HYPERVISOR": (True, "one JSON line per hypervisor action on vmapi.hypervisor"),
    "LOG_LEVEL": ("INFO", "Python log level"),
    "LOG_REQUESTS": (True, "one JSON line per request on the vmapi.request logger"),
}

INTERFACE_MODES = ("bridge", "ethernet", "user")


def _seconds(app: Flask, key: str) -> float | None:
    value = app.config[key]
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError) as exc:
        raise RuntimeError(f"{key} must be a number of seconds, not {value!r}") from exc
    if not seconds > 0:
        raise RuntimeError(f"{key} must be a positive number of seconds")
    return seconds


def migration_timeout(app: Flask) -> float:
    """MIGRATION_TIMEOUT, kept below the worker timeout: a move past it is aborted, and
    the abort (bounded by LIBVIRT_TIMEOUT) and the undo (one more) must end before
    gunicorn kills the worker. A configured value that leaves no such room stops the
    start; the default shrinks to fit (and a second at least)."""
    configured = _seconds(app, "MIGRATION_TIMEOUT")
    worker = _seconds(app, "WORKER_TIMEOUT")
    if worker is None:
        return configured or DEFAULT_MIGRATION_TIMEOUT
    room = worker - 2 * float(app.config["LIBVIRT_TIMEOUT"])
    if configured is None:
        return max(min(DEFAULT_MIGRATION_TIMEOUT, room - 1), 1.0)
    if configured >= room:
        raise RuntimeError(
            f"MIGRATION_TIMEOUT {configured:g} s must be below the worker timeout "
            f"({worker:g} s) minus twice LIBVIRT_TIMEOUT: below {room:g} s. Lower it, or raise "
            "GUNICORN_TIMEOUT."
        )
    return configured


#: An installation id: it goes into libvirt names (domains, volumes) on shared hosts.
INSTALLATION_ID_PATTERN = re.compile(r"[a-z0-9-]{1,16}")


def _coerce(raw: str, default: Any) -> Any:
    """Turn an environment string into the type of the default value."""
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, list | dict):
        return json.loads(raw)
    return raw


def public_url(url: str | None) -> str | None:
    """PUBLIC_URL as ``{base}`` takes it: an http(s) URL with a host, ending in ``/``."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise RuntimeError(
            f"PUBLIC_URL must be an http(s) URL such as https://vmapi.example.com/, not {url!r}"
        )
    return url if url.endswith("/") else url + "/"


def database_url(url: str) -> str:
    """A bare ``postgresql://`` (or ``postgres://``) URL means psycopg2, the pinned driver.

    SQLAlchemy 2.1 maps it to psycopg 3, which vmapi does not ship; libpq's multi-host
    form becomes SQLAlchemy's own."""
    url = libpq_multihost_url(url)
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


#: the fqdn a node might have, to check LIBVIRT_URI_TEMPLATE with at start
SAMPLE_FQDN = "node.example.com"


def uri_template_problem(template: Any, policy: UriPolicy, fqdn: str = SAMPLE_FQDN) -> str | None:
    """Why ``template`` filled with ``fqdn`` is no libvirt URI vmapi may open (None: it is)."""
    try:
        uri = str(template).format(fqdn=fqdn)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        return f"only {{fqdn}} may be filled in: {exc!r}"
    try:
        validate_libvirt_uri(uri, policy)
    except ValueError as exc:
        return f"filled with {fqdn!r} it {exc}"
    return None


def load_config(app: Flask, overrides: dict[str, Any] | None = None) -> None:
    """Fill ``app.config`` from defaults, the instance file, the environment, then overrides."""
    for key, (default, _doc) in DEFAULTS.items():
        app.config[key] = default
    app.config.from_pyfile("vmapi.cfg", silent=True)
    for key, (default, _doc) in DEFAULTS.items():
        env = os.environ.get(f"VMAPI_{key}")
        if env is not None:
            try:
                app.config[key] = _coerce(env, default if default is not None else "")
            except ValueError as exc:
                raise RuntimeError(f"VMAPI_{key}: {exc}") from exc
    if overrides:
        app.config.update(overrides)

    if not app.config["IMAGE_DIR"]:
        app.config["IMAGE_DIR"] = os.path.join(app.instance_path, "images")
    if not app.config["DATABASE_URL"]:
        path = os.path.join(app.instance_path, "vmapi.sqlite3")
        app.config["DATABASE_URL"] = f"sqlite:///{path}"
    if not int(app.config["ARRAY_NODE_THREADS"]) >= 1:
        raise RuntimeError("ARRAY_NODE_THREADS must be 1 or more")
    if app.config["SCHEDULER_WEIGHER"] not in ("spread", "pack"):
        raise RuntimeError("SCHEDULER_WEIGHER must be spread or pack")
    for network in app.config["METRICS_ALLOW"]:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise RuntimeError(f"METRICS_ALLOW: {exc}") from exc
    try:
        ipaddress.ip_address(app.config["CONSOLE_ADDRESS"])
    except ValueError as exc:
        raise RuntimeError(f"CONSOLE_ADDRESS: {exc}") from exc
    if not int(app.config["CONSOLE_LOG_MAX"]) > 0:
        raise RuntimeError("CONSOLE_LOG_MAX must be a positive number of bytes")
    if not int(app.config["CONSOLE_TTL"]) > 0:
        raise RuntimeError("CONSOLE_TTL must be a positive number of seconds")
    try:
        app.config["CONSOLE_URL"].format(**CONSOLE_URL_FIELDS)
    except (KeyError, IndexError, ValueError) as exc:
        raise RuntimeError(
            f"CONSOLE_URL may use only {{base}}, {{token}} and {{password}}: {exc!r}"
        ) from exc
    app.config["PUBLIC_URL"] = public_url(app.config["PUBLIC_URL"])
    if app.config["INTERFACE_MODE"] not in INTERFACE_MODES:
        raise RuntimeError(f"INTERFACE_MODE must be one of {', '.join(INTERFACE_MODES)}")
    problem = template_problem(app.config["BRIDGE_TEMPLATE"])
    if problem:
        raise RuntimeError(f"BRIDGE_TEMPLATE {app.config['BRIDGE_TEMPLATE']!r}: {problem}")
    dns = app.config["DNS_SERVERS"]
    if not isinstance(dns, list):
        raise RuntimeError("DNS_SERVERS must be a JSON list of IP addresses")
    for server in dns:
        try:
            ipaddress.ip_address(server)
        except ValueError as exc:
            raise RuntimeError(f"DNS_SERVERS: {server!r} is not an IP address") from exc
    credential_dirs = app.config["LIBVIRT_CREDENTIAL_DIRS"]
    if not isinstance(credential_dirs, list | tuple) or not all(
        isinstance(d, str) and os.path.isabs(d) for d in credential_dirs
    ):
        raise RuntimeError("LIBVIRT_CREDENTIAL_DIRS must be a JSON list of absolute paths")
    test_dir = app.config["TEST_DRIVER_DIR"]
    if test_dir and not os.path.isabs(str(test_dir)):
        raise RuntimeError("TEST_DRIVER_DIR must be an absolute path")
    problem = uri_template_problem(
        app.config["LIBVIRT_URI_TEMPLATE"], UriPolicy.from_config(app.config)
    )
    if problem:
        raise RuntimeError(
            f"LIBVIRT_URI_TEMPLATE {app.config['LIBVIRT_URI_TEMPLATE']!r}: {problem}"
        )
    accel = app.config["ACCEL_REDIRECT"]
    if accel and not (accel.startswith("/") and accel.endswith("/")):
        raise RuntimeError(f"ACCEL_REDIRECT {accel!r}: a location that begins and ends with /")
    installation = app.config["INSTALLATION_ID"]
    if installation is not None and not (
        isinstance(installation, str) and INSTALLATION_ID_PATTERN.fullmatch(installation)
    ):
        raise RuntimeError(
            f"INSTALLATION_ID {installation!r}: use 1 to 16 of a-z, 0-9 and '-' (it becomes "
            "part of every domain and volume name this installation makes)"
        )

    app.config["MIGRATION_TIMEOUT"] = migration_timeout(app)
    app.config["WORKER_TIMEOUT"] = _seconds(app, "WORKER_TIMEOUT")
    app.config["DATABASE_URL"] = database_url(app.config["DATABASE_URL"])
    app.config["SQLALCHEMY_DATABASE_URI"] = app.config["DATABASE_URL"]
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY"]
    app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {})
    # Statements' parameters stay out of exception messages and so out of every log line:
    # they carry what must never be logged (guests' SSH keys and user data).
    app.config["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("hide_parameters", True)
