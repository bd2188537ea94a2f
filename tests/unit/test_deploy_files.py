"""The shipped deployment files agree with the application's own settings."""

import importlib
import os
import re
from pathlib import Path
from urllib.parse import unquote

from websockify.token_plugins import BasePlugin

from tests.libvirt_conf import shipped
from vmapi.config import DEFAULTS
from vmapi.services.images.transfers import RETRY_AFTER

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def test_nginx_body_limit_is_the_api_limit():
    site = (DEPLOY / "nginx" / "vmapi-site.conf").read_text()
    number, unit = re.search(r"client_max_body_size\s+(\d+)([kmg]?);", site).groups()
    assert int(number) * UNITS.get(unit, 1) == DEFAULTS["MAX_BODY"][0]
    # nginx's own 413 page states the same limit
    assert f"limit of {DEFAULTS['MAX_BODY'][0]} bytes" in site


def test_nginx_read_timeout_outlasts_gunicorns():
    proxy = (DEPLOY / "nginx" / "vmapi-proxy.conf").read_text()
    read = int(re.search(r"proxy_read_timeout\s+(\d+)s;", proxy).group(1))
    config = (DEPLOY / "gunicorn.conf.py").read_text()
    worker = int(re.search(r'"GUNICORN_TIMEOUT", (\d+)', config).group(1))
    assert read > worker > DEFAULTS["LIBVIRT_TIMEOUT"][0]


def site_location(site: str, head: str) -> str:
    """The nginx block that starts with ``head`` (``location ... {``), to its own closing
    brace (nested blocks, quoted strings and comments skipped)."""
    start = site.index(head)
    depth, at = 0, start
    while at < len(site):
        char = site[at]
        if char == "#":
            at = site.index("\n", at)
        elif char in "'\"":
            at = site.index(char, at + 1)
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return site[start : at + 1]
        at += 1
    raise AssertionError(f"unclosed block: {head}")


def unit_exec(name: str) -> list[str]:
    text = (DEPLOY / "systemd" / name).read_text()
    return re.findall(r"^ExecStart=(.*)$", text, re.MULTILINE)


def test_console_url_meets_the_sites_console_locations():
    site = (DEPLOY / "nginx" / "vmapi-site.conf").read_text()
    url = DEFAULTS["CONSOLE_URL"][0].format(base="https://vmapi.example.com/", token="T",
                                            password="P")  # fmt: skip
    page, _, fragment = url.partition("#")
    assert page == "https://vmapi.example.com/console/vnc.html"
    assert "alias /usr/share/novnc/;" in site_location(site, "location /console/ {")
    # noVNC opens its websocket at /<path>: the site's exact websocket location
    path = unquote(dict(p.split("=", 1) for p in fragment.split("&"))["path"])
    assert path == "console/websockify?token=T"
    assert "location = /console/websockify {" in site


def test_console_websocket_is_proxied_with_the_upgrade_and_logged_without_the_token():
    site = (DEPLOY / "nginx" / "vmapi-site.conf").read_text()
    ws = site_location(site, "location = /console/websockify {")
    assert "proxy_pass http://vmapi_console;" in ws
    assert "proxy_http_version 1.1;" in ws
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert 'proxy_set_header Connection "upgrade";' in ws
    log_format = re.search(r"log_format vmapi_console (.*?);", site, re.DOTALL).group(1)
    assert "$uri" in log_format
    assert not re.search(r"\$(request|request_uri|args|query_string|arg_\w+)\b", log_format)
    assert re.search(r"access_log \S+ vmapi_console;", ws)


def test_console_proxy_unit_runs_websockify_with_vmapis_plugin_where_nginx_sends():
    (command,) = unit_exec("vmapi-console-proxy.service")
    args = command.split()
    assert args[:3] == ["/opt/vmapi/.venv/bin/python", "-m", "websockify"]
    plugin = args[args.index("--token-plugin") + 1]
    module, _, name = plugin.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), name), BasePlugin)
    site = (DEPLOY / "nginx" / "vmapi-site.conf").read_text()
    upstream = re.search(r"upstream vmapi_console \{\s*server (\S+);", site).group(1)
    assert args[-1] == upstream


def test_expired_console_tokens_are_purged_by_the_shipped_timer():
    commands = unit_exec("vmapi-event-purge.service")
    assert "/opt/vmapi/.venv/bin/flask --app wsgi vmapi console purge" in commands


def test_nginx_image_location_streams_up_to_the_image_limit():
    site = (DEPLOY / "nginx" / "vmapi-site.conf").read_text()
    location = site_location(site, "location ~ ^/api/[^/]+/image/[0-9]+/file$ {")
    number, unit = re.search(r"client_max_body_size\s+(\d+)([kmg]?);", location).groups()
    assert int(number) * UNITS.get(unit, 1) == DEFAULTS["IMAGE_MAX_SIZE"][0]
    assert "proxy_request_buffering off;" in location
    assert "error_page 413 = @image_too_large;" in location
    # its own 413 page states the image limit, in vmapi's envelope
    page = site[site.index("location @image_too_large") :]
    assert f"limit of {DEFAULTS['IMAGE_MAX_SIZE'][0]} bytes" in page.split("}", 1)[0]


def test_nginx_carries_transfers_within_vmapis_limits():
    site = (DEPLOY / "nginx" / "vmapi-site.conf").read_text()
    files = site_location(site, "location ~ ^/api/[^/]+/image/[0-9]+/file$ {")
    cap = DEFAULTS["TRANSFERS_PER_CUSTOMER"][0]
    assert f"limit_conn vmapi_transfers {cap};" in files
    assert "limit_conn_status 429;" in files
    page = site[site.index("location @too_many_transfers") :].split("}", 1)[0]
    assert f"add_header Retry-After {RETRY_AFTER} always;" in page
    assert f"has {cap} image transfers in flight" in page and '"general/too_many_requests"' in page
    # the spool keeps an upload whole before vmapi sees it, one per image
    spool = site[site.index("listen unix:/run/nginx-vmapi-spool.sock;") :]
    assert "server unix:/run/nginx-vmapi-spool.sock;" in site
    uploads = site_location(spool, "location ~ ^/api/[^/]+/image/[0-9]+/file$ {")
    assert "proxy_request_buffering on;" in uploads
    assert "limit_conn vmapi_uploads 1;" in uploads and "limit_conn_status 409;" in uploads
    # vmapi allows an upload before it reaches the spool (whose limit_conn, in the
    # preaccess phase, would otherwise run before any auth_request there)
    assert "auth_request /_vmapi_upload_check;" in files
    assert "auth_request" not in uploads
    check = site_location(site, "location = /_vmapi_upload_check {")
    assert "internal;" in check and "proxy_pass_request_body off;" in check
    # per token, keyed on the token as vmapi reads it, not on the header's spelling
    assert "limit_conn_zone $vmapi_token zone=vmapi_transfers" in site
    number, unit = re.search(r"client_max_body_size\s+(\d+)([kmg]?);", spool).groups()
    assert int(number) * UNITS.get(unit, 1) == DEFAULTS["IMAGE_MAX_SIZE"][0]
    # downloads: from the store, at the internal location vmapi is told about
    store = site_location(site, "location /_vmapi_image_store/ {")
    assert "internal;" in store and "alias /var/lib/vmapi/images/;" in store


def test_gunicorn_workers_get_the_transfer_heartbeat(monkeypatch, tmp_path):
    import runpy

    # so that reading the settings makes no metrics directory of its own
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("VMAPI_WORKER_TIMEOUT", raising=False)  # restored afterwards

    from vmapi import heartbeat

    class Worker:
        beats = 0

        def notify(self):
            self.beats += 1

    worker = Worker()
    settings = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    try:
        settings["post_fork"](None, worker)
        heartbeat.beat()
        heartbeat.beat()  # within the interval: one notify is enough
        assert worker.beats == 1
    finally:
        heartbeat.install(None)


def test_workers_learn_the_timeout_a_move_must_fit_in(monkeypatch, tmp_path):
    """The settings file tells the workers gunicorn's timeout (a --timeout flag too), and
    vmapi's defaults leave a move its time, the abort and the undo within it."""
    import runpy
    from types import SimpleNamespace

    from flask import Flask

    from vmapi.config import DEFAULT_MIGRATION_TIMEOUT, load_config

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("GUNICORN_TIMEOUT", raising=False)
    monkeypatch.delenv("VMAPI_WORKER_TIMEOUT", raising=False)
    for key in ("MIGRATION_TIMEOUT", "LIBVIRT_TIMEOUT"):
        monkeypatch.delenv(f"VMAPI_{key}", raising=False)
    settings = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    assert os.environ["VMAPI_WORKER_TIMEOUT"] == str(settings["timeout"]) == "60"
    app = Flask("t", instance_path=str(tmp_path))
    load_config(app)
    worker, migration = app.config["WORKER_TIMEOUT"], app.config["MIGRATION_TIMEOUT"]
    assert migration == DEFAULT_MIGRATION_TIMEOUT
    assert migration + 2 * DEFAULTS["LIBVIRT_TIMEOUT"][0] < worker == 60.0
    settings["on_starting"](SimpleNamespace(cfg=SimpleNamespace(timeout=300)))
    assert os.environ["VMAPI_WORKER_TIMEOUT"] == "300"


def test_the_backup_timer_runs_every_opted_in_vm_nightly():
    assert unit_exec("vmapi-backup.service") == [
        "/opt/vmapi/.venv/bin/flask --app wsgi vmapi backup run --all"
    ]
    timer = (DEPLOY / "systemd" / "vmapi-backup.timer").read_text()
    assert re.search(r"^OnCalendar=\*-\*-\* \d\d:\d\d:\d\d$", timer, re.MULTILINE)  # daily
    assert re.search(r"^RandomizedDelaySec=\S+$", timer, re.MULTILINE)
    assert re.search(r"^Persistent=true$", timer, re.MULTILINE)  # a night missed runs at boot
    service = (DEPLOY / "systemd" / "vmapi-backup.service").read_text()
    # a run may take long, but ends before the next night's
    hours = int(re.search(r"^TimeoutStartSec=(\d+)h$", service, re.MULTILINE).group(1))
    assert 1 <= hours < 24


def test_the_nodes_disk_leases_are_in_one_folder_on_shared_storage():
    assert shipped("qemu-lock-manager.conf") == {"lock_manager": "lockd"}
    lockd = shipped("qemu-lockd.conf")
    assert lockd["auto_disk_leases"] == 1 and lockd["require_lease_for_disks"] == 1
    folder = lockd["file_lockspace_dir"]
    # not libvirt's own folder of each node, which guards nothing between nodes
    assert folder.startswith("/") and not folder.startswith("/var/lib/libvirt/")
    # virtlockd waits for its filesystem; README's steps make and check that folder
    dropin = (DEPLOY / "libvirt" / "virtlockd-lockspace.conf").read_text()
    assert re.findall(r"^RequiresMountsFor=(.*)$", dropin, re.MULTILINE) == [folder]
    readme = (DEPLOY.parent / "README.md").read_text()
    assert f"install -d -m 0700 {folder}" in readme and f"findmnt -T {folder}" in readme
