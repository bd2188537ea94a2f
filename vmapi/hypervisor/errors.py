"""The hypervisor interface's exceptions: what a host's failure is, whatever the driver."""

from __future__ import annotations

#: Why a host could not be reached: the only words about a failed connection an answer
#: carries (libvirt's own text can quote a file it read, so it goes to the log only).
REASON_CLASSES = ("unreachable", "auth_failed", "timeout", "refused")


class HypervisorError(Exception):
    """The hypervisor answered with an error. ``reason`` is its own message."""

    #: one of REASON_CLASSES when the host could not be reached
    reason_class: str | None = None

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")


class HypervisorUnavailable(HypervisorError):
    """The hypervisor could not be reached (connection refused, DNS, auth, dead link).

    ``reason_class`` says why in one of :data:`REASON_CLASSES`; the libvirt layer gives
    it as the ``reason`` too, never libvirt's text."""

    def __init__(self, uri: str, reason: str, reason_class: str = "unreachable") -> None:
        if reason_class not in REASON_CLASSES:
            raise ValueError(f"not a reason class: {reason_class!r}")
        self.reason_class = reason_class
        super().__init__(uri, reason)


class UriRefused(HypervisorError):
    """The URI is not one vmapi may open (vmapi.hypervisor.uri): nothing was connected."""


class HypervisorTimeout(HypervisorError):
    """The hypervisor did not answer within the configured time."""

    reason_class = "timeout"

    def __init__(self, uri: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(uri, f"no answer within {timeout:g} s")


class DomainNotFound(HypervisorError):
    """The host has no domain of that name."""


class VolumeNotFound(HypervisorError):
    """The pool has no volume of that name."""


class PoolNotFound(HypervisorError):
    """The host has no storage pool of that name."""


class NameTaken(HypervisorError):
    """Something else on the host already has the name (a domain, or a volume in the pool)."""


class VolumeExists(NameTaken):
    """The pool already has a volume of that name (it is left as it is)."""


class OperationInvalid(HypervisorError):
    """The domain is not in a state that allows the operation (e.g. suspend a shut-off one)."""


class VolumeHasClones(OperationInvalid):
    """The volume is the parent of copy-on-write clones (an RBD image): it can be deleted
    only once they are gone."""


class DiskLeased(HypervisorError):
    """The host's lock manager (libvirt's lockd) refused a disk: its lease is held by
    another host, whose QEMU has the disk open. Nothing of the domain ran."""


class NotSupported(HypervisorError):
    """The hypervisor cannot do this (e.g. change a live setting its driver does not support)."""


class NoDisplay(HypervisorError):
    """The running domain has no VNC display (defined before vmapi gave domains one)."""


class NoNetworkFilters(HypervisorError):
    """The host's libvirt has no network filter driver (nwfilter): it cannot guard NICs."""


class NoGuestAgent(HypervisorError):
    """The domain has no guest agent that answers (none configured, none running in the
    guest, or it did not reply in time): its file systems cannot be frozen."""
