"""Networking: address pools, allocation of interfaces and addresses, /interface."""
