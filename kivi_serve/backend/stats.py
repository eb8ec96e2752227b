"""What the backend reports about itself: one typed record, from the runtime to the server's metrics.

No vLLM or torch import: the engine adapter and the server read these in the front-end process.
With vLLM multiprocessing the backend runs in the engine-core / worker processes, so each worker
sends :meth:`BackendStats.as_dict` over ``collective_rpc`` (msgpack carries plain dicts) and the
adapter folds the answers back with :meth:`BackendStats.merged`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class BackendStats:
    """Live numbers of one kivi-serve engine's backend in one process (the defaults: no engine).

    Sizes are per process: with tensor parallelism each worker holds its share of the KV heads,
    and :meth:`merge` adds up what adds up.
    """

    active: bool = False  # a kivi-serve engine exists in this process
    mode: str | None = None  # "quantized" or "fp_pages" (full-precision debug pages)
    page_size: int = 0  # tokens per page (= vLLM block size)
    head_dim: int = 0
    num_kv_heads: int = 0  # KV heads in this process
    num_layers: int = 0
    page_bytes: int = 0  # one page of one layer and one KV head
    slot_bytes: int = 0  # C: bytes per token slot of one layer and one KV head
    bits_per_element: float = 0.0  # of the page format, all metadata included
    compression_vs_bf16: float = 0.0  # of the page format alone (no staging)
    staging_slots_total: int = 0
    staging_slots_in_use: int = 0
    early_finalisations: int = 0  # cumulative: pages quantized early because the pool ran out
    reopened: int = 0  # cumulative: early-finalised pages re-opened into a slot
    reclaimed: int = 0  # cumulative: slots taken back from freed blocks
    staging_bytes: int = 0  # the staging pool (int8 rows by default), all layers
    steps: int = 0  # metadata-builder calls

    #: Fields that add up over tensor-parallel workers (the rest are the same in every worker).
    SUMMED = (
        "staging_slots_total",
        "staging_slots_in_use",
        "early_finalisations",
        "reopened",
        "reclaimed",
        "staging_bytes",
    )

    def merge(self, other: BackendStats) -> BackendStats:
        """These stats and another worker's of the same engine, summed where it adds up."""
        if not other.active:
            return self
        if not self.active:
            return other
        return replace(self, **{name: getattr(self, name) + getattr(other, name) for name in self.SUMMED})

    @classmethod
    def merged(cls, answers: Iterable[BackendStats | dict[str, Any]]) -> BackendStats:
        """One record from every worker's answer (a :class:`BackendStats` or its :meth:`as_dict`)."""
        out = cls()
        for answer in answers:
            out = out.merge(answer if isinstance(answer, cls) else cls(**answer))
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
