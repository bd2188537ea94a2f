"""The only door to the hypervisors. Takes and returns plain dataclasses.

Nothing here imports Flask, the models or the session; only ``hypervisor/libvirt/``
imports ``libvirt``. ``get_driver()`` returns the process-wide driver.
"""

from vmapi.hypervisor.driver import (
    HostInfo,
    HypervisorDriver,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
)

__all__ = [
    "HostInfo",
    "HypervisorDriver",
    "HypervisorError",
    "HypervisorTimeout",
    "HypervisorUnavailable",
]
