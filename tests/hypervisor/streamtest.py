"""What the stream and console-log tests share: names, paths, clean-up (fixtures in
conftest.py). Everything they make is named ``vmapi-streamtest-*``.
"""

from pathlib import Path

URI = "qemu:///system"
PREFIX = "vmapi-streamtest-"
POOL_ROOT = Path("/var/lib/libvirt")


def remove_leftovers(conn):
    """Domains and pools an interrupted run left (by their name)."""
    for dom in conn.listAllDomains():
        if dom.name().startswith(PREFIX):
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    for pool in conn.listAllStoragePools():
        if pool.name().startswith(PREFIX):
            remove_pool(pool)


def remove_pool(pool):
    """Its volumes (whatever the directory holds), the directory, the definition."""
    if pool.isActive():
        pool.refresh(0)
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
    pool.delete(0)
    pool.undefine()


def pool_volumes(conn, pool):
    """The pool's volumes as libvirt sees them after looking at the directory again."""
    found = conn.storagePoolLookupByName(pool)
    found.refresh(0)
    return sorted(found.listVolumes())
