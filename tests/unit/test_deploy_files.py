"""The shipped deployment files agree with the application's own settings."""

import re
from pathlib import Path

from vmapi.config import DEFAULTS

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


def _image_location(site: str) -> str:
    start = site.index("location ~ ^/api/[^/]+/image/[0-9]+/file$ {")
    return site[start : site.index("}", start)]


def test_nginx_image_location_streams_up_to_the_image_limit():
    site = (DEPLOY / "nginx" / "vmapi-site.conf").read_text()
    location = _image_location(site)
    number, unit = re.search(r"client_max_body_size\s+(\d+)([kmg]?);", location).groups()
    assert int(number) * UNITS.get(unit, 1) == DEFAULTS["IMAGE_MAX_SIZE"][0]
    assert "proxy_request_buffering off;" in location
    assert "error_page 413 = @image_too_large;" in location
    # its own 413 page states the image limit, in vmapi's envelope
    page = site[site.index("location @image_too_large") :]
    assert f"limit of {DEFAULTS['IMAGE_MAX_SIZE'][0]} bytes" in page.split("}", 1)[0]


def test_gunicorn_workers_get_the_transfer_heartbeat(monkeypatch, tmp_path):
    import runpy

    # so that reading the settings makes no metrics directory of its own
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

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
