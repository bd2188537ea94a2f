"""Version strings in URLs (API.md §1)."""

import pytest

from vmapi.api.version import VersionMalformed, VersionUnsupported, check_version, parse_version


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("v1", (1, 0, 0)), ("v1.0", (1, 0, 0)), ("v1.0.0", (1, 0, 0)), ("v2.3", (2, 3, 0)),
     ("v0.0.7", (0, 0, 7))],
)  # fmt: skip
def test_parse(text, parsed):
    assert parse_version(text) == parsed


@pytest.mark.parametrize("text", ["1", "v", "v1.", "v1..0", "va", "v1.0.0.0", "V1", "v-1", "v1.x"])
def test_malformed(text):
    with pytest.raises(VersionMalformed) as info:
        parse_version(text)
    assert info.value.status_code == 400
    assert info.value.error_id == "general/version/malformed"


@pytest.mark.parametrize("text", ["v1", "v1.0", "v1.0.0"])
def test_supported(text):
    assert check_version(text) == (1, 0, 0)


@pytest.mark.parametrize("text", ["v2", "v1.1", "v1.0.1", "v0"])
def test_unsupported(text):
    with pytest.raises(VersionUnsupported) as info:
        check_version(text)
    assert info.value.status_code == 404
