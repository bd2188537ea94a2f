"""The libvirt implementation of the hypervisor interface (the only importer of libvirt)."""

from vmapi.hypervisor.libvirt.driver import LibvirtDriver

__all__ = ["LibvirtDriver"]
