"""Host device names fit Linux's 15 characters for any installation and any MAC, and
differ between installations (vmapi.services.names; issue 12)."""

import random
import string

from vmapi.services.names import device_suffix, device_tag

IFNAMSIZ = 15  # visible characters of a Linux network device name


def test_device_names_fit_whatever_the_installation_and_mac():
    rng = random.Random(12)
    alphabet = string.ascii_lowercase + string.digits + "-"
    for _ in range(2000):
        installation = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
        mac = "52:54:00:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))
        suffix = device_suffix(installation, mac)
        for name in (f"vm{suffix}", f"br-{suffix}"):
            assert len(name) <= IFNAMSIZ and all(c in alphabet for c in name), name
        # a letter first: never the <vm id>-<interface id> of names made before
        assert suffix[0] in string.ascii_lowercase and len(suffix) == 11


def test_the_suffix_comes_from_the_installation_and_the_mac():
    assert device_suffix("prod", "52:54:00:0a:0b:0c").endswith("-0a0b0c")
    assert device_suffix("prod", "52:54:00:0a:0b:0c") == device_suffix("prod", "52:54:00:0a:0b:0c")
    tags = {device_tag(f"installation-{i}") for i in range(500)}
    assert len(tags) >= 495  # two installations sharing a host almost never share a tag
