"""kivi-serve: paged 2-bit KV cache with a codebook per page, for vLLM."""
__version__ = "0.1.0"
