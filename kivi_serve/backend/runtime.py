"""Per-engine state of the backend in one process: codec, staging pools, per-layer tensors, stats.

No vLLM import: the vLLM classes in :mod:`kivi_serve.backend.attention` hold a :class:`KiviRuntime`
and call it. One runtime exists per vLLM config object (i.e. per engine, in the process that runs
the model: with vLLM multiprocessing that is the engine-core / worker process, not the front end).

Who owns what:

- :class:`GroupState` — one per KV-cache group (one metadata builder): the
  :class:`~kivi_serve.backend.staging.StagingPool` bookkeeping and the plan id. All
  layers of a group see the same block tables, so they share one pool and execute one plan per step.
- :class:`LayerState` — one per attention layer: its staging tensor
  ``[slots, 2, Hkv, P, D]`` (model dtype), its dequant cache (CPU), the last plan it executed.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from kivi_serve.backend.ops import DequantCache, Workspace
from kivi_serve.backend.settings import KiviSettings
from kivi_serve.backend.staging import AppendPlan, PageOps, StagingPool
from kivi_serve.backend.stats import BackendStats
from kivi_serve.quant.codec import make_codec

#: Block id vLLM reserves as the null block (padding rows of block tables point at it).
NULL_BLOCK = 0


@dataclass
class HostBatch:
    """The step's batch as host lists (what the CPU executor loops over)."""

    block_tables: list[list[int]]
    seq_lens: list[int]
    query_start_loc: list[int]
    tail_slots: list[int]

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1] if self.query_start_loc else 0


@dataclass
class GroupState:
    """Staging-pool bookkeeping shared by all layers of one KV-cache group."""

    layer_names: tuple[str, ...]
    pool: StagingPool
    #: Id of the last non-empty plan (0: none yet; ids count up by one). Layers must execute every one.
    plan_id: int = 0
    steps: int = 0


@dataclass
class LayerState:
    name: str
    staging: torch.Tensor
    cache: DequantCache | None
    #: Id of the last plan this layer executed (appended).
    last_plan_id: int = 0


@dataclass
class StepPlan:
    """One step's plan for a whole batch, host side, plus its id (0: nothing to do)."""

    plan: AppendPlan
    host: HostBatch
    plan_id: int
    planned: list[int] = field(default_factory=list)


def _empty_plan(num_tokens: int, num_seqs: int) -> AppendPlan:
    return AppendPlan(
        torch.full((num_tokens,), -1, dtype=torch.int32),
        torch.zeros(num_tokens, dtype=torch.int32),
        PageOps(),
        PageOps(),
        PageOps(),
        torch.full((num_seqs,), -1, dtype=torch.int32),
    )


class KiviRuntime:
    """Everything the backend keeps for one engine in this process.

    Parameters
    ----------
    settings : KiviSettings
    head_dim, num_kv_heads : int
        Per layer (KV heads local to this tensor-parallel rank).
    dtype : torch.dtype
        Model dtype (staging pool dtype; exact pages store it too).
    device : torch.device
    max_num_seqs : int
        Sizes the staging pool (``settings.slots_for``).
    """

    def __init__(
        self,
        settings: KiviSettings,
        head_dim: int,
        num_kv_heads: int,
        dtype: torch.dtype,
        device: torch.device,
        max_num_seqs: int,
    ) -> None:
        self.settings = settings
        self.codec = make_codec(
            head_dim, settings.page_size, dtype, scheme=settings.scheme, fp_pages=settings.fp_pages
        )
        self.head_dim, self.num_kv_heads = head_dim, num_kv_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.num_slots = settings.slots_for(max_num_seqs)
        self.layers: dict[str, LayerState] = {}
        self.groups: list[GroupState] = []
        self.budget_layers: set[str] = set()
        self.lock = threading.Lock()
        #: Decode-attention scratch shared by all layers (CPU path; layers run one at a time).
        self.workspace = Workspace(self.device)

    # ------------------------------------------------------------------ sizes
    @property
    def page_size(self) -> int:
        return self.settings.page_size

    @property
    def staging_slot_bytes(self) -> int:
        """Bytes of one staging slot of one layer: ``2 * Hkv * P * D * itemsize``."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_kv_heads * self.page_size * self.head_dim * itemsize

    @property
    def staging_layer_bytes(self) -> int:
        return self.num_slots * self.staging_slot_bytes

    @property
    def staging_bytes(self) -> int:
        return sum(s.staging.numel() * s.staging.element_size() for s in self.layers.values())

    def cache_entries_per_layer(self, num_layers: int) -> int:
        if self.device.type != "cpu" or not self.settings.dequant_cache_mb:
            return 0
        entry = 2 * self.num_kv_heads * self.page_size * self.head_dim * 4
        return max(1, (self.settings.dequant_cache_mb << 20) // (max(1, num_layers) * entry))

    # ------------------------------------------------------------------ layers and groups
    def add_layer(self, name: str) -> LayerState:
        """Allocate a layer's staging tensor (zeros, so vLLM's memory accounting sees it at once)."""
        with self.lock:
            if name in self.layers:
                return self.layers[name]
            staging = torch.zeros(
                self.num_slots,
                2,
                self.num_kv_heads,
                self.page_size,
                self.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
            state = LayerState(name, staging, None)
            self.layers[name] = state
            return state

    def layer(self, name: str) -> LayerState:
        state = self.layers.get(name)
        if state is None:
            state = self.add_layer(name)
        if state.cache is None and self.device.type == "cpu" and self.settings.dequant_cache_mb:
            state.cache = DequantCache(
                self.cache_entries_per_layer(len(self.layers)),
                self.num_kv_heads,
                self.page_size,
                self.head_dim,
                self.device,
            )
        return state

    def group(self, layer_names: list[str]) -> GroupState:
        names = tuple(layer_names)
        with self.lock:
            for g in self.groups:
                if g.layer_names == names:
                    return g
            g = GroupState(names, StagingPool(self.num_slots, self.page_size))
            self.groups.append(g)
            return g

    # ------------------------------------------------------------------ planning
    def plan_step(
        self, group: GroupState, block_table: torch.Tensor, seq_lens: list[int], query_start_loc: list[int]
    ) -> StepPlan:
        """Run the group's staging pool once for this step.

        ``block_table`` is the host (B, max_pages) block table; sequences with no new tokens, or
        whose written pages point at the null block (dummy / padding rows), are left out of the
        plan: their tokens are not staged and they read nothing staged.
        """
        P = self.page_size
        B = len(seq_lens)
        rows = block_table[:B].tolist()
        tables = [row[: -(-max(L, 0) // P)] for row, L in zip(rows, seq_lens)]
        T = query_start_loc[B] if B else 0
        qlens = [query_start_loc[b + 1] - query_start_loc[b] for b in range(B)]
        keep = []
        for b in range(B):
            n, L = qlens[b], seq_lens[b]
            if n <= 0 or L <= 0 or L < n:
                continue
            if any(tables[b][i] == NULL_BLOCK for i in range((L - n) // P, (L - 1) // P + 1)):
                continue
            keep.append(b)
        group.steps += 1
        if not keep:
            plan = _empty_plan(T, B)
            return StepPlan(plan, HostBatch(tables, list(seq_lens), list(query_start_loc), [-1] * B), 0)
        sub = group.pool.plan(
            [tables[b] for b in keep], [seq_lens[b] for b in keep], [qlens[b] for b in keep]
        )
        if len(keep) == B and T == sum(qlens):
            plan = sub
        else:
            plan = self._expand(sub, keep, query_start_loc, T, B)
        group.plan_id += 1
        host = HostBatch(tables, list(seq_lens), list(query_start_loc), plan.tail_slots.tolist())
        return StepPlan(plan, host, group.plan_id, keep)

    @staticmethod
    def _expand(sub: AppendPlan, keep: list[int], qsl: list[int], T: int, B: int) -> AppendPlan:
        """Map a plan made for the ``keep`` subset back onto the whole batch's token indices."""
        glob = torch.cat([torch.arange(qsl[b], qsl[b + 1], dtype=torch.long) for b in keep])
        token_slots = torch.full((T,), -1, dtype=torch.int32)
        token_offsets = torch.zeros(T, dtype=torch.int32)
        token_slots[glob] = sub.token_slots
        token_offsets[glob] = sub.token_offsets
        fin = sub.finalize
        if len(fin):
            fin = PageOps(
                fin.blocks,
                fin.slots,
                fin.fills,
                fin.sinks,
                glob[fin.starts.long()].to(torch.int32),
                fin.prefix,
            )
        tails = torch.full((B,), -1, dtype=torch.int32)
        tails[torch.tensor(keep, dtype=torch.long)] = sub.tail_slots
        return AppendPlan(token_slots, token_offsets, sub.evict, fin, sub.reopen, tails)

    def check_slot_mapping(self, host: HostBatch, planned: list[int], slot_mapping: torch.Tensor) -> None:
        """Raise if vLLM's slot mapping disagrees with ``block_table[pos // P] * P + pos % P``.

        The backend derives every token's page from block tables and lengths; this proves that the
        derivation is the one vLLM uses (cheap on CPU; the CUDA path skips it).
        """
        P = self.page_size
        sm = slot_mapping.tolist()
        for b in planned:
            q0, q1 = host.query_start_loc[b], host.query_start_loc[b + 1]
            ctx = host.seq_lens[b] - (q1 - q0)
            table = host.block_tables[b]
            for j in range(q1 - q0):
                pos = ctx + j
                want = table[pos // P] * P + pos % P
                if sm[q0 + j] != want:
                    raise RuntimeError(
                        f"kivi-serve: vLLM slot mapping disagrees with the block table for sequence {b}, "
                        f"position {pos}: slot {sm[q0 + j]}, expected {want}. The attention backend would "
                        "write this token to the wrong page."
                    )

    # ------------------------------------------------------------------ stats
    def stats(self) -> BackendStats:
        st = [g.pool.stats for g in self.groups]
        caches = [s.cache for s in self.layers.values() if s.cache is not None]
        return BackendStats(
            active=True,
            mode=self.settings.mode,
            page_size=self.page_size,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            num_layers=len(self.layers),
            page_bytes=self.codec.page_bytes,
            slot_bytes=self.codec.slot_bytes,
            bits_per_element=float(self.codec.bits_per_element),
            compression_vs_bf16=16.0 / float(self.codec.bits_per_element),
            staging_slots_total=self.num_slots,
            staging_slots_in_use=max((s.slots_in_use for s in st), default=0),
            early_finalisations=sum(s.early_finalisations for s in st),
            reopened=sum(s.reopened for s in st),
            reclaimed=sum(s.reclaimed for s in st),
            staging_bytes=self.staging_bytes,
            dequant_cache_bytes=sum(c.nbytes for c in caches) + self.workspace.nbytes,
            steps=max((g.steps for g in self.groups), default=0),
        )


# ---------------------------------------------------------------------- process registry
_RUNTIMES: weakref.WeakValueDictionary[int, KiviRuntime] = weakref.WeakValueDictionary()
_LATEST: list = [None]  # weakref to the most recently created runtime
_REGISTRY_LOCK = threading.Lock()


def runtime_for(key: object, factory) -> KiviRuntime:
    """The runtime registered for ``key`` (a vLLM config object), created by ``factory()`` once."""
    with _REGISTRY_LOCK:
        rt = _RUNTIMES.get(id(key))
        if rt is None or getattr(rt, "_key_ref", lambda: None)() is not key:
            rt = factory()
            try:
                rt._key_ref = weakref.ref(key)
            except TypeError:
                rt._key_ref = lambda: key
            _RUNTIMES[id(key)] = rt
            _LATEST[0] = weakref.ref(rt)
        return rt


def latest_runtime() -> KiviRuntime | None:
    ref = _LATEST[0]
    return ref() if ref is not None else None


INACTIVE_STATS = BackendStats()
