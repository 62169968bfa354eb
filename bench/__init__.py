"""Benchmarks (not part of the test run); installed as tiered_cache.bench for `tiered-cache bench`."""
