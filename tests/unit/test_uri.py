"""libvirt URI validation: nothing an admin types may run a program on the API host."""

import pytest

from vmapi.hypervisor.uri import validate_libvirt_uri


@pytest.mark.parametrize(
    "uri",
    [
        "qemu:///system",
        "qemu:///session",
        "qemu+ssh://root@node1.example.com/system",
        "qemu+ssh://root@node1.example.com:2222/system?keyfile=/root/.ssh/id_ed25519",
        "qemu+tls://node1.example.com/system?pkipath=/etc/pki/vmapi",
        "qemu+tcp://192.0.2.10/system",
        "qemu+ssh://root@[2001:db8::10]/system",
        "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
        "qemu+ssh://root@node1.example.com/system?no_tty=1&known_hosts_verify=normal",
        "test:///default",
        "test:///var/lib/vmapi/node.xml",
        "lxc:///system",
    ],
)
def test_accepts_what_deployments_use(uri):
    validate_libvirt_uri(uri)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("qemu+ext:///system?command=/bin/sh", "transport 'ext'"),
        ("qemu+ssh://root@host.example.com/system?command=/tmp/evil", "parameter 'command'"),
        ("qemu+ssh://root@host.example.com/system?netcat=/tmp/evil", "parameter 'netcat'"),
        ("qemu+ssh://-oProxyCommand=touch%20x@host.example.com/system", "user name"),
        ("qemu+ssh://root@-oProxyCommand=evil/system", "host"),
        ("qemu+ssh://root@host.example.com/system?Command=x", "parameter 'Command'"),
        ("qemu+ssh://root:secret@host.example.com/system", "password"),
        ("vbox:///session", "driver 'vbox'"),
        ("http://host.example.com/", "driver 'http'"),
        ("qemu://host.example.com/system", "name the transport"),
        ("qemu+ssh://root@host.example.com/system#x", "fragment"),
        ("qemu+ssh://root@host example.com/system", "spaces"),
        ("", "at most 1024"),
        ("qemu:///system/../../etc", None),
    ],
)
def test_refuses_what_could_run_programs(uri, reason):
    if reason is None:
        # Path traversal is harmless to libvirt's qemu driver, but keep the path plain.
        validate_libvirt_uri(uri)
        return
    with pytest.raises(ValueError, match=reason):
        validate_libvirt_uri(uri)
