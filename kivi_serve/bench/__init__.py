"""Benchmarks: ``kivi-serve bench kernels`` (GPU) and ``kivi-serve bench serve`` (HTTP, loopback)."""
