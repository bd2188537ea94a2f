"""vmapi: an HTTP API that runs a fleet of libvirt hypervisor hosts.

The application factory is :func:`vmapi.app.create_app`; it lives in a module of its own
so that importing any part of vmapi (gunicorn's hooks, the fuzz hooks, tools) does not
load the whole application.
"""

from vmapi.release import __version__

__all__ = ["__version__"]
