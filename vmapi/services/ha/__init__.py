"""High availability: fencing a node that is lost, restarting its VMs elsewhere."""
