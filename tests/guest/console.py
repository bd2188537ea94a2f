"""What the test guest prints on its serial console, read back by tests.

The guest's ``/init`` (tests/guest/init/) prints one ``VMAPI-GUEST`` line per boot, with
the kernel's boot id (new at every boot), then its marker, the files of a cidata seed, the
network it configured from the seed (``VMAPI-NET``, ``VMAPI-TOLD``, ``VMAPI-HTTPD``), that
its probes are ready (``VMAPI-PROBES``), a ``VMAPI-TICK n`` counter once a second and, for
each probe a test asked for (tests/hypervisor/probes.py), one ``VMAPI-PROBE key=value ...``.
``boots(text)`` splits a console log into what each boot printed, wherever the text came
from (a file libvirt writes, or the API's console log), and ``wait_for`` polls a reader
until a condition holds, within a generous deadline that only bounds a hung guest.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

GUEST = re.compile(r"VMAPI-GUEST root=(\S+) sectors=(\d+)(?: boot_id=(\S+))?")
MARKER = re.compile(r"VMAPI-MARKER sector=(\d+) wrote=(\S+) previous=(\S+)")
CIDATA_FILE = re.compile(r"VMAPI-CIDATA file=(\S+) bytes=(\d+)")
TICK = re.compile(r"VMAPI-TICK (\d+)")
ERROR = re.compile(r"VMAPI-ERROR .*")
NET = re.compile(r"VMAPI-NET (.*)")
TOLD = re.compile(r"VMAPI-TOLD hostname=(\S+) keys=(\d+)(?: instance=(\S+))?")
PROBE = re.compile(r"VMAPI-PROBE (.*)")


@dataclass
class Boot:
    """What the guest printed between one ``VMAPI-GUEST`` line and the next."""

    root: str
    sectors: int
    #: the kernel's boot id (/proc/sys/kernel/random/boot_id): new at every boot
    boot_id: str | None = None
    marker: str | None = None
    marker_sector: int | None = None
    previous_marker: str | None = None
    cidata: dict[str, int] = field(default_factory=dict)
    ticks: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    acpid: bool = False
    powered_off: bool = False
    #: per NIC the seed configured: name, dev, mac, addresses, gateway4, gateway6, dns
    nics: list[dict[str, str]] = field(default_factory=list)
    hostname: str | None = None  # as the seed's meta-data set it
    keys: int | None = None  # SSH keys the meta-data held
    instance_id: str | None = None  # the meta-data's instance-id
    httpd: bool = False
    probes_ready: bool = False  # the probe CGI and its frame sender are there
    #: each probe the guest ran, its outcome by key (action, rc, ...)
    probes: list[dict[str, str]] = field(default_factory=list)


def lines(text: str) -> list[str]:
    """The console's lines, without the serial line's carriage returns."""
    return [line.strip("\r") for line in text.split("\n")]


def boots(text: str) -> list[Boot]:
    """Each boot the console shows, in order (lines before the first one are firmware,
    boot loader and kernel messages)."""
    found: list[Boot] = []
    shown = lines(text)
    for index, line in enumerate(shown):
        # the last line while the guest still writes it (no newline yet): whole lines
        # only where a cut one would read as another value
        unfinished = index == len(shown) - 1 and not text.endswith("\n")
        if match := GUEST.search(line):
            boot_id = None if match.group(3) in (None, "none") else match.group(3)
            found.append(Boot(root=match.group(1), sectors=int(match.group(2)), boot_id=boot_id))
        elif not found:
            continue
        elif match := MARKER.search(line):
            boot = found[-1]
            boot.marker_sector, boot.marker = int(match.group(1)), match.group(2)
            boot.previous_marker = None if match.group(3) == "none" else match.group(3)
        elif match := CIDATA_FILE.search(line):
            found[-1].cidata[match.group(1)] = int(match.group(2))
        elif match := TICK.search(line):
            found[-1].ticks.append(int(match.group(1)))
        elif match := ERROR.search(line):
            found[-1].errors.append(match.group(0))
        elif match := NET.search(line):
            if not unfinished:
                found[-1].nics.append(dict(p.split("=", 1) for p in match.group(1).split()))
        elif match := TOLD.search(line):
            found[-1].hostname, found[-1].keys = match.group(1), int(match.group(2))
            found[-1].instance_id = match.group(3)
        elif match := PROBE.search(line):
            found[-1].probes.append(
                dict(p.split("=", 1) for p in match.group(1).split() if "=" in p)
            )
        elif "VMAPI-PROBES ready" in line:
            found[-1].probes_ready = True
        elif "VMAPI-HTTPD started" in line:
            found[-1].httpd = True
        elif "VMAPI-ACPID started" in line:
            found[-1].acpid = True
        elif "VMAPI-POWEROFF" in line:
            found[-1].powered_off = True
    return found


def wait_for(
    read: Callable[[], str], done: Callable[[str], bool], what: str, timeout: float = 180.0
) -> str:
    """Poll ``read()`` until ``done(text)``; the text. The deadline is generous (TCG
    boots in about 10 s) and only stops a test whose guest hangs."""
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if done(text):
            return text
        if time.monotonic() > deadline:
            tail = "\n".join(lines(text)[-40:])
            raise AssertionError(f"{what}: not seen within {timeout:.0f} s; console ends:\n{tail}")
        time.sleep(0.5)
