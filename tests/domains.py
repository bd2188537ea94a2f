"""Finding the domains a test run made, by the marker in their vmapi metadata."""

import libvirt

from vmapi.hypervisor.libvirt.config import METADATA_NS


def tagged_domains(conn: libvirt.virConnect, marker: str) -> list[libvirt.virDomain]:
    """Domains whose vmapi metadata mentions ``marker`` (an installation id or prefix)."""
    found = []
    for dom in conn.listAllDomains():
        try:
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
        except libvirt.libvirtError as exc:
            # no vmapi metadata, or gone since the listing; anything else (a timeout, a
            # lost connection) must not pass for "not ours"
            if exc.get_error_code() not in (
                libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                libvirt.VIR_ERR_NO_DOMAIN,
            ):
                raise
            continue
        if marker in meta:
            found.append(dom)
    return found
