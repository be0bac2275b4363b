"""Benchmarks (not tests): ``python -m mesa_seg.benchmarks.ops``."""
