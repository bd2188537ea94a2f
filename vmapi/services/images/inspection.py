"""What an uploaded file really is, before it becomes an image (API.md "/image").

A disk image can name other files: a qcow2 its backing file or an external data file,
a VMDK its extents. A hypervisor that opens such an image opens those files too, with
its own rights (a qcow2 whose backing file is ``/etc/shadow`` hands that file to the
guest: the classic image-format attack), and a raw image that merely looks like
another format is read as that format when anything guesses ("probes") it. So:

1. The header is read here first, in Python. A qcow2 (magic ``QFI\\xfb``) is checked for
   a backing file, an external data file and encryption from its header fields; a
   VMDK (the one probeable format that opens files even without its backing chain) is
   refused outright. Nothing else has been opened yet.
2. Anything else is probed with ``qemu-img info`` *without* ``-f``: qemu-img then
   opens no backing chain (it never does without ``--backing-chain``), and what it
   reports as ``format`` is what any prober would take the file for.
3. The real format must be qcow2 or raw and equal the declared one; only then is
   ``qemu-img info -f <format>`` run (no probing) and its answer checked again: no
   backing file, no data file, not encrypted, not corrupt, a virtual size within
   the limit.

qemu-img runs from an argument list (no shell), with ``--force-share`` (no lock taken),
a timeout, and under ``prlimit`` (1 GiB of address space and limited CPU time, as
OpenStack Nova runs the same call since CVE-2015-5162).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass

from vmapi import heartbeat

QCOW_MAGIC = b"QFI\xfb"
VMDK_MAGICS = (b"KDMV", b"COWD")
#: how much of a file qemu reads to guess its format (BLOCK_PROBE_BUF_SIZE)
PROBE_BYTES = 2048
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
#: seconds one qemu-img run may take: well within gunicorn's worker timeout (60 s),
#: which the heartbeat before each run restarts
TIMEOUT = 20.0
LIMITS = ("--as=1073741824", "--cpu=20")


class ImageRefused(Exception):
    """The file is not an image vmapi accepts; the message says why."""


@dataclass(frozen=True)
class Inspected:
    format: str
    virtual_size: int


def inspect(path: str, declared: str, max_virtual_size: int) -> Inspected:
    """The file's real format and virtual size, or :class:`ImageRefused`."""
    path = os.path.abspath(path)  # qemu-img reads "x:..." as a protocol; "/..." never
    with open(path, "rb") as handle:
        head = handle.read(PROBE_BYTES)
    if not head:
        raise ImageRefused("the file is empty")
    if head[:4] == QCOW_MAGIC:
        check_qcow2_header(head)
        real = "qcow2"
    elif looks_like_vmdk(head):
        raise ImageRefused("the file is a VMDK image; only qcow2 and raw are accepted")
    else:
        real = _format_of(qemu_img_info(path, None))
    if real not in ("qcow2", "raw"):
        raise ImageRefused(f"the file is a {real} image; only qcow2 and raw are accepted")
    if real != declared:
        raise ImageRefused(f"the file is {real}, but the image was declared {declared}")
    info = qemu_img_info(path, real)
    if _format_of(info) != real:
        raise ImageRefused(f"qemu-img read the file as {_format_of(info)}, not {real}")
    check_info(info)
    virtual_size = info.get("virtual-size")
    if not isinstance(virtual_size, int) or virtual_size <= 0:
        raise ImageRefused("the image has no virtual size")
    if virtual_size > max_virtual_size:
        raise ImageRefused(
            f"its virtual size, {virtual_size} bytes, is above the limit of "
            f"{max_virtual_size} bytes"
        )
    return Inspected(real, virtual_size)


def check_qcow2_header(head: bytes) -> None:
    """Refuse a qcow2 whose header names a backing file, an external data file or
    encryption (the header's own fields; nothing is opened)."""
    if len(head) < 72:
        raise ImageRefused("the file is too short to be a qcow2 image")
    version, backing_offset, _backing_size, _bits, _size, crypt = struct.unpack_from(
        ">IQIIQI", head, 4
    )
    if version not in (2, 3):
        raise ImageRefused(f"qcow version {version} is not accepted (only qcow2: 2 or 3)")
    if backing_offset:
        raise ImageRefused("the qcow2 image names a backing file")
    if crypt:
        raise ImageRefused("the qcow2 image is encrypted")
    if version == 3 and len(head) >= 80:
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        if incompatible & QCOW2_INCOMPAT_DATA_FILE:
            raise ImageRefused("the qcow2 image uses an external data file")


def looks_like_vmdk(head: bytes) -> bool:
    """What qemu's vmdk_probe() takes for a VMDK: a sparse extent's magic, or a text
    descriptor whose first line that is not a comment or blank is ``version=1..3``."""
    if head[:4] in VMDK_MAGICS:
        return True
    pos, end = 0, len(head)
    while pos < end:
        byte = head[pos : pos + 1]
        if byte == b"#":
            newline = head.find(b"\n", pos)
            pos = end if newline < 0 else newline + 1
        elif byte == b" ":
            while pos < end and head[pos : pos + 1] == b" ":
                pos += 1
            if head[pos : pos + 1] == b"\r":
                pos += 1
            if head[pos : pos + 1] != b"\n":
                return False
            pos += 1
        elif byte == b"\n":
            pos += 1
        else:
            line = head[pos : pos + 11]
            return any(line.startswith(b"version=%d%s" % (n, eol))
                       for n in (1, 2, 3) for eol in (b"\n", b"\r\n"))  # fmt: skip
    return False


def check_info(info: dict) -> None:
    """qemu-img's own view, checked again: nothing outside the file, nothing odd."""
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageRefused("the image names a backing file")
    specific = info.get("format-specific") or {}
    data = specific.get("data") or {}
    if data.get("data-file"):
        raise ImageRefused("the image uses an external data file")
    if info.get("encrypted") or data.get("encrypt"):
        raise ImageRefused("the image is encrypted")
    if data.get("corrupt"):
        raise ImageRefused("qemu-img reports the image as corrupt")


def qemu_img_info(path: str, fmt: str | None) -> dict:
    """``qemu-img info --output=json`` of ``path``: with ``-f fmt``, or probing when
    ``fmt`` is None (which opens no backing chain)."""
    qemu_img, prlimit = shutil.which("qemu-img"), shutil.which("prlimit")
    if qemu_img is None or prlimit is None:
        raise RuntimeError("qemu-img (Debian: qemu-utils) and prlimit are needed to inspect images")
    command = [prlimit, *LIMITS, "--", qemu_img, "info", "--output=json", "--force-share"]
    if fmt is not None:
        command += ["-f", fmt]
    command.append(path)
    heartbeat.beat()  # the upload before (or the first run) was progress
    try:
        done = subprocess.run(  # noqa: S603 - an argument list of fixed words and our path
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT,
            env={"LC_ALL": "C"},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageRefused(f"qemu-img could not read the image within {TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ImageRefused("qemu-img cannot read it: " + (reason[-1] if reason else "no reason"))
    try:
        info = json.loads(done.stdout)
    except ValueError as exc:
        raise ImageRefused("qemu-img's answer about it is not JSON") from exc
    if not isinstance(info, dict):
        raise ImageRefused("qemu-img's answer about it is not an object")
    return info


def _format_of(info: dict) -> str:
    value = info.get("format")
    return value if isinstance(value, str) else "unknown"
