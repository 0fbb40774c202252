"""Benchmarks run by `mobilediffusion bench` beside its component table (see mobilediffusion/bench.py)."""
