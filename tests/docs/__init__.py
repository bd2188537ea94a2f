"""Tests of what the documentation promises, run as documented (README.md's walk)."""
