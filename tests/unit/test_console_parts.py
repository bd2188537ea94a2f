"""Console pieces without a database or libvirt: the display XML, the sealed display's
password, the console settings, and the proxy's log redaction."""

import logging
import string
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta, timezone

import pytest
from flask import Flask

from vmapi.config import DEFAULTS, load_config
from vmapi.console_proxy import RedactTokens, _concrete
from vmapi.hypervisor import DisplaySpec, DomainSpec
from vmapi.hypervisor.libvirt.config import Graphics, password_valid_to
from vmapi.hypervisor.libvirt.designer import design
from vmapi.models import Node
from vmapi.services.vms.specs import SEALED, display_password, sealed_display

GIB = 1024**3


def spec(**overrides):
    values = dict(name="vm-5", uuid="4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968", domain_type="kvm",
                  vcpus=2, max_vcpus=8, memory=GIB, max_memory=GIB, vm_id=5,
                  installation="fra1")  # fmt: skip
    values.update(overrides)
    return DomainSpec(**values)


def same_xml(a: str, b: str) -> bool:
    return ET.canonicalize(a, strip_text=True) == ET.canonicalize(b, strip_text=True)


def test_a_display_is_a_vnc_graphics_device_on_an_auto_port():
    display = DisplaySpec("192.0.2.7", "Ab3dE6gH", datetime(2000, 1, 1, tzinfo=UTC))
    root = ET.fromstring(design(spec(display=display)).to_xml())
    (graphics,) = root.findall("devices/graphics")
    expected = """<graphics type="vnc" autoport="yes" listen="192.0.2.7" passwd="Ab3dE6gH"
        passwdValidTo="2000-01-01T00:00:00"><listen type="address" address="192.0.2.7"/>
        </graphics>"""
    assert same_xml(ET.tostring(graphics, encoding="unicode"), expected)
    assert root.find("devices")[-1] is graphics  # after the other devices


def test_no_display_no_graphics_and_values_are_escaped():
    assert ET.fromstring(design(spec()).to_xml()).find("devices/graphics") is None
    xml = Graphics("::1", 'a"<&>').to_xml()
    graphics = ET.fromstring(xml)
    assert graphics.get("passwd") == 'a"<&>' and graphics.get("passwdValidTo") is None
    assert graphics.find("listen").get("address") == "::1"


def test_password_expiry_is_written_in_utc_to_the_second():
    moment = datetime(2026, 3, 1, 12, 30, 5, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert password_valid_to(moment) == "2026-03-01T10:30:05"


def test_sealed_display_has_a_fresh_password_long_expired():
    config = {"CONSOLE_ADDRESS": "127.0.0.1"}
    first = sealed_display(Node(console_address=None), config)
    second = sealed_display(Node(console_address="192.0.2.9"), config)
    assert (first.listen, second.listen) == ("127.0.0.1", "192.0.2.9")
    assert first.password_valid_to == SEALED < datetime.now(UTC)
    assert first.password != second.password


def test_display_passwords_are_eight_letters_and_digits():
    passwords = {display_password() for _ in range(200)}
    assert len(passwords) == 200
    alphabet = set(string.ascii_letters + string.digits)
    assert all(len(p) == 8 and set(p) <= alphabet for p in passwords)


def load(tmp_path, monkeypatch, **env):
    for key in DEFAULTS:
        monkeypatch.delenv(f"VMAPI_{key}", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(f"VMAPI_{key}", value)
    app = Flask("t", instance_path=str(tmp_path), instance_relative_config=True)
    load_config(app)
    return app.config


def test_console_settings(tmp_path, monkeypatch):
    config = load(tmp_path, monkeypatch)
    assert (config["CONSOLE_ADDRESS"], config["CONSOLE_TTL"]) == ("127.0.0.1", 300)
    url = config["CONSOLE_URL"].format(base="https://vmapi.example.com/", token="T", password="P")
    assert url.startswith("https://vmapi.example.com/console/vnc.html#")
    assert load(tmp_path, monkeypatch, CONSOLE_TTL="60")["CONSOLE_TTL"] == 60


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CONSOLE_URL", "https://x/{tokn}"),
        ("CONSOLE_URL", "https://x/{0}"),
        ("CONSOLE_URL", "https://x/{token"),
        ("CONSOLE_ADDRESS", "localhost"),
        ("CONSOLE_TTL", "0"),
    ],
)
def test_bad_console_settings_are_named(tmp_path, monkeypatch, key, value):
    with pytest.raises(RuntimeError, match=key):
        load(tmp_path, monkeypatch, **{key: value})


@pytest.mark.parametrize(
    ("message", "args"),
    [
        ("%s: Path: '%s'", ("127.0.0.1", "/console/websockify?token=s3cr3t-T0ken_x")),
        ("Token '%s' not found", ("s3cr3t-T0ken_x",)),
        ("handler exception: Token 's3cr3t-T0ken_x' not found", ()),
        ("GET /console/websockify?a=1&token=s3cr3t-T0ken_x&b=2 HTTP/1.1", ()),
    ],
)
def test_the_proxy_log_never_shows_a_token(message, args):
    record = logging.LogRecord("websockify", logging.INFO, __file__, 1, message, args, None)
    assert RedactTokens().filter(record) is True
    assert "s3cr3t" not in record.getMessage()
    assert "<redacted>" in record.getMessage()


def test_the_proxy_connects_to_concrete_addresses_only():
    assert _concrete("192.0.2.1") and _concrete("::1")
    assert not _concrete("0.0.0.0") and not _concrete("::")
    assert not _concrete(None) and not _concrete("node1.example.com")


def test_the_openapi_document_describes_the_console_answer():
    from vmapi.api.openapi import openapi_document
    from vmapi.config import DEFAULTS

    document = openapi_document({key: default for key, (default, _doc) in DEFAULTS.items()})
    post = document["paths"]["/api/v1/vm/{ident}/console"]["post"]
    created = post["responses"]["201"]["content"]["application/json"]["schema"]
    assert created["properties"]["data"] == {"$ref": "#/components/schemas/VmConsole"}
    assert "200" not in post["responses"] and "409" in post["responses"]
    answer = document["components"]["schemas"]["VmConsole"]["properties"]
    assert set(answer) == {"url", "token", "password", "expires_at"}
    assert "vm/no_console" in post["responses"]["409"]["description"]
    reboot = document["paths"]["/api/v1/vm/{ident}/reboot"]["post"]["responses"]
    assert reboot["200"]["content"]["application/json"]["schema"]["properties"]["data"] == {
        "$ref": "#/components/schemas/Vm"
    }
