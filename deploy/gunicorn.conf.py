"""gunicorn settings for production, `make run`, the tests and the benchmarks.

    gunicorn -c deploy/gunicorn.conf.py wsgi:app

Sized by CPU count: (2 x CPUs) + 1 sync workers, gunicorn's documented starting point
(a request spends part of its time waiting on PostgreSQL and libvirt). Override with
GUNICORN_* variables or command-line flags.

Workers are processes: each opens its own database pool and libvirt connections after
the fork (vmapi opens nothing at import). The worker timeout must stay well above
VMAPI_LIBVIRT_TIMEOUT so a hung host fails a request (504) before gunicorn kills a worker,
and above VMAPI_MIGRATION_TIMEOUT plus twice VMAPI_LIBVIRT_TIMEOUT so a move past its time
is aborted and undone before that: the workers are told the timeout (VMAPI_WORKER_TIMEOUT)
and refuse to start with a migration timeout that does not fit.

Image uploads and downloads (PUT/GET /api/v1/image/<id>/file) may take far longer than
the timeout: they beat the worker's heartbeat for every chunk they move (post_fork
below, vmapi/heartbeat.py), so for them the timeout means "no progress for that long",
while every other request is still cut off after it. Behind the shipped nginx site no
worker waits on a client: nginx spools an upload whole before handing it on and sends
downloads itself (X-Accel-Redirect); without it, a transfer below
VMAPI_TRANSFER_MIN_RATE is cut.

Metrics: every worker writes its Prometheus counters to PROMETHEUS_MULTIPROC_DIR, and a
scrape of /metrics on any worker adds up all of them. The directory is set here (before
any worker starts; the systemd unit sets it to /run/vmapi/metrics), emptied when the
master starts, and a dead worker's live gauges are dropped.
"""

import multiprocessing
import os
import shutil
import tempfile

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", multiprocessing.cpu_count() * 2 + 1))
worker_class = "sync"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 60))
# vmapi keeps a VM's move (VMAPI_MIGRATION_TIMEOUT) and its abort within this; workers
# inherit the variable (on_starting below corrects it for a --timeout flag)
os.environ["VMAPI_WORKER_TIMEOUT"] = str(timeout)
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-")
errorlog = "-"
forwarded_allow_ips = os.environ.get("GUNICORN_FORWARDED_ALLOW_IPS", "127.0.0.1")

# Imported under underscore names: gunicorn reads this module's public globals as settings.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_made_metrics_dir = _metrics_dir is None
if _metrics_dir is None:
    _metrics_dir = tempfile.mkdtemp(prefix="vmapi-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir  # inherited by every worker


def on_starting(server):
    """Counters of an earlier run must not be added to this one's; the workers learn the
    timeout in force (a command-line --timeout wins over this file)."""
    os.environ["VMAPI_WORKER_TIMEOUT"] = str(server.cfg.timeout)
    os.makedirs(_metrics_dir, exist_ok=True)
    for name in os.listdir(_metrics_dir):
        if name.endswith(".db"):
            os.unlink(os.path.join(_metrics_dir, name))


def post_fork(server, worker):
    """Give vmapi this worker's heartbeat, for transfers that outlast the timeout."""
    from vmapi import heartbeat

    heartbeat.install(worker.notify)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _made_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
