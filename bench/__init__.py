"""Benchmarks: python -m bench.train_step, python -m bench.sample, python -m bench.ops."""
