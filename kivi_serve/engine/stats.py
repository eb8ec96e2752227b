"""The latest scheduler numbers vLLM reports (running, waiting, KV usage, preemptions).

vLLM sends ``SchedulerStats`` with the outputs of every engine step to its stat loggers in the
front-end process; :class:`SchedulerRecorder` is one more such logger that keeps the last values
for :meth:`kivi_serve.engine.adapter.Engine.cache_facts`. A step that runs after the last request
finished reports ``running == 0``; an abort does not run a step (see
``Engine.scheduler_snapshot`` for what the adapter makes of that).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class SchedulerSnapshot:
    """vLLM's scheduler as of its last report (``updated``, monotonic seconds); preemptions add up."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    preemptions: int = 0
    updated: float = field(default_factory=time.monotonic)


class SchedulerRecorder:
    """A per-engine vLLM stat logger that only remembers the newest scheduler stats.

    It has the methods of ``vllm.v1.metrics.loggers.StatLoggerBase`` without subclassing it, so that
    importing this module does not import vLLM (the server opens its port before vLLM is loaded).
    """

    def __init__(self, vllm_config, engine_index: int = 0, sink: SchedulerSnapshot | None = None):
        self.engine_index = engine_index
        self.snapshot = sink if sink is not None else SchedulerSnapshot()
        self._lock = threading.Lock()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        with self._lock:
            snap = self.snapshot
            if scheduler_stats is not None:
                snap.running = int(scheduler_stats.num_running_reqs)
                snap.waiting = int(scheduler_stats.num_waiting_reqs) + int(
                    getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
                )
                snap.kv_usage = float(scheduler_stats.kv_cache_usage)
                snap.updated = time.monotonic()
            if iteration_stats is not None:
                snap.preemptions += int(getattr(iteration_stats, "num_preempted_reqs", 0))

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


def recorder_factory(sink: SchedulerSnapshot):
    """A per-engine stat-logger factory (vLLM calls it as ``factory(vllm_config, engine_index)``)."""

    def make(vllm_config, engine_index: int = 0) -> SchedulerRecorder:
        return SchedulerRecorder(vllm_config, engine_index, sink)

    return make
