"""Benchmarks: each measures TabAgent beside a baseline in one run and prints a table."""
