"""Benchmarks: `make bench`. Every row is a ratio measured in one run against a baseline."""
