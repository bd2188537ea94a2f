"""The libvirt driver: each public method is one bounded, translated hypervisor action.

:class:`LibvirtDriver` is the one implementation of
:class:`vmapi.hypervisor.HypervisorDriver`, put together from a mixin per concern, each
over :class:`~.calls.LibvirtCalls` (the timeout, the connection cache, the bounded call):

- :mod:`.domains` - definition, lifecycle, state and metadata of domains;
- :mod:`.live` - changes to a running domain (CPUs, memory, display, disks);
- :mod:`.storage` - pools, volumes and their streams, log volumes;
- :mod:`.migration` - moving a domain to another host;
- :mod:`.copies` - standalone copies of disks: a volume cloned, a running disk copied;
- :mod:`.nwfilter` - network filters;
- :mod:`.ceph` - Ceph RBD: the cephx user's secret, rbd storage pools;

and the host's own capacity, here.
"""

from __future__ import annotations

from vmapi.hypervisor.libvirt.ceph import CephCalls
from vmapi.hypervisor.libvirt.copies import CopyCalls
from vmapi.hypervisor.libvirt.domains import DomainCalls
from vmapi.hypervisor.libvirt.live import LiveCalls
from vmapi.hypervisor.libvirt.migration import MigrationCalls
from vmapi.hypervisor.libvirt.nwfilter import FilterCalls
from vmapi.hypervisor.libvirt.storage import StorageCalls
from vmapi.hypervisor.specs import HostInfo

MIB = 1024 * 1024


class LibvirtDriver(
    DomainCalls, LiveCalls, StorageCalls, MigrationCalls, FilterCalls, CopyCalls, CephCalls
):
    """Implements :class:`vmapi.hypervisor.HypervisorDriver` over libvirt-python."""

    # ------------------------------------------------------------------ host
    def host_info(self, uri: str) -> HostInfo:
        model, memory_mib, cpus, mhz, *_ = self._call(uri, lambda conn: conn.getInfo())
        return HostInfo(cores=int(cpus), ram=int(memory_mib) * MIB, model=str(model), mhz=int(mhz))
