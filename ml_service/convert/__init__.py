"""Offline model conversions: checkpoints turned into the formats the worker runs."""
