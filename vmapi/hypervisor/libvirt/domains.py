"""Domains: their persistent definition, their lifecycle, and how the host reports them."""

from __future__ import annotations

import logging

import libvirt

from vmapi.hypervisor.libvirt.calls import LibvirtCalls
from vmapi.hypervisor.libvirt.config import METADATA_NS, Metadata
from vmapi.hypervisor.libvirt.designer import design
from vmapi.hypervisor.specs import CRASHED, ERROR, PAUSED, RUNNING, SHUTOFF, DomainInfo, DomainSpec

log = logging.getLogger(__name__)

STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: ERROR,
    libvirt.VIR_DOMAIN_RUNNING: RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RUNNING,  # running, waiting on I/O
    libvirt.VIR_DOMAIN_PAUSED: PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: RUNNING,  # still running while it shuts down
    libvirt.VIR_DOMAIN_SHUTOFF: SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PAUSED,
}


def _info(dom: libvirt.virDomain) -> DomainInfo:
    state, _max_mem, memory_kib, vcpus, _cpu_time = dom.info()
    vm_id = installation = None
    try:
        meta = Metadata.parse(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0))
        vm_id, installation = meta.vm_id, meta.installation
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            raise
    except ValueError:
        log.warning("domain %s has unreadable vmapi metadata", dom.name())
    return DomainInfo(
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=STATES.get(state, ERROR),
        vcpus=vcpus,
        memory=memory_kib * 1024,
        vm_id=vm_id,
        installation=installation,
    )


class DomainCalls(LibvirtCalls):
    """Define, start, stop, pause and remove domains; read their state and metadata."""

    # ------------------------------------------------------------------ lifecycle
    def define(self, uri: str, spec: DomainSpec) -> None:
        xml = design(spec).to_xml()
        self._call(uri, lambda conn: conn.defineXML(xml))

    def start(self, uri: str, name: str, paused: bool = False) -> None:
        if paused:
            flag = libvirt.VIR_DOMAIN_START_PAUSED
            self._on_domain(uri, name, lambda dom: dom.createWithFlags(flag))
        else:
            self._on_domain(uri, name, lambda dom: dom.create())

    def shutdown(self, uri: str, name: str) -> None:
        self._on_domain(uri, name, lambda dom: dom.shutdown())

    def destroy(self, uri: str, name: str) -> None:
        def destroy(dom: libvirt.virDomain) -> None:
            if not dom.isActive():
                return
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                # the guest went off on its own between the two calls (it had been asked
                # to shut down): off is what was wanted
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or dom.isActive():
                    raise

        self._on_domain(uri, name, destroy)

    def undefine(self, uri: str, name: str) -> None:
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM

        def undefine(dom: libvirt.virDomain) -> None:
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError as exc:
                # Drivers without managed save or NVRAM (the test driver) refuse the flags.
                if exc.get_error_code() not in (
                    libvirt.VIR_ERR_NO_SUPPORT,
                    libvirt.VIR_ERR_INVALID_ARG,
                ):
                    raise
                dom.undefine()

        self._on_domain(uri, name, undefine)

    def suspend(self, uri: str, name: str) -> None:
        self._on_domain(uri, name, lambda dom: dom.suspend())

    def resume(self, uri: str, name: str) -> None:
        self._on_domain(uri, name, lambda dom: dom.resume())

    def reboot(self, uri: str, name: str) -> None:
        self._on_domain(uri, name, lambda dom: dom.reboot(0))

    # ------------------------------------------------------------------ reading
    def domain(self, uri: str, name: str) -> DomainInfo:
        return self._on_domain(uri, name, _info)

    def domains(self, uri: str) -> list[DomainInfo]:
        return self._call(uri, lambda conn: [_info(d) for d in conn.listAllDomains()])
