"""Benchmark sections of `mobilediffusion bench` that stand apart from the component rows."""
