"""Methods vLLM mixes into its worker class (``worker_extension_cls``), called by name over RPC.

vLLM's ``AsyncLLM`` runs the engine core (and with it the model runner and our attention backend)
in another process, so what the backend knows — its staging pool, the cache tensors it was handed —
is read there, with ``collective_rpc("kivi_...")``, and comes back as plain dicts (msgpack).
Names start with ``kivi_`` so that they never collide with the worker's own attributes.
"""

from __future__ import annotations

from collections import Counter


class KiviWorkerExtension:
    """Read-only probes of the worker's KV cache and attention backend."""

    def kivi_cache_stats(self) -> dict:
        """``kivi_serve.backend.cache_stats()`` of this worker's engine, as a plain dict (inactive
        without our backend), after releasing the staging slots of requests that are gone;
        :meth:`BackendStats.merged` reads it back."""
        from kivi_serve.backend import cache_stats, release_finished

        release_finished(self.model_runner)
        return cache_stats(self.vllm_config).as_dict()

    def kivi_kv_layout(self) -> dict:
        """The KV cache vLLM really allocated here: blocks, bytes, and one page's bytes and heads.

        vLLM 0.32 backs every ``KVCacheTensor`` with one allocation of ``size`` bytes (the KV-cache
        groups of a hybrid model overlay it: ``v1/worker/utils.py``), so that size is the bytes, not the
        sum over tensors. ``num_groups``: KV-cache groups (several for sliding-window + full models);
        a block holds one page of every layer of one group.
        """
        cfg = self.model_runner.kv_cache_config
        spec = cfg.kv_cache_groups[0].kv_cache_spec
        return {
            "num_blocks": int(cfg.num_blocks),
            "tensor_bytes": int(max((t.size for t in cfg.kv_cache_tensors), default=0)),
            "page_size_bytes": int(spec.page_size_bytes),  # one block of one layer, all its KV heads
            "num_kv_heads": int(spec.num_kv_heads),
            "num_groups": len(cfg.kv_cache_groups),
        }

    def kivi_attention_probe(self) -> dict:
        """Which attention implementation each layer runs, and its cache tensor's dtype and shape."""
        ctx = self.vllm_config.compilation_config.static_forward_context
        impls, backends, dtypes = Counter(), Counter(), Counter()
        shape: list[int] = []
        for layer in ctx.values():
            impl = getattr(layer, "impl", None)
            if impl is None:
                continue
            impls[_qualified(type(impl))] += 1
            get_backend = getattr(layer, "get_attn_backend", None)
            if callable(get_backend):
                backends[_qualified(get_backend())] += 1
            kv = getattr(layer, "kv_cache", None)
            if isinstance(kv, (list, tuple)):
                kv = kv[0] if kv else None
            if kv is not None and hasattr(kv, "dtype"):
                dtypes[str(kv.dtype)] += 1
                shape = shape or [int(s) for s in kv.shape]
        counts = {"impls": impls, "backends": backends, "kv_dtypes": dtypes}
        return {**{k: dict(v) for k, v in counts.items()}, "kv_shape": shape}  # plain dicts for msgpack


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
