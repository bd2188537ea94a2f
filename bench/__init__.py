"""Benchmarks (``make bench``); figures are printed and recorded in docs/benchmarks-history.md."""
