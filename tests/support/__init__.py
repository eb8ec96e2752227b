"""Test-only helpers: in-process vLLM engines and the standalone oracle (transformers + the reference)."""
