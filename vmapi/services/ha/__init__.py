"""High availability: dead nodes found (watch.py), fenced (fencing.py), their VMs
restarted elsewhere (restart.py)."""
