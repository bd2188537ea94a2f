"""Consoles: interactive sessions and their tokens, the serial console log."""
