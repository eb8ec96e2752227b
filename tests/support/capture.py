"""What a vLLM engine hands our backend, recorded, and checked against the page format bit for bit.

The engine tests compare a vLLM engine on our backend with an oracle (transformers + the
reference). Two different numeric stacks meet there (vLLM's CPU kernels and transformers' fp32
kernels pick their SIMD path by CPU), so their keys and values agree only to rounding, and a
rounding difference can move a 2-bit code. What must be exact is our part: given the keys and
values vLLM hands the backend, the pages and staging it writes. :class:`AppendCapture` records,
per layer, every ``do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)`` call (slots come
from vLLM, independently of our planner) and checks

- after each call, every partial page's staged rows equal the tokens vLLM handed us stored in the
  staging format (:func:`kivi_serve.quant.staging.store`: cast to the model dtype, or int8 rows;
  compared with ``torch.equal``);
- on :meth:`AppendCapture.check_pages`, every page the request filled equals
  :func:`kivi_serve.quant.page.quantize_pages` of exactly those keys and values (``torch.equal``
  on the bytes) — the tokens that waited in staging as staging reads them back, the tokens of the
  call that completed the page as given — with the sink rule on the sequence's first page.

Use one request per capture (positions are then the order in which its tokens arrive).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from kivi_serve.quant import page
from kivi_serve.quant import staging as staging_format


def _staged_page(impl, block: int) -> torch.Tensor | None:
    """The staging slot holding ``block``'s open page for this layer, ``(2, Hkv, P, D)``, or None
    (the pool's state lives on the device: a host read, fine in a test between steps)."""
    for group in impl.runtime.groups:
        blocks = group.pool.snapshot()["slot_blocks"]
        if block in blocks:
            return impl.staging[blocks.index(block)]
    return None


class AppendCapture:
    """Context manager: record and check the appends of one request on a kivi-serve engine.

    Parameters
    ----------
    first_position : int
        Position of the first token the request writes (its prefix-cache hit length, else 0).
    """

    def __init__(self, first_position: int = 0) -> None:
        self.first_position = first_position
        #: layer name → list of (key (n, Hkv, D), value, slots (n,)) in call order, padding dropped
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.impls: dict[str, object] = {}
        self.caches: dict[str, torch.Tensor] = {}
        self.staged_checks = 0

    def __enter__(self) -> AppendCapture:
        from kivi_serve.backend.attention import KiviAttentionImpl

        self._cls = KiviAttentionImpl
        self._orig = KiviAttentionImpl.do_kv_cache_update
        capture = self

        def recording(impl, layer, key, value, kv_cache, slot_mapping):
            capture._orig(impl, layer, key, value, kv_cache, slot_mapping)
            capture._record(impl, layer.layer_name, key, value, kv_cache, slot_mapping)

        KiviAttentionImpl.do_kv_cache_update = recording
        return self

    def __exit__(self, *exc) -> None:
        self._cls.do_kv_cache_update = self._orig

    # ------------------------------------------------------------------ recording
    def _record(self, impl, name, key, value, kv_cache, slot_mapping) -> None:
        n = min(key.shape[0], slot_mapping.shape[0])
        slots = slot_mapping[:n].long()
        keep = slots >= 0  # vLLM pads with slot -1
        if not bool(keep.any()):
            return
        self.calls[name].append((key[:n][keep].clone(), value[:n][keep].clone(), slots[keep].clone()))
        self.impls[name], self.caches[name] = impl, kv_cache
        self._check_open_page(impl, name)

    def history(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All tokens this layer was handed: key, value ``(n, Hkv, D)`` and their slots ``(n,)``."""
        k, v, s = zip(*self.calls[name])
        return torch.cat(k), torch.cat(v), torch.cat(s)

    def call_ids(self, name: str) -> torch.Tensor:
        """``(n,)``: the index of the call that handed this layer each token."""
        return torch.cat([torch.full((len(s),), i) for i, (_, _, s) in enumerate(self.calls[name])])

    def _check_open_page(self, impl, name: str) -> None:
        """After an append: the request's last page, if partial, is in staging, token for token."""
        k, v, slots = self.history(name)
        P = impl.codec.page_size
        last = int(slots[-1])
        block, fill = last // P, last % P + 1
        if fill == P:
            return  # the page filled: it was finalised, checked by check_pages
        mine = slots // P == block
        staged = _staged_page(impl, block)
        assert staged is not None, f"{name}: the open page of block {block} has no staging slot"
        offsets = slots[mine] % P
        assert torch.equal(offsets, torch.arange(fill)), f"{name}: block {block} was not written in order"
        want = torch.empty_like(staged[:, :, :fill])
        staging_format.store(want, (0,), k[mine].transpose(0, 1))
        staging_format.store(want, (1,), v[mine].transpose(0, 1))
        assert torch.equal(staged[0, :, :fill], want[0]), f"{name}: keys differ"
        assert torch.equal(staged[1, :, :fill], want[1]), f"{name}: values differ"
        self.staged_checks += 1

    # ------------------------------------------------------------------ pages
    def check_pages(self) -> int:
        """Assert every page the request filled equals the reference encoding of its tokens (pages whose
        block the request wrote again later — freed by a sliding window, then reused — are skipped).

        Returns the number of (layer, page) pairs compared.
        """
        compared = 0
        for name in self.calls:
            impl, cache = self.impls[name], self.caches[name]
            k, v, slots = self.history(name)
            calls = self.call_ids(name)
            fmt = "int8" if staging_format.is_compact(impl.staging) else "model"
            P = impl.codec.page_size
            positions = self.first_position + torch.arange(slots.numel())
            assert torch.equal(slots % P, positions % P), f"{name}: slots do not follow positions"
            for first in range(slots.numel()):
                if int(positions[first]) % P:
                    continue
                if first + P > slots.numel():
                    break
                run = slice(first, first + P)
                block = int(slots[first]) // P
                if bool((slots[first + P :] // P == block).any()):
                    continue  # a sliding window freed this page and vLLM handed its block out again
                one_block = torch.equal(slots[run] // P, torch.full((P,), block))
                assert one_block, f"{name}: a page spread over two blocks"
                H = k.shape[1]
                # tokens handed over before the call that completed the page waited in staging
                staged = (calls[run] < calls[first + P - 1]).view(P, 1, 1)
                kr, vr = k[run].float(), v[run].float()
                kr = torch.where(staged, staging_format.roundtrip(k[run], fmt, k.dtype), kr)
                vr = torch.where(staged, staging_format.roundtrip(v[run], fmt, v.dtype), vr)
                want = page.quantize_pages(
                    kr.transpose(0, 1),
                    vr.transpose(0, 1),
                    impl.codec.layout,
                    sink=torch.full((H,), int(positions[first]) == 0),
                    codebook=impl.codec.codebook,
                )
                got = cache[block].reshape(H, -1)
                bad = (got != want).any(-1).nonzero().flatten().tolist()
                where = f"block {block} (position {int(positions[first])})"
                assert not bad, f"{name}: the page of {where} differs in KV heads {bad}"
                compared += 1
        return compared
