"""gunicorn settings for `make run` and production (override with GUNICORN_* or -c).

Workers are processes: each opens its own database pool and libvirt connections after
the fork (vmapi opens nothing at import). The worker timeout must stay well above
VMAPI_LIBVIRT_TIMEOUT so a hung host fails a request (504) before gunicorn kills a worker.
"""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", multiprocessing.cpu_count() * 2 + 1))
worker_class = "sync"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 60))
graceful_timeout = 30
keepalive = 5
accesslog = "-"
errorlog = "-"
forwarded_allow_ips = os.environ.get("GUNICORN_FORWARDED_ALLOW_IPS", "127.0.0.1")
