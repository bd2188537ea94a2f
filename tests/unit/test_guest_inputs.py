"""Host name, SSH key and user data rules (vmapi/guest_inputs.py). Keys are made by
OpenSSH's ssh-keygen (Debian package openssh-client), and fingerprints compared with
what ``ssh-keygen -lf`` prints; the FIDO key types, which need a token to generate, are
assembled here and accepted by ssh-keygen first."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from marshmallow import Schema, ValidationError, fields, validates

from tests.conftest import unavailable
from vmapi.guest_inputs import (
    MAX_SSH_KEYS,
    MAX_USER_DATA_BYTES,
    parse_ssh_key,
    ssh_key_fingerprint,
    ssh_key_fingerprints,
    validate_guest_hostname,
    validate_ssh_key,
    validate_ssh_keys,
    validate_user_data,
)

GENERATED = {
    "ed25519": ["-t", "ed25519"],
    "rsa-2048": ["-t", "rsa", "-b", "2048"],
    "rsa-3072": ["-t", "rsa", "-b", "3072"],
    "ecdsa-256": ["-t", "ecdsa", "-b", "256"],
    "ecdsa-384": ["-t", "ecdsa", "-b", "384"],
    "ecdsa-521": ["-t", "ecdsa", "-b", "521"],
    "rsa-1024": ["-t", "rsa", "-b", "1024"],
}


def wire(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def key_line(key_type: str, *fields: bytes, comment: str = "") -> str:
    blob = base64.b64encode(wire(key_type.encode(), *fields)).decode()
    return f"{key_type} {blob} {comment}".strip()


SK_ED25519 = key_line("sk-ssh-ed25519@openssh.com", bytes(range(32)), b"ssh:", comment="fido")
#: NIST P-256's base point: a point ssh-keygen accepts as a public key.
P256_G = bytes.fromhex(
    "04"
    "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
)
SK_ECDSA = key_line("sk-ecdsa-sha2-nistp256@openssh.com", b"nistp256", P256_G, b"ssh:")


@pytest.fixture(scope="module")
def ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        unavailable("ssh-keygen (Debian package openssh-client) is not installed")
    return path


@pytest.fixture(scope="module")
def keys(ssh_keygen, tmp_path_factory) -> dict[str, Path]:
    """Public key files made by ssh-keygen, by name (see GENERATED)."""
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for name, args in GENERATED.items():
        private = folder / name
        subprocess.run(
            [ssh_keygen, *args, "-N", "", "-C", f"{name}@test", "-q", "-f", str(private)],
            check=True,
        )
        made[name] = private.with_suffix(".pub")
    return made


def keygen_fingerprint(ssh_keygen: str, path: Path) -> str:
    out = subprocess.run(
        [ssh_keygen, "-l", "-E", "sha256", "-f", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


@pytest.mark.parametrize("name", [n for n in GENERATED if n != "rsa-1024"])
def test_keys_made_by_ssh_keygen_pass_with_its_fingerprint(keys, ssh_keygen, name):
    text = keys[name].read_text()
    validate_ssh_key(text)
    parsed = parse_ssh_key(text)
    assert parsed.comment == f"{name}@test"
    assert ssh_key_fingerprint(text) == keygen_fingerprint(ssh_keygen, keys[name])
    assert ssh_key_fingerprint(text).startswith("SHA256:")
    assert not ssh_key_fingerprint(text).endswith("=")


@pytest.mark.parametrize("text", [SK_ED25519, SK_ECDSA], ids=["sk-ed25519", "sk-ecdsa"])
def test_security_key_types_pass_with_ssh_keygens_fingerprint(ssh_keygen, tmp_path, text):
    path = tmp_path / "sk.pub"
    path.write_text(text + "\n")
    # ssh-keygen reading it shows the assembled key is a real one of its type.
    assert ssh_key_fingerprint(text) == keygen_fingerprint(ssh_keygen, path)
    validate_ssh_key(text)


def test_fingerprints_keep_the_order(keys, ssh_keygen):
    names = ["ecdsa-384", "ed25519"]
    texts = [keys[n].read_text() for n in names]
    assert ssh_key_fingerprints(texts) == [keygen_fingerprint(ssh_keygen, keys[n]) for n in names]


def refusal(text: str) -> str:
    with pytest.raises(ValidationError) as caught:
        validate_ssh_key(text)
    return caught.value.messages[0]


def test_short_rsa_keys_are_refused(keys):
    assert "2048 to 16384 bits, not 1024" in refusal(keys["rsa-1024"].read_text())


def test_inner_type_must_match_the_outer_one(keys):
    _, blob, comment = keys["ed25519"].read_text().split()
    assert "says 'ssh-ed25519', not 'ssh-rsa'" in refusal(f"ssh-rsa {blob} {comment}")


def test_truncated_and_padded_key_data_is_refused(keys):
    key_type, blob, _ = keys["ecdsa-256"].read_text().split()
    raw = base64.b64decode(blob)
    short = base64.b64encode(raw[:-10]).decode()
    assert "ends inside" in refusal(f"{key_type} {short}")
    longer = base64.b64encode(raw + b"\x00").decode()
    assert "left over" in refusal(f"{key_type} {longer}")


BAD_KEYS = {
    "empty": ("", "expected 'TYPE BASE64"),
    "type only": ("ssh-ed25519", "expected 'TYPE BASE64"),
    "dsa": (key_line("ssh-dss", b"p", b"q", b"g", b"y"), "Unknown key type 'ssh-dss'"),
    "certificate": (
        key_line("ssh-ed25519-cert-v01@openssh.com", b"nonce"),
        "Unknown key type",
    ),
    "options": ('from="10.0.0.1" ' + SK_ED25519, "Unknown key type"),
    "bad base64": ("ssh-ed25519 AAAA$$$$", "not valid base64"),
    "ed25519 of 31 bytes": (key_line("ssh-ed25519", bytes(31)), "exactly 32 bytes"),
    "ecdsa curve mismatch": (
        key_line("ecdsa-sha2-nistp384", b"nistp256", b"\x04" + bytes(64)),
        "not nistp384",
    ),
    "ecdsa compressed point": (
        key_line("ecdsa-sha2-nistp256", b"nistp256", b"\x02" + bytes(32)),
        "uncompressed nistp256",
    ),
    "rsa even exponent": (
        key_line("ssh-rsa", b"\x01\x00\x00", b"\x00" + b"\xff" * 256),
        "odd and at least 3",
    ),
    "rsa negative modulus": (key_line("ssh-rsa", b"\x01\x00\x01", b"\xff" * 256), "positive"),
    "sk without application": (
        key_line("sk-ssh-ed25519@openssh.com", bytes(32), b""),
        "names its application",
    ),
    "two keys in one entry": (SK_ED25519 + "\n" + SK_ECDSA, "one key per list entry"),
    "control character": (SK_ED25519 + "\x00", "control characters"),
    "too long": ("ssh-rsa " + "A" * 9000, "Longer than"),
}


@pytest.mark.parametrize(("text", "message"), BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_bad_keys_are_refused_saying_why(text, message):
    assert message in refusal(text)


def test_a_trailing_newline_is_fine():
    validate_ssh_key(SK_ED25519 + "\n")
    assert parse_ssh_key(SK_ED25519 + "\n").comment == "fido"


def test_key_list_errors_name_the_bad_keys_index(keys):
    good = keys["ed25519"].read_text()
    with pytest.raises(ValidationError) as caught:
        validate_ssh_keys([good, "ssh-foo AAAA", SK_ECDSA, good])
    messages = caught.value.messages
    assert set(messages) == {1, 3}
    assert messages[1][0].startswith("Key 1: Unknown key type 'ssh-foo'")
    assert messages[3] == ["Key 3 is the same key as key 0."]


def test_key_list_shape_and_size():
    validate_ssh_keys([])
    for bad, message in [("ssh-ed25519 AAAA", "Must be a list"), ([SK_ECDSA] * 33, "At most")]:
        with pytest.raises(ValidationError, match=message):
            validate_ssh_keys(bad)
    assert MAX_SSH_KEYS == 32


class GuestSchema(Schema):
    """How a request schema uses these validators."""

    hostname = fields.String(validate=validate_guest_hostname)
    ssh_keys = fields.List(fields.String())
    user_data = fields.String(validate=validate_user_data)

    @validates("ssh_keys")
    def _ssh_keys(self, value, **kwargs):
        validate_ssh_keys(value)


def test_marshmallow_reports_the_bad_keys_index_under_the_field(keys):
    good = keys["rsa-2048"].read_text()
    with pytest.raises(ValidationError) as caught:
        GuestSchema().load({"hostname": "-bad", "ssh_keys": [good, "nope"], "user_data": "\x00"})
    errors = caught.value.messages
    assert set(errors) == {"hostname", "ssh_keys", "user_data"}
    assert list(errors["ssh_keys"]) == [1]
    assert "Key 1:" in errors["ssh_keys"][1][0]
    loaded = GuestSchema().load({"hostname": "web1", "ssh_keys": [good], "user_data": "#!/bin/sh"})
    assert loaded["ssh_keys"] == [good]


GOOD_HOSTNAMES = [
    "a",
    "web1",
    "WEB-1",
    "123",
    "a" * 63,
    "web1.example.com",
    "xn--bcher-kva.example",
]
BAD_HOSTNAMES = {
    "": "1 to 253",
    "-web": "not start or end with a hyphen",
    "web-": "not start or end with a hyphen",
    "a" * 64: "1 to 63",
    "web_1": "letters, digits or hyphens",
    "web 1": "letters, digits or hyphens",
    "wéb": "letters, digits or hyphens",
    "web1.": "dot",
    ".web1": "dot",
    "web..example": "dot",
    "10.0.0.1": "last label must not be all digits",
    ".".join(["a" * 63] * 4): "1 to 253",
}


@pytest.mark.parametrize("name", GOOD_HOSTNAMES)
def test_good_hostnames(name):
    validate_guest_hostname(name)


@pytest.mark.parametrize(("name", "message"), BAD_HOSTNAMES.items(), ids=range(len(BAD_HOSTNAMES)))
def test_bad_hostnames(name, message):
    with pytest.raises(ValidationError, match=message):
        validate_guest_hostname(name)


def test_hostname_must_be_a_string():
    with pytest.raises(ValidationError, match="string"):
        validate_guest_hostname(7)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "#cloud-config\n",
        "#!/bin/sh\r\necho\ttab\n",
        "é" * (MAX_USER_DATA_BYTES // 2),
        "a" * MAX_USER_DATA_BYTES,
    ],
    ids=["empty", "cloud-config", "script", "max-multibyte", "max"],
)
def test_good_user_data(text):
    validate_user_data(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a" * (MAX_USER_DATA_BYTES + 1), "At most 65536 bytes"),
        # Fewer characters than the limit, more bytes.
        ("é" * (MAX_USER_DATA_BYTES // 2 + 1), "not 65538"),
        ("#!/bin/sh\n\x00", "control characters"),
        ("\x1b[31m", "control characters"),
        ("\ud800", "lone surrogates"),
        (b"#cloud-config", "string"),
    ],
    ids=["too-long", "too-many-bytes", "nul", "escape", "surrogate", "bytes"],
)
def test_bad_user_data(text, message):
    with pytest.raises(ValidationError, match=message):
        validate_user_data(text)
