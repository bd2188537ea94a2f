"""The header checks made in Python before qemu-img opens anything, and the checks of
qemu-img's answer (the real qemu-img runs in tests/api/test_image_file.py)."""

import struct

import pytest

from vmapi.services.images.inspection import (
    ImageRefused,
    check_info,
    check_qcow2_header,
    looks_like_vmdk,
)


def qcow2_header(version=3, backing_offset=0, crypt=0, incompatible=0) -> bytes:
    head = bytearray(104)
    head[:4] = b"QFI\xfb"
    struct.pack_into(">IQIIQI", head, 4, version, backing_offset, 0, 16, 1 << 20, crypt)
    struct.pack_into(">Q", head, 72, incompatible)
    return bytes(head)


def test_a_plain_qcow2_header_passes():
    check_qcow2_header(qcow2_header())
    check_qcow2_header(qcow2_header(version=2))


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (qcow2_header(backing_offset=512), "backing file"),
        (qcow2_header(incompatible=1 << 2), "external data file"),
        (qcow2_header(crypt=2), "encrypted"),
        (qcow2_header(version=1), "qcow version 1"),
        (qcow2_header()[:40], "too short"),
    ],
)
def test_qcow2_headers_refused(head, reason):
    with pytest.raises(ImageRefused, match=reason):
        check_qcow2_header(head)


@pytest.mark.parametrize(
    "head",
    [
        b"KDMV\x01\x00\x00\x00",
        b"COWD\x01\x00\x00\x00",
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n",
        b'# comment\n\n   \nversion=3\r\nRW 2048 FLAT "/etc/shadow" 0\n',
    ],
)
def test_vmdk_is_recognised_as_qemu_would(head):
    assert looks_like_vmdk(head)


@pytest.mark.parametrize(
    "head",
    [b"\0" * 512, b"version=4\n", b"#!/bin/sh\nset -e\nversion=1\n", b"  x\nversion=1\n"],
)
def test_other_bytes_are_not_vmdk(head):
    assert not looks_like_vmdk(head)


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        ({"format": "qcow2", "backing-filename": "/etc/shadow"}, "backing file"),
        ({"format": "qcow2", "full-backing-filename": "json:{}"}, "backing file"),
        ({"format": "qcow2", "format-specific": {"data": {"data-file": "/dev/sda"}}}, "data file"),
        ({"format": "qcow2", "encrypted": True}, "encrypted"),
        ({"format": "qcow2", "format-specific": {"data": {"corrupt": True}}}, "corrupt"),
    ],
)
def test_qemu_img_answers_refused(info, reason):
    with pytest.raises(ImageRefused, match=reason):
        check_info(info)
