"""Benchmarks: the microbenchmark harness, per-op cases, the main-job runner."""

# Run from the checkout root, the bare name `kernels` (which transformers imports) must find the
# installed package, not the repository's kernels/ folder: importing opt_core sees to that.
import opt_core  # noqa: F401
