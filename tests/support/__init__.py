"""Test-only helpers: in-process vLLM engines, the standalone oracle (transformers + the reference)
and the SIMT emulation of the CUDA kernels (simt.py)."""
