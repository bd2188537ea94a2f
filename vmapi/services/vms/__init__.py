"""VMs: create (one or an array), change, delete, reboot, the hot reads, what a domain needs."""
