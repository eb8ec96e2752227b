"""What the CPU path adds to the reference: a cache of decoded pages and batched decode.

Append, block decoding and per-sequence attention are :func:`kivi_serve.kernels.reference.append_kv`,
:func:`~kivi_serve.kernels.reference.dequantize_blocks` and
:func:`~kivi_serve.kernels.reference.attend_chunk` themselves, with the page codec as a parameter
(so full-precision debug pages run through the very same steps as the 2-bit format). This module
adds two things, for CPU speed only:

- :class:`DequantCache` (block id → decoded K/V), so a CPU decode step does not decode every page
  of every sequence in every layer again;
- batched decode: single-token chunks attended together out of that cache.

It is the CPU side of :class:`kivi_serve.backend.executors.TorchExecutor` until the C++ CPU kernels
(same signatures as the CUDA wrappers) replace it.

With :class:`~kivi_serve.quant.codec.QuantCodec` and no cache both functions produce bit-identical
results to the reference (``tests/test_backend_units.py`` checks it with ``torch.equal``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from kivi_serve.kernels import reference, semantics
from kivi_serve.kernels.semantics import LayerAttention


class DequantCache:
    """Dequantized finalised pages of one layer, in a tensor pool indexed by block id (LRU).

    ``k[e]``, ``v[e]`` (each ``(Hkv, P, D)`` fp32) hold the page of the block mapped to entry ``e``;
    entry 0 is all zeros (a filler for batched gathers). Entries are written when a page is
    finalised (the bytes were just produced, so the decoded values are exact) and filled on a miss.
    Only finalised pages are read through it, and a block vLLM hands out again is finalised again
    before it is read as a page, which overwrites its entry. At most ``max_entries`` entries
    (``2 * Hkv * P * D * 4`` bytes each); the pool grows by doubling up to that.
    """

    def __init__(
        self,
        max_entries: int,
        num_kv_heads: int,
        page_size: int,
        head_dim: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_entries = max(0, int(max_entries))
        self.shape = (num_kv_heads, page_size, head_dim)
        self.device = torch.device(device)
        self.k = torch.zeros(1, *self.shape, device=self.device)
        self.v = torch.zeros(1, *self.shape, device=self.device)
        self.block_entry: OrderedDict[int, int] = OrderedDict()
        self.free: list[int] = []
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.block_entry)

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * 4

    def _grow(self, need: int) -> None:
        cap = self.k.shape[0] - 1
        if cap >= need:
            return
        new_cap = min(self.max_entries, max(need, 2 * cap, 8))
        extra = new_cap - cap
        self.k = torch.cat([self.k, torch.zeros(extra, *self.shape, device=self.device)])
        self.v = torch.cat([self.v, torch.zeros(extra, *self.shape, device=self.device)])
        self.free.extend(range(cap + 1, new_cap + 1))

    def _entries_for(self, blocks: list[int], keep: set[int]) -> list[int] | None:
        """Entries for ``blocks`` (not yet mapped), evicting LRU entries outside ``keep``; None if full."""
        self._grow(min(self.max_entries, len(self.block_entry) + len(blocks)))
        out = []
        for blk in blocks:
            if self.free:
                e = self.free.pop()
            else:
                victim = next((b for b in self.block_entry if b not in keep), None)
                if victim is None:
                    return None
                e = self.block_entry.pop(victim)
            self.block_entry[blk] = e
            out.append(e)
        return out

    def store(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Record freshly finalised pages: k, v (F, Hkv, P, D) fp32 for ``blocks`` (F,)."""
        if not self.max_entries or not blocks:
            return
        blocks = blocks[-self.max_entries :]
        k, v = k[-len(blocks) :], v[-len(blocks) :]
        for b in blocks:
            if b in self.block_entry:
                self.free.append(self.block_entry.pop(b))
        entries = self._entries_for(blocks, set(blocks))
        if entries is None:
            return
        idx = torch.tensor(entries, dtype=torch.long, device=self.device)
        self.k[idx] = k.to(self.device)
        self.v[idx] = v.to(self.device)

    def ensure(self, blocks: list[int], pages: torch.Tensor, codec) -> list[int] | None:
        """Entry of every block in ``blocks`` (decoding the misses); None if they do not all fit."""
        if not blocks:
            return []
        uniq = list(dict.fromkeys(blocks))
        if len(uniq) > self.max_entries:
            return None
        missing = [b for b in uniq if b not in self.block_entry]
        self.hits += len(uniq) - len(missing)
        self.misses += len(missing)
        if missing:
            entries = self._entries_for(missing, set(uniq))
            if entries is None:
                return None
            raw = pages[torch.tensor(missing, dtype=torch.long, device=pages.device)]
            H = raw.shape[1]
            k, v = codec.decode(raw.reshape(len(missing) * H, -1))
            idx = torch.tensor(entries, dtype=torch.long, device=self.device)
            self.k[idx] = k.reshape(len(missing), *self.shape)
            self.v[idx] = v.reshape(len(missing), *self.shape)
        for b in uniq:
            self.block_entry.move_to_end(b)
        return [self.block_entry[b] for b in blocks]

    def lookup(self, blocks: list[int], pages: torch.Tensor, codec) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (n, Hkv, P, D) fp32, for ``blocks``."""
        entries = self.ensure(blocks, pages, codec)
        if entries is None:  # too small for this sequence: decode without caching
            raw = pages[torch.tensor(blocks, dtype=torch.long, device=pages.device)]
            k, v = codec.decode(raw.reshape(len(blocks) * raw.shape[1], -1))
            return k.reshape(len(blocks), *self.shape), v.reshape(len(blocks), *self.shape)
        idx = torch.tensor(entries, dtype=torch.long, device=self.device)
        return self.k[idx], self.v[idx]


# --------------------------------------------------------------------------- append
def append(plan, key, value, pages, staging, codec, cache: DequantCache | None = None) -> None:
    """Execute one step's :class:`~kivi_serve.backend.staging.AppendPlan` for one layer
    (:func:`kivi_serve.kernels.reference.append_kv`), then record the pages it wrote in ``cache``.

    key, value : (T, Hkv, D) · pages : (NB, Hkv, page_bytes) uint8 · staging : (S, 2, Hkv, P, D)
    """
    written = reference.append_kv(plan, key, value, pages, staging, codec)
    if cache is None or not cache.max_entries:
        return
    P, D = codec.page_size, codec.head_dim
    for blocks, q in written:
        F, H = q.shape[:2]
        kd, vd = codec.decode(q.reshape(F * H, -1))
        cache.store(blocks.tolist(), kd.reshape(F, H, P, D), vd.reshape(F, H, P, D))


def dequantize_blocks(kv_pages, blocks, codec, dtype, cache: DequantCache | None = None):
    """:func:`kivi_serve.kernels.reference.dequantize_blocks` through ``cache``.

    kv_pages : (NB, Hkv, page_bytes) · blocks : (n,) int (entries < 0 skipped: zeros) → (k, v), each
    (n, Hkv, P, D) in ``dtype``.
    """
    if cache is None or not cache.max_entries:
        return reference.dequantize_blocks(kv_pages, blocks, codec, dtype)
    pages = reference.pages_view(kv_pages, codec)
    ids = blocks.tolist()
    live = [b for b in ids if b >= 0]
    n, H = len(ids), pages.shape[1]
    k = torch.zeros(n, H, codec.page_size, codec.head_dim, dtype=dtype, device=pages.device)
    v = torch.zeros_like(k)
    if live:
        kd, vd = cache.lookup(live, pages, codec)
        at = torch.tensor([i for i, b in enumerate(ids) if b >= 0], dtype=torch.long, device=pages.device)
        k[at] = kd.to(dtype)
        v[at] = vd.to(dtype)
    return k, v


# --------------------------------------------------------------------------- attention
#: Decode batches are attended together, in groups of at most this many padded context tokens.
DECODE_GROUP_TOKENS = 1 << 15


def attend(
    query,
    key,
    value,
    pages,
    staging,
    block_tables: list[list[int]],
    seq_lens: list[int],
    query_start_loc: list[int],
    tail_slots: list[int],
    codec,
    scale: float,
    cache: DequantCache | None = None,
    workspace: Workspace | None = None,
    attn: LayerAttention | None = None,
) -> torch.Tensor:
    """Attention of a batch of new-token chunks over the paged cache (reference: ``paged_attention``).

    query : (T, Hq, D) · key, value : (T, Hkv, D) (this step's tokens, attended exactly) ·
    block_tables, seq_lens, query_start_loc (B + 1), tail_slots : host lists · attn : the layer's
    window / soft-cap / sinks (pages before a window are not read).
    Returns (T, Hq, D) in the dtype of ``query``; the math is fp32.

    Chunks of several tokens (prefill) are attended one sequence at a time, with the reference's
    operations (bit-identical). With a ``cache``, single-token chunks (decode) are attended in
    batches: context pages gathered from the cache pool and the staging pool, padded and masked.
    That changes only the fp32 summation order (the unit tests bound the difference).
    """
    T, Hq, D = query.shape
    out = torch.empty(T, Hq, D, dtype=torch.float32, device=query.device)

    def one(b: int) -> None:
        q0, q1 = query_start_loc[b], query_start_loc[b + 1]
        _attend_one(
            out, query, key, value, pages, staging, block_tables[b], seq_lens[b], q0, q1, tail_slots[b],
            codec, scale, cache, attn,
        )  # fmt: skip

    single = []
    for b in range(len(seq_lens)):
        n_new, seq_len = query_start_loc[b + 1] - query_start_loc[b], seq_lens[b]
        if n_new <= 0:
            continue
        if seq_len < n_new:
            raise ValueError(f"sequence {b}: seq_len {seq_len} is shorter than its {n_new} new tokens")
        if n_new == 1 and cache is not None:
            single.append(b)
        else:
            one(b)
    if single:
        left = _attend_decode(
            out,
            query,
            key,
            value,
            pages,
            staging,
            block_tables,
            seq_lens,
            query_start_loc,
            tail_slots,
            codec,
            scale,
            cache,
            single,
            workspace,
            attn,
        )
        for b in left:
            one(b)
    return out.to(query.dtype)


def _attend_one(
    out, query, key, value, pages, staging, block_table, seq_len, q0, q1, tail_slot, codec, scale, cache, attn
) -> None:
    """One sequence, exactly the reference's operations (context pages read through ``cache``)."""
    ctx = seq_len - (q1 - q0)
    first = semantics.first_visible(attn, ctx) // codec.page_size
    read = None if cache is None else (lambda blocks: cache.lookup(blocks, pages, codec))
    ck, cv = reference.gather_context(
        pages, staging, block_table, ctx, seq_len, tail_slot, codec, read, first_page=first
    )
    out[q0:q1] = reference.attend_chunk(
        query[q0:q1], key[q0:q1], value[q0:q1], ck, cv, scale, attn=attn, ctx_start=first * codec.page_size
    )


class Workspace:
    """A growable flat fp32 buffer reused by every layer's decode attention (layers run one after
    another), so a step allocates no large temporaries."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.buf = torch.empty(0, device=self.device)

    def take(self, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        if sum(sizes) > self.buf.numel():
            self.buf = torch.empty(max(sum(sizes), 2 * self.buf.numel()), device=self.device)
        out, o = [], 0
        for shape, n in zip(shapes, sizes):
            out.append(self.buf[o : o + n].view(shape))
            o += n
        return out

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * 4


def _attend_decode(
    out,
    query,
    key,
    value,
    pages,
    staging,
    block_tables,
    seq_lens,
    qsl,
    tail_slots,
    codec,
    scale,
    cache: DequantCache,
    seqs: list[int],
    workspace: Workspace | None = None,
    attn: LayerAttention | None = None,
) -> list[int]:
    """Batched attention of single-token chunks; returns the sequences it could not serve from the cache.

    Per group of sequences: one ``index_select`` of the context pages out of the cache pool, laid
    out ``(seq, kv_head, page, token, D)`` so that each (sequence, head) is one contiguous
    ``(pages * P, D)`` matrix; the staged tails copied in; then batched matmuls. With a sliding
    window a sequence's pages start at its window's first page (earlier ones are never read).
    """
    P = codec.page_size
    Hq, D = query.shape[1:]
    Hkv = key.shape[1]
    G = Hq // Hkv
    dev = query.device
    ws = workspace or Workspace(dev)
    info = []  # (b, ctx, pages read, full pages read, staged, first page)
    for b in seqs:
        seq_len = seq_lens[b]
        ctx = seq_len - 1
        n_pages = -(-ctx // P)
        first = min(semantics.first_visible(attn, ctx) // P, n_pages)
        staged = n_pages > first and n_pages * P > seq_len and tail_slots[b] >= 0
        n_read = n_pages - first
        info.append((b, ctx, n_read, n_read - 1 if staged else n_read, staged, first))
    info.sort(key=lambda x: x[2])
    left: list[int] = []
    i = 0
    while i < len(info):
        j = i + 1
        while j < len(info) and (j + 1 - i) * max(info[j][2], 1) * P <= DECODE_GROUP_TOKENS:
            j += 1
        group = info[i:j]
        i = j
        blocks = [int(blk) for (b, _, _, nq, _, f) in group for blk in block_tables[b][f : f + nq]]
        entries = cache.ensure(blocks, pages, codec)
        if entries is None:
            left.extend(g[0] for g in group)
            continue
        n = len(group)
        maxp = max(max(g[2] for g in group), 1)
        L = maxp * P
        # index into cache.k viewed as (entries * Hkv, P, D), in (seq, head, page) order
        ent = torch.zeros(n, maxp, dtype=torch.long)
        pos = 0
        st_rows, st_pages, st_slots = [], [], []
        for r, (b, _ctx, n_read, nq, staged, _f) in enumerate(group):
            if nq:
                ent[r, :nq] = torch.tensor(entries[pos : pos + nq])
                pos += nq
            if staged:
                st_rows.append(r)
                st_pages.append(n_read - 1)
                st_slots.append(tail_slots[b])
        idx = (ent.unsqueeze(1) * Hkv + torch.arange(Hkv).view(1, Hkv, 1)).reshape(-1).to(cache.device)
        K, V = ws.take((n, Hkv, maxp, P, D), (n, Hkv, maxp, P, D))
        torch.index_select(cache.k.view(-1, P, D), 0, idx, out=K.view(-1, P, D))
        torch.index_select(cache.v.view(-1, P, D), 0, idx, out=V.view(-1, P, D))
        if st_rows:
            rr, pp = torch.tensor(st_rows), torch.tensor(st_pages)
            sl = torch.tensor(st_slots, dtype=torch.long, device=staging.device)
            K[rr, :, pp] = staging[sl, 0].float()
            V[rr, :, pp] = staging[sl, 1].float()
        K, V = K.view(n * Hkv, L, D), V.view(n * Hkv, L, D)
        rows = torch.tensor([qsl[g[0]] for g in group], dtype=torch.long, device=dev)
        q = query[rows].float().reshape(n * Hkv, G, D)
        kn = key[rows].float().reshape(n * Hkv, D, 1)
        vn = value[rows].float().reshape(n * Hkv, 1, D)
        s_ctx = semantics.cap_scores(attn, torch.bmm(q, K.transpose(1, 2)).mul_(scale))  # (n*Hkv, G, L)
        # column l of row r holds position first_r * P + l: visible if < ctx and inside the window
        ctxs = torch.tensor([g[1] for g in group], device=dev)
        starts = torch.tensor([g[5] * P for g in group], device=dev)
        at = starts.unsqueeze(1) + torch.arange(L, device=dev).unsqueeze(0)
        lo = torch.tensor([semantics.first_visible(attn, g[1]) for g in group], device=dev)
        pad = ((at >= ctxs.unsqueeze(1)) | (at < lo.unsqueeze(1))).repeat_interleave(Hkv, 0)
        s_ctx.masked_fill_(pad.unsqueeze(1), -torch.inf)
        s_new = semantics.cap_scores(attn, torch.bmm(q, kn).mul_(scale))  # (n*Hkv, G, 1)
        sink = None
        if attn is not None and attn.sinks is not None:
            sink = attn.sinks.float().reshape(1, Hkv, G).expand(n, Hkv, G).reshape(n * Hkv, G)
        p = semantics.softmax(attn, torch.cat([s_ctx, s_new], -1), sink)
        o = torch.bmm(p[..., :L], V).add_(p[..., L:] * vn)  # (n*Hkv, G, D)
        out[rows] = o.reshape(n, Hq, D)
    return left
