"""Benchmarks: where the time goes, per backend, on the contest workload. Run `python -m benchmarks`."""
