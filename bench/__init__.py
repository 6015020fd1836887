"""Benchmark of bb-worker against bare bb and the Rust worker's bb call (issue 4).

Run `make bench` (full, ~25 min) or `make bench-quick` (CI, ~1 min); see bench/README.md.
"""
