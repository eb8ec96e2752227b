"""Per-engine state of the backend in one process: settings, codec, staging pools, stats.

No vLLM import: the vLLM classes in :mod:`kivi_serve.backend.attention` hold a :class:`KiviRuntime`
and call it. One runtime exists per vLLM config object (i.e. per engine, in the process that runs
the model: with vLLM multiprocessing that is the engine-core / worker process, not the front end).

Who owns what:

- :class:`GroupState` — one per KV-cache group (one metadata builder): the
  :class:`~kivi_serve.backend.planner.DeviceStagingPool` (state on the model's device) and the plan
  id. All layers of a group see the same block tables, so they share one pool and execute one plan
  per step.
- each :class:`~kivi_serve.backend.attention.KiviAttentionImpl` (one per attention layer) owns its
  staging tensor ``[slots, 2, Hkv, P, W]`` (:mod:`kivi_serve.quant.staging`: int8 rows by default)
  and the id
  of the last plan it executed; the runtime only keeps a weak list of them for the stats.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from kivi_serve.backend.planner import DeviceStagingPool
from kivi_serve.backend.settings import KiviSettings
from kivi_serve.backend.stats import BackendStats
from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.codec import make_codec


@dataclass
class GroupState:
    """The staging pool shared by all layers of one KV-cache group."""

    layer_names: tuple[str, ...]
    pool: DeviceStagingPool
    #: Id of the last non-empty plan (0: none yet; ids count up by one). Layers execute every one.
    plan_id: int = 0
    steps: int = 0


class KiviRuntime:
    """Everything the backend keeps for one engine in this process.

    Parameters
    ----------
    settings : KiviSettings
    head_dim, num_kv_heads : int
        Per layer (KV heads local to this tensor-parallel rank).
    dtype : torch.dtype
        Model dtype (staging pool dtype; fp pages store it too).
    device : torch.device
    max_num_seqs, max_num_batched_tokens : int
        The scheduler's limits: size the staging pool (``settings.slots_for``) and the planner's buffers.
    """

    def __init__(
        self,
        settings: KiviSettings,
        head_dim: int,
        num_kv_heads: int,
        dtype: torch.dtype,
        device: torch.device,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.settings = settings
        self.codec = make_codec(
            head_dim, settings.page_size, dtype, scheme=settings.scheme, fp_pages=settings.fp_pages
        )
        self.head_dim, self.num_kv_heads = head_dim, num_kv_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.num_slots = settings.slots_for(max_num_seqs)
        self.max_num_seqs = int(max_num_seqs)
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.groups: list[GroupState] = []
        self.layers: weakref.WeakSet = weakref.WeakSet()
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ sizes
    @property
    def page_size(self) -> int:
        return self.settings.page_size

    @property
    def staging_slot_bytes(self) -> int:
        """Bytes of one staging slot of one layer: ``2 * Hkv * P * W * itemsize``."""
        return staging_format.slot_bytes(
            self.settings.staging_format, self.head_dim, self.page_size, self.num_kv_heads, self.dtype
        )

    # ------------------------------------------------------------------ layers and groups
    def new_staging(self) -> torch.Tensor:
        """A layer's staging tensor (zeros, so vLLM's memory accounting sees it at once)."""
        from kivi_serve.backend.planner import device_state

        return device_state(
            staging_format.new_staging(
                self.num_slots, self.num_kv_heads, self.page_size, self.head_dim, self.dtype,
                self.settings.staging_format, self.device,
            )  # fmt: skip
        )

    def add_layer(self, impl) -> None:
        self.layers.add(impl)

    def group(self, layer_names: list[str]) -> GroupState:
        names = tuple(layer_names)
        with self.lock:
            for g in self.groups:
                if g.layer_names == names:
                    return g
            pool = DeviceStagingPool(
                self.num_slots, self.page_size, self.device, self.max_num_batched_tokens, self.max_num_seqs
            )
            g = GroupState(names, pool)
            self.groups.append(g)
            return g

    # ------------------------------------------------------------------ between steps
    def release_finished(self, live_blocks: dict[tuple[str, ...], list[int]]) -> None:
        """Free the staging slots of finished (and preempted) requests.

        ``live_blocks``: per KV-cache group (its layer names), every block a live request holds. A slot
        whose block is not among them belongs to a request vLLM has let go of: its page is dropped.
        """
        for g in self.groups:
            blocks = live_blocks.get(g.layer_names)
            if blocks is not None:
                g.pool.release(torch.tensor(sorted(set(blocks)), dtype=torch.int32))

    # ------------------------------------------------------------------ stats
    def stats(self) -> BackendStats:
        """This engine's numbers; the pool's state and counters are read from the device."""
        snaps = [g.pool.snapshot() for g in self.groups]
        layers = list(self.layers)
        return BackendStats(
            active=True,
            mode=self.settings.mode,
            page_size=self.page_size,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            num_layers=len(layers),
            page_bytes=self.codec.page_bytes,
            slot_bytes=self.codec.slot_bytes,
            bits_per_element=float(self.codec.bits_per_element),
            compression_vs_bf16=16.0 / float(self.codec.bits_per_element),
            staging_slots_total=self.num_slots,
            staging_slots_in_use=max((s["slots_in_use"] for s in snaps), default=0),
            early_finalisations=sum(s["early_finalisations"] for s in snaps),
            reopened=sum(s["reopened"] for s in snaps),
            reclaimed=sum(s["reclaimed"] for s in snaps),
            staging_bytes=sum(impl.staging.numel() * impl.staging.element_size() for impl in layers),
            steps=max((g.steps for g in self.groups), default=0),
        )


def live_blocks(model_runner) -> dict[tuple[str, ...], list[int]] | None:
    """Every block a live request holds, per KV-cache group (its layer names), from vLLM's model runner.

    Read between steps (never during one). vLLM 0.32 keeps a request's state in the runner until the
    step after it finished — the engine core steps once more whenever the scheduler has finished
    requests to report (``Scheduler.has_finished_requests``), and the runner drops them from
    ``scheduler_output.finished_req_ids`` then — so after the last request the runner holds none.
    Model runner V1 (CPU, and GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``) keeps each request's block ids
    on the host (``requests[id].block_ids``); V2 (the GPU default) keeps them in its device block
    table, rows ``req_states.req_id_to_index``. None for a runner of another shape.
    """
    cfg = getattr(model_runner, "kv_cache_config", None)
    if cfg is None:
        return None
    groups = [tuple(g.layer_names) for g in cfg.kv_cache_groups]
    out: dict[tuple[str, ...], list[int]] = {g: [] for g in groups}
    requests = getattr(model_runner, "requests", None)
    if isinstance(requests, dict):  # V1
        for state in requests.values():
            for g, ids in zip(groups, state.block_ids):
                out[g].extend(ids)
        return out
    states, tables = getattr(model_runner, "req_states", None), getattr(model_runner, "block_tables", None)
    if states is not None and tables is not None:  # V2
        rows = sorted(states.req_id_to_index.values())
        for i, g in enumerate(groups):
            counts = tables.num_blocks.np[i]
            table = tables.block_tables[i].gpu[rows].cpu().tolist() if rows else []
            for r, ids in zip(rows, table):
                out[g].extend(ids[: int(counts[r])])
        return out
    return None


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


def runtime_of(key: object) -> KiviRuntime | None:
    """The runtime of ``key``'s engine in this process, if it has one (no creation)."""
    with _REGISTRY_LOCK:
        rt = _RUNTIMES.get(id(key))
        if rt is not None and getattr(rt, "_key_ref", lambda: None)() is key:
            return rt
        return None


def latest_runtime() -> KiviRuntime | None:
    ref = _LATEST[0]
    return ref() if ref is not None else None


def sizing_settings() -> KiviSettings | None:
    """Settings of the engine whose KV cache vLLM is sizing, when vLLM asks a class method of the
    backend without the engine's config current (``customize_spec`` runs so).

    That is the engine whose runtime exists but has no metadata builder yet (builders come after the
    KV cache is sized); if no engine is at that stage, every live engine is a candidate. The
    candidates must agree; two engines with different page formats being set up at once in one
    process is refused with a clear error rather than guessed.
    """
    with _REGISTRY_LOCK:
        live = list(_RUNTIMES.values())
    pending = [rt for rt in live if not rt.groups]
    candidates = {rt.settings for rt in (pending or live)}
    if not candidates:
        return None
    if len(candidates) > 1:
        raise RuntimeError(
            "kivi-serve: vLLM asked for the KV cache spec without an engine config, and several "
            "kivi-serve engines with different settings are being set up in this process "
            f"({sorted(map(str, candidates))}); set them up one after another"
        )
    return next(iter(candidates))


INACTIVE_STATS = BackendStats()
