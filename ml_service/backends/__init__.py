"""Inference backends, one module per library; none imports gRPC."""
