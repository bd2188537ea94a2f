"""A storage pool that another request defines or starts at the same moment (issue 13's
console-log and image pools are made on a node's first use, by whichever request comes
first): the one that loses the race uses the pool the winner made instead of failing.

libvirt's test driver serializes calls, so the race is made on purpose: the real
connection is wrapped so that its first lookup answers libvirt's own "no storage pool"
(as it did just before the other request defined the pool).
"""

import libvirt

from vmapi.hypervisor.libvirt.storage import _ensure_pool

URI = "test:///default"


class LateLookup:
    """The real connection; its first pool lookup is too early to see the pool."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn
        self.missed = False

    def storagePoolLookupByName(self, name: str) -> libvirt.virStoragePool:
        if not self.missed:
            self.missed = True
            return self.conn.storagePoolLookupByName(f"{name}-not-yet")  # libvirt's own error
        return self.conn.storagePoolLookupByName(name)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def test_the_loser_of_a_define_race_uses_the_winners_pool(tmp_path):
    conn = libvirt.open(URI)
    try:
        winner, created = _ensure_pool(conn, "raced", str(tmp_path))
        assert created
        late = LateLookup(conn)
        found, created = _ensure_pool(late, "raced", str(tmp_path))
        assert late.missed and not created
        assert found.UUIDString() == winner.UUIDString() and found.isActive()
    finally:
        pool = conn.storagePoolLookupByName("raced")
        pool.destroy()
        pool.undefine()
        conn.close()


def test_a_pool_started_meanwhile_is_no_error(tmp_path):
    conn = libvirt.open(URI)
    try:
        pool, _created = _ensure_pool(conn, "started", str(tmp_path))
        pool.destroy()

        class StartedMeanwhile:
            """The pool as this request saw it: inactive, and started by another first."""

            def __init__(self) -> None:
                self.pool = pool

            def isActive(self) -> bool:
                return bool(self.pool.isActive())

            def create(self, flags: int) -> None:
                self.pool.create(flags)  # the other request
                self.pool.create(flags)  # this one: libvirt refuses, the pool runs

            def __getattr__(self, name: str):
                return getattr(self.pool, name)

        class Conn:
            def storagePoolLookupByName(self, name: str):
                return StartedMeanwhile()

        found, created = _ensure_pool(Conn(), "started", str(tmp_path))
        assert not created and found.isActive()
    finally:
        pool = conn.storagePoolLookupByName("started")
        pool.destroy()
        pool.undefine()
        conn.close()
