"""Prometheus metrics: our ``kivi_*`` series next to vLLM's own ``vllm:*`` series on one /metrics.

The names are a contract with the Grafana dashboard (deploy/): change them only together.
What the engine reports (:class:`CacheFacts`, read at scrape time) is ``kivi_engine_ready``,
``kivi_backend_info{backend,attention_impl,kv_cache_dtype,model,page_size}``,
``kivi_kv_cache_bytes{state=total|used|free}`` and the series of :data:`FACT_GAUGES` and
:data:`FACT_COUNTERS`; what the server observes is in :class:`ServerMetrics`: requests by route and
status, TTFT / TPOT / end-to-end histograms, prompt and generated tokens, sequences in flight.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kivi_serve.engine.types import CacheFacts

log = logging.getLogger("kivi_serve.server")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
#: Routes that get their own label value; anything else is "other" (bounded cardinality).
KNOWN_ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/ready",
    "/version",
    "/metrics",
    "/docs",
    "/openapi.json",
)


#: Series read from one :class:`CacheFacts` field each: name → (field, help).
FACT_GAUGES = {
    "kivi_kv_capacity_tokens": ("capacity_tokens", "Tokens the engine's KV blocks can hold"),
    "kivi_kv_bits_per_element": (
        "bits_per_element",
        "Effective bits per cached K/V element, staging included",
    ),
    "kivi_kv_page_bits_per_element": (
        "page_bits_per_element",
        "Bits per K/V element of the page format alone",
    ),
    "kivi_kv_compression_ratio": (
        "compression_vs_bf16",
        "bf16 KV bytes / actual KV bytes for the same token capacity",
    ),
    "kivi_kv_blocks": ("num_blocks", "vLLM KV cache blocks"),
    "kivi_kv_page_bytes": ("page_bytes", "Bytes of one KV page (one layer, one KV head)"),
    "kivi_kv_usage_ratio": ("kv_usage", "vLLM's fraction of KV blocks in use"),
    "kivi_staging_slots_in_use": ("staging_slots_in_use", "Staging slots holding an open page"),
    "kivi_staging_slots_total": ("staging_slots_total", "Staging pool size in slots"),
    "kivi_requests_running": ("running", "Requests running in vLLM's scheduler"),
    "kivi_requests_waiting": ("waiting", "Requests waiting in vLLM's scheduler"),
    "kivi_scheduler_stats_age_seconds": ("stats_age_s", "Seconds since vLLM's last scheduler report"),
}
FACT_COUNTERS = {  # names without the _total the exposition adds
    "kivi_early_finalisations": (
        "early_finalisations",
        "Pages quantized early because the staging pool ran out",
    ),
    "kivi_staging_reopened": ("reopened", "Early-finalised pages re-opened into a staging slot"),
    "kivi_staging_reclaimed": ("reclaimed", "Staging slots taken back from freed blocks"),
    "kivi_preemptions": ("preemptions", "Requests preempted by vLLM's scheduler"),
}


def route_label(path: str) -> str:
    return path if path in KNOWN_ROUTES else "other"


class _EngineCollector:
    """Gauges read from the engine's latest :class:`CacheFacts` at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        ready = GaugeMetricFamily("kivi_engine_ready", "1 when the engine serves requests, else 0")
        ready.add_metric([], 1.0 if m.engine_ready else 0.0)
        yield ready
        facts = m.facts
        if facts is None:
            return
        info = GaugeMetricFamily(
            "kivi_backend_info",
            "The KV cache backend that runs (value 1)",
            labels=["backend", "attention_impl", "kv_cache_dtype", "model", "page_size"],
        )
        info.add_metric(
            [facts.backend, facts.attention_impl, facts.kv_cache_dtype, m.model_name, str(facts.page_size)],
            1.0,
        )
        yield info
        kv = GaugeMetricFamily(
            "kivi_kv_cache_bytes", "KV cache bytes (pages + staging pool)", labels=["state"]
        )
        kv.add_metric(["total"], facts.kv_bytes_total)
        kv.add_metric(["used"], facts.kv_bytes_used)
        kv.add_metric(["free"], facts.kv_bytes_free)
        yield kv
        for families, kind in ((FACT_GAUGES, GaugeMetricFamily), (FACT_COUNTERS, CounterMetricFamily)):
            for name, (attr, doc) in families.items():
                family = kind(name, doc)
                family.add_metric([], float(getattr(facts, attr)))
                yield family


class ServerMetrics:
    """Our series in their own registry; :meth:`render` appends vLLM's registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kivi_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "kivi_request_ttft_seconds",
            "Time to first token (arrival to first token)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "kivi_request_tpot_seconds",
            "Time per output token after the first",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kivi_request_e2e_seconds", "Arrival to last token", buckets=E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("kivi_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter(
            "kivi_generation_tokens", "Generated tokens of served requests", registry=r
        )
        self.inflight = Gauge(
            "kivi_requests_inflight", "Sequences admitted by the server, not finished", registry=r
        )
        self.facts: CacheFacts | None = None
        self.engine_ready = False
        self.model_name = ""
        r.register(_EngineCollector(self))

    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route_label(route), status=str(status)).inc()

    def observe_generation(
        self, ttft: float | None, e2e: float, completion_tokens: int, prompt_tokens: int, tpot: float | None
    ) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.e2e.observe(e2e)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    async def refresh(self, engine: Any, timeout: float = 15.0) -> None:
        """Read the engine's cache facts (an RPC to its process) before a scrape."""
        self.engine_ready = bool(engine is not None and engine.ready)
        if not self.engine_ready:
            return
        self.model_name = engine.model_name
        try:
            self.facts = await asyncio.wait_for(engine.cache_facts(), timeout)
        except Exception as exc:  # a scrape must not fail because the engine is busy or going away
            log.warning("could not read engine cache facts: %s", exc)

    def render(self, vllm_registry: Any = None) -> bytes:
        out = generate_latest(self.registry)
        if vllm_registry is not None:
            out += generate_latest(vllm_registry)
        return out
