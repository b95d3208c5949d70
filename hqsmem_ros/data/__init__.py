"""Data generation for tests and benchmarks (synthetic scenes with exact ground truth)."""
