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
