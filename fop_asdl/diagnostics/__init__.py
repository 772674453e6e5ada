"""Measurement helpers for benchmarks and tests (live tensor bytes, host syncs); never on the training path."""
