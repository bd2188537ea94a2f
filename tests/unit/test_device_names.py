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


# Worked out once by hand from the rule (the first 8 bytes of the installation's SHA-256 as a
# big-endian number; its remainder by 26 picks the letter, then three remainders by 36 pick
# [0-9a-z]; e.g. sha256("prod")[:8] = 0x6754af9632a2745e -> "k63u"). Pinned: a change would
# rename every existing host device of an installation.
KNOWN_SUFFIXES = [
    ("prod", "52:54:00:0a:0b:0c", "k63u-0a0b0c"),
    ("prod", "52:54:00:ff:00:01", "k63u-ff0001"),
    ("staging", "52:54:00:0a:0b:0c", "y2vh-0a0b0c"),
    ("vmapi-test", "52:54:00:0a:0b:0c", "z4j7-0a0b0c"),
    ("a", "52:54:00:0a:0b:0c", "yhb2-0a0b0c"),
]


def test_the_suffix_comes_from_the_installation_and_the_mac():
    for installation, mac, expected in KNOWN_SUFFIXES:
        assert device_suffix(installation, mac) == expected, (installation, mac)
        assert device_tag(installation) == expected[:4]
    tags = {device_tag(f"installation-{i}") for i in range(500)}
    assert len(tags) >= 495  # two installations sharing a host almost never share a tag
