"""Moves of VMs between nodes: migrate, drain, evacuate, the volumes a move needs, leftovers."""
