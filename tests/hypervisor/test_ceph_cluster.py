"""The Ceph fixture's clean-up of what a killed run left (tests/hypervisor/ceph_cluster.py):
a cluster folder whose owner is gone goes with its daemons; one whose owner runs stays.
Stand-in daemons (a sleeping Python naming the folder's ceph.conf, as ceph-mon does, and
writing its pid file, detached like a forking daemon): no cluster is started here."""

import contextlib
import os
import signal
import subprocess
import sys
import time

from tests.hypervisor.ceph_cluster import MARKER, OWNER, _start_time, remove_leftovers


def folder_with_daemon(root, name, owner):
    """A cluster folder, its owner file and a daemon's pid file; the daemon's pid."""
    folder = root / f"{MARKER}{name}"
    (folder / "run").mkdir(parents=True)
    conf = folder / "ceph.conf"
    conf.write_text("[global]\n")
    pidfile = folder / "run" / "mon.a.pid"
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)"
    subprocess.run(["setsid", "-f", sys.executable, "-c", code, str(pidfile), "-c", str(conf)],
                   check=True)  # fmt: skip
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (folder / OWNER).write_text(owner)
    return folder, int(pidfile.read_text())


def test_a_killed_runs_cluster_goes_and_a_running_ones_stays(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone, orphan = folder_with_daemon(tmp_path, "gone", f"{dead.pid} 1\n")
    mine, daemon = folder_with_daemon(tmp_path, "mine",
                                      f"{os.getpid()} {_start_time(os.getpid())}\n")  # fmt: skip
    other = tmp_path / "not-ours"
    other.mkdir()
    try:
        assert remove_leftovers(tmp_path) == [gone]
        assert not os.path.exists(f"/proc/{orphan}")  # killed, and gone at once
        assert not gone.exists()
        assert mine.exists() and other.exists()
        assert os.path.exists(f"/proc/{daemon}")
    finally:
        for pid in (orphan, daemon):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
