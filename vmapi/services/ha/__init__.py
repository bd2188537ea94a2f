"""High availability: dead nodes found (watch.py), fenced (agents.py, fencing.py), their
VMs restarted elsewhere (restart.py)."""
