"""libvirt URI validation: nothing an admin types may run a program or read a file, on the
API host or on a node (issue 21: parameter values too, not only their names)."""

import pytest

from vmapi.hypervisor.uri import UriPolicy, validate_libvirt_uri

POLICY = UriPolicy(
    test_driver_dir="/var/lib/vmapi/test-nodes",
    credential_dirs=("/etc/vmapi/ssh", "/etc/pki/vmapi", "/root/.ssh"),
)


@pytest.mark.parametrize(
    "uri",
    [
        "qemu:///system",
        "qemu:///session",
        "qemu+ssh://root@node1.example.com/system",
        "qemu+ssh://root@node1.example.com:2222/system?keyfile=/root/.ssh/id_ed25519",
        "qemu+tls://node1.example.com/system?pkipath=/etc/pki/vmapi",
        "qemu+tls://node1.example.com/system?pkipath=/etc/pki/vmapi/client&no_verify=1",
        "qemu+tcp://192.0.2.10/system",
        "qemu+ssh://root@[2001:db8::10]/system",
        "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
        "qemu+ssh://root@node1.example.com/system?no_tty=1&mode=legacy&proxy=netcat",
        "qemu+ssh://root@node1.example.com/system?socket=/var/run/libvirt/libvirt-sock",
        "qemu+libssh2://root@node1.example.com/system?known_hosts_verify=normal"
        "&known_hosts=/etc/vmapi/ssh/known_hosts&sshauth=agent,privkey",
        "test:///default",
        "test+unix:///default",
        "test+unix:///default?socket=/tmp/pytest-of-root/pytest-1/proxy0/sock",
        "test:///var/lib/vmapi/test-nodes/host0.xml",
        "test+unix:///var/lib/vmapi/test-nodes/sub/host1.xml",
        "lxc:///system",
    ],
)
def test_accepts_what_deployments_use(uri):
    validate_libvirt_uri(uri, POLICY)


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
        # issue 21, 1: a socket value that libvirt pastes into the remote shell command
        (
            "qemu+ssh://root@hv9.example.com/system?socket=/x%27%3Bid%3E%2Ftmp%2Fpwned%3B%27",
            "parameter 'socket'",
        ),
        ("qemu+ssh://root@hv9.example.com/system?socket=/x';id;'", "parameter 'socket'"),
        ("qemu+ssh://root@hv9.example.com/system?socket=/run/$(id)", "parameter 'socket'"),
        ("qemu+ssh://root@hv9.example.com/system?socket=/run/`id`", "parameter 'socket'"),
        ("qemu+ssh://root@hv9.example.com/system?socket=relative", "parameter 'socket'"),
        ("qemu+ssh://root@hv9.example.com/system?socket=/run/../etc/x", "parameter 'socket'"),
        ("qemu+ssh://root@hv9.example.com/system?socket=/run/%2e%2e/x", "parameter 'socket'"),
        ("qemu+ssh://root@hv9.example.com/system?mode=auto;id", "parameter 'mode'"),
        ("qemu+ssh://root@hv9.example.com/system?no_tty=yes", "parameter 'no_tty'"),
        ("qemu+ssh://root@hv9.example.com/system?proxy=sh", "parameter 'proxy'"),
        ("qemu+libssh://root@hv9.example.com/system?sshauth=agent;id", "parameter 'sshauth'"),
        ("qemu+libssh://h.example.com/system?known_hosts_verify=x", "'known_hosts_verify'"),
        ("qemu+tls://h.example.com/system?tls_priority=NORMAL", "parameter 'tls_priority'"),
        ("qemu+ssh://h.example.com/system?pkipath=/etc/pki/vmapi", "does not apply"),
        ("qemu+tcp://h.example.com/system?socket=/run/x", "does not apply"),
        # issue 21, 2: a file's first line through the test driver, here or on a node
        ("test:///etc/shadow", "TEST_DRIVER_DIR"),
        ("test+unix:///etc/shadow", "TEST_DRIVER_DIR"),
        ("test:///var/lib/vmapi/test-nodes/../../../etc/shadow", "path"),
        ("test:///var/lib/vmapi/test-nodes-evil/x.xml", "TEST_DRIVER_DIR"),
        ("qemu+ssh://node.example.com/system?name=test:///etc/shadow", "parameter 'name'"),
        ("qemu+ssh://node.example.com/system?name=qemu:///system", "parameter 'name'"),
        ("test+ssh://node.example.com/default", "local only"),
        ("test://node.example.com/default", "local only"),
        # credential files only under the configured folders
        ("qemu+ssh://h.example.com/system?keyfile=/etc/shadow", "LIBVIRT_CREDENTIAL_DIRS"),
        ("qemu+tls://h.example.com/system?pkipath=/tmp/pki", "LIBVIRT_CREDENTIAL_DIRS"),
        ("qemu+libssh2://h.example.com/system?known_hosts=/etc/x", "LIBVIRT_CREDENTIAL_DIRS"),
        # paths: /system (and /session locally)
        ("qemu:///system/../../etc", "path"),
        ("qemu+ssh://h.example.com/session", "path '/session'"),
        ("qemu:///embed?root=/tmp", "path '/embed'"),
        ("qemu+ssh://h.example.com/system?", "empty query"),
    ],
)
def test_refuses_what_could_run_programs_or_read_files(uri, reason):
    with pytest.raises(ValueError, match=reason):
        validate_libvirt_uri(uri, POLICY)


def test_without_a_test_driver_dir_only_the_default_test_host_opens():
    strict = UriPolicy()
    validate_libvirt_uri("test:///default", strict)
    with pytest.raises(ValueError, match=r"TEST_DRIVER_DIR \(not set\)"):
        validate_libvirt_uri("test:///var/lib/vmapi/test-nodes/host0.xml", strict)


def test_a_symlink_out_of_the_test_driver_dir_is_refused(tmp_path):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "escape.xml").symlink_to("/etc/passwd")
    policy = UriPolicy(test_driver_dir=str(tmp_path / "nodes"))
    with pytest.raises(ValueError, match="TEST_DRIVER_DIR"):
        validate_libvirt_uri(f"test://{tmp_path}/nodes/escape.xml", policy)
