"""Benchmarks: ``python -m benchmarks.throughput`` (speed against the ceilings) and
``python -m benchmarks.quality`` (fusion against single modalities); see README."""
