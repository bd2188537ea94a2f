"""Configuration: defaults, then instance/vmapi.cfg, then VMAPI_* variables."""

from pathlib import Path

import pytest
from flask import Flask

from vmapi.config import DEFAULTS, database_url, load_config, public_url

ROOT = Path(__file__).resolve().parents[2]


def make_app(tmp_path):
    return Flask("t", instance_path=str(tmp_path), instance_relative_config=True)


def test_defaults_and_sqlite_in_instance(tmp_path, monkeypatch):
    for key in DEFAULTS:
        monkeypatch.delenv(f"VMAPI_{key}", raising=False)
    app = make_app(tmp_path)
    load_config(app)
    assert app.config["CPU_ALLOCATION_RATIO"] == 4.0
    assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path}/vmapi.sqlite3"
    assert app.config["MAX_CONTENT_LENGTH"] == 1024 * 1024


def test_instance_file_then_environment(tmp_path, monkeypatch):
    (tmp_path / "vmapi.cfg").write_text(
        "CPU_ALLOCATION_RATIO = 2.0\nRESERVED_RAM = 5\nMAX_BODY = 10\n"
    )
    monkeypatch.setenv("VMAPI_RESERVED_RAM", "7")
    monkeypatch.setenv("VMAPI_INTERFACE_MODE", "ethernet")
    app = make_app(tmp_path)
    load_config(app)
    assert app.config["CPU_ALLOCATION_RATIO"] == 2.0  # from the file
    assert app.config["RESERVED_RAM"] == 7  # the environment wins, typed
    assert app.config["INTERFACE_MODE"] == "ethernet"
    assert app.config["MAX_CONTENT_LENGTH"] == 10


def test_bad_environment_values_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("VMAPI_CPU_ALLOCATION_RATIO", "lots")
    with pytest.raises(RuntimeError, match="VMAPI_CPU_ALLOCATION_RATIO"):
        load_config(make_app(tmp_path))


def test_bad_interface_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("VMAPI_INTERFACE_MODE", "macvtap")
    with pytest.raises(RuntimeError, match="INTERFACE_MODE"):
        load_config(make_app(tmp_path))


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_database_url_uses_psycopg2(given, used):
    assert database_url(given) == used


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in DEFAULTS if f"`VMAPI_{key}`" not in readme]
    assert missing == []


@pytest.mark.parametrize("value", ["Prod", "prod_1", "", "a" * 17, "prod.example", "prød"])
def test_a_bad_installation_id_stops_the_start(tmp_path, monkeypatch, value):
    monkeypatch.setenv("VMAPI_INSTALLATION_ID", value)
    with pytest.raises(RuntimeError, match="INSTALLATION_ID"):
        load_config(make_app(tmp_path))


@pytest.mark.parametrize("value", ["vmapi", "prod-2", "a" * 16, "0"])
def test_good_installation_ids(tmp_path, monkeypatch, value):
    monkeypatch.setenv("VMAPI_INSTALLATION_ID", value)
    app = make_app(tmp_path)
    load_config(app)
    assert app.config["INSTALLATION_ID"] == value


def test_no_installation_id_means_the_databases(tmp_path, monkeypatch):
    monkeypatch.delenv("VMAPI_INSTALLATION_ID", raising=False)
    app = make_app(tmp_path)
    load_config(app)
    assert app.config["INSTALLATION_ID"] is None


@pytest.mark.parametrize(
    ("given", "kept"),
    [(None, None), ("", None), ("https://vmapi.example.com", "https://vmapi.example.com/"),
     ("http://10.0.0.5:8000/api-site/", "http://10.0.0.5:8000/api-site/")],
)  # fmt: skip
def test_public_url_is_kept_as_a_base(given, kept):
    assert public_url(given) == kept


@pytest.mark.parametrize("bad", ["vmapi.example.com", "ftp://x/", "https:///x", "https://x/?a=1"])
def test_a_public_url_that_is_no_base_stops_the_start(bad):
    with pytest.raises(RuntimeError, match="PUBLIC_URL"):
        public_url(bad)


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("qemu+ssh://root@{host}/system", "KeyError"),  # fails to format
        ("qemu+ssh://root@{}/system", "IndexError"),
        ("qemu+ssh://root@{fqdn/system", "ValueError"),
        ("qemu+ext:///system?command=/bin/{fqdn}", "node.example.com"),  # fails the rules
        ("qemu+ssh://root@{fqdn}/system?socket=/x';id;'", "'socket'"),
        ("test:///etc/{fqdn}", "TEST_DRIVER_DIR"),
    ],
)
def test_a_bad_libvirt_uri_template_stops_the_start(tmp_path, monkeypatch, template, named):
    monkeypatch.setenv("VMAPI_LIBVIRT_URI_TEMPLATE", template)
    with pytest.raises(RuntimeError, match="LIBVIRT_URI_TEMPLATE") as raised:
        load_config(make_app(tmp_path))
    assert named in str(raised.value)


@pytest.mark.parametrize(
    "template", ["qemu+ssh://root@{fqdn}/system", "qemu+tls://{fqdn}/system", "test:///default"]
)
def test_a_good_libvirt_uri_template_is_taken(tmp_path, monkeypatch, template):
    monkeypatch.setenv("VMAPI_LIBVIRT_URI_TEMPLATE", template)
    app = make_app(tmp_path)
    load_config(app)
    assert app.config["LIBVIRT_URI_TEMPLATE"] == template
