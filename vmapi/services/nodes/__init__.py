"""Nodes: reaching a node's hypervisor, the domains on it, registering nodes, their health."""
