"""Runnable examples (and the small real-data helpers the tests and benchmarks share)."""
