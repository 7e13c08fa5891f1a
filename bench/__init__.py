"""Benchmarks: the microbenchmark harness, per-op cases, the main-job runner."""
