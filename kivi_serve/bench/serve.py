"""``kivi-serve bench serve``: our backend vs vLLM's default backend, over HTTP on loopback.

For each backend, a real ``kivi-serve serve`` subprocess on 127.0.0.1 with the same model and
settings (only ``--backend`` differs):

1. **latency / throughput**: at each concurrency level, that many clients stream completions of a
   fixed prompt length and output length (``ignore_eos``, greedy); per request TTFT (arrival → first
   token) and TPOT ((last − first token) / (tokens − 1)) as the client sees them; output tokens/s =
   all generated tokens / wall time of the level. p50/p99 over the level's requests.
2. **capacity**: the most concurrent requests of ``--capacity-request-tokens`` tokens each backend
   holds in a KV budget of ``--capacity-kv-space`` GiB without preemption. The engine's real block
   count gives how many fit (``blocks // pages_per_request``). vLLM's default backend: its blocks do
   not depend on ``max_num_seqs``, so the server runs with ``--capacity-max-num-seqs``. Ours: its
   full-precision staging pool (``max_num_seqs + 4`` slots) comes out of the same budget, so a probe
   server (``max_num_seqs`` 1, no requests) measures the block and slot costs and the real server runs
   with the largest ``max_num_seqs`` (at most ``--capacity-max-num-seqs``) whose blocks still hold
   that many requests. Then (unless ``--no-capacity-run``) that many requests (prompt +
   ``--capacity-generate`` tokens) are sent at once; a request *holds* its tokens from its first
   generated token to its last. "Held without preemption" is the peak number held at once when the
   run completed and vLLM preempted nothing.

Bounded: fixed request counts, a timeout per phase; results as JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kivi_serve.bench.server_process import ServerProcess, http, parse_metrics

DEFAULT_OUT = Path("docs/bench/serve")


def _metrics(url: str) -> dict[str, float]:
    status, _, body = http("GET", url + "/metrics", timeout=30)
    return parse_metrics(body.decode()) if status == 200 else {}


# ---------------------------------------------------------------------------------------- clients
def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    return float(np.percentile(values, q)) if values else None


@contextlib.asynccontextmanager
async def _completion_stream(client, url: str, prompt: list[int], max_tokens: int, usage: bool = False):
    """A streamed greedy completion of exactly ``max_tokens`` tokens; yields its lines."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        yield resp.aiter_lines()


async def _stream_one(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with _completion_stream(client, url, prompt, max_tokens, usage=True) as lines:
        async for line in lines:
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0]["text"]:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
    ttft = None if first is None else first - t0
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return {"ttft": ttft, "tpot": tpot, "e2e": time.perf_counter() - t0, "tokens": tokens}


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Distinct token-id prompts of exactly ``length`` tokens (distinct first token: no prefix sharing)."""
    import random

    rng = random.Random(seed)
    return [[1000 + i] + [rng.randrange(2000, 40000) for _ in range(length - 1)] for i in range(count)]


async def _level(
    url: str,
    concurrency: int,
    requests: int,
    prompt_tokens: int,
    output_tokens: int,
    timeout: float,
    seed: int,
) -> dict:
    import httpx

    prompts = _prompts(requests, prompt_tokens, seed)
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict] = []

    async def worker(client) -> None:
        while not queue.empty():
            p = queue.get_nowait()
            results.append(await _stream_one(client, url, p, output_tokens))

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), timeout)
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    e2e = [r["e2e"] for r in results]
    total = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "wall_s": wall,
        "generated_tokens": total,
        "output_tokens_per_s": total / wall,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "tpot_p50_s": _percentile(tpot, 50),
        "tpot_p99_s": _percentile(tpot, 99),
        "e2e_p50_s": _percentile(e2e, 50),
    }


async def _capacity_run(
    url: str, count: int, request_tokens: int, gen: int, timeout: float, seed: int
) -> dict:
    """Send ``count`` requests of ``request_tokens`` tokens (prompt + ``gen`` generated) at once.

    A request *holds* its tokens from its first generated token (its whole prompt is in the cache)
    to its last; ``gen`` is long enough that the first requests still decode while the last ones
    finish their prefill. Reports the peak number held at once (client side) and the preemptions
    vLLM counted meanwhile; on timeout, what was reached so far (``completed: false``).
    """
    import httpx

    prompts = _prompts(count, request_tokens - gen, seed)
    before = _metrics(url)
    state = {"holding": 0, "peak": 0, "finished": 0}

    async def one(client, p) -> None:
        started = False
        try:
            async with _completion_stream(client, url, p, gen) as lines:
                async for line in lines:
                    if not started and line.startswith("data: {"):
                        started = True
                        state["holding"] += 1
                        state["peak"] = max(state["peak"], state["holding"])
            state["finished"] += 1
        finally:
            if started:
                state["holding"] -= 1

    t0 = time.perf_counter()
    completed = True
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=count + 2)) as client:
        try:
            await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), timeout)
        except asyncio.TimeoutError:
            completed = False
    after = _metrics(url)
    preempted = None
    for key in ("kivi_preemptions_total", "vllm:num_preemptions_total"):
        if key in before and key in after:
            preempted = int(after[key] - before[key])
            break
    return {
        "sent": count,
        "request_tokens": request_tokens,
        "generated_per_request": gen,
        "completed": completed,
        "finished": state["finished"],
        "peak_held": state["peak"],
        "preemptions": preempted,
        "wall_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------- main
def _facts(url: str) -> dict:
    m = _metrics(url)
    status, _, body = http("GET", url + "/version", timeout=30)
    engine = (json.loads(body).get("engine") or {}) if status == 200 else {}
    return {
        "attention_impl": engine.get("attention_impl"),
        "kv_cache_dtype": engine.get("kv_cache_dtype"),
        "num_blocks": int(m.get("kivi_kv_blocks", 0)),
        "page_size": engine.get("page_size"),
        "capacity_tokens": int(m.get("kivi_kv_capacity_tokens", 0)),
        "kv_bytes_total": int(m.get('kivi_kv_cache_bytes{state="total"}', 0)),
        "bits_per_element": m.get("kivi_kv_bits_per_element"),
        "compression_vs_bf16": m.get("kivi_kv_compression_ratio"),
        "staging_slots_total": int(m.get("kivi_staging_slots_total", 0)),
        "page_bytes": int(m.get("kivi_kv_page_bytes", 0)),
        "max_num_seqs": engine.get("max_num_seqs"),
    }


def _layer_heads(model: str) -> int | None:
    """layers x KV heads of the model (from its config.json), or None when unknown."""
    try:
        from kivi_serve.model.prepare import resolve_model

        cfg = json.loads((resolve_model(model) / "config.json").read_text())
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return int(cfg["num_hidden_layers"]) * int(heads)
    except Exception:  # a model folder we cannot read: no staging-aware sizing
        return None


def best_max_num_seqs(
    probe: dict, probe_seqs: int, budget_bytes: float, pages_per_request: int, layer_heads: int, limit: int
) -> int:
    """The largest ``max_num_seqs`` ≤ ``limit`` whose KV blocks still hold that many requests.

    From a probe server's facts (run with ``probe_seqs``): one block costs ``layer_heads`` pages, the
    staging pool is the rest of the KV bytes, one slot costs ``staging / slots`` and the pool has
    ``slots - probe_seqs`` spare slots; each extra sequence takes one slot out of the budget. Returns
    0 when not even one request fits.
    """
    block_bytes = layer_heads * probe["page_bytes"]
    slots = probe["staging_slots_total"]
    staging = probe["kv_bytes_total"] - probe["num_blocks"] * block_bytes
    slot_bytes = staging / slots if slots else 0.0
    headroom = slots - probe_seqs
    for seqs in range(limit, 0, -1):
        blocks = math.floor((budget_bytes - (seqs + headroom) * slot_bytes) / block_bytes)
        if blocks // pages_per_request >= seqs:
            return seqs
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kivi-serve bench serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="model folder or 'smollm2'")
    p.add_argument("--backends", default="kivi,default", help="comma-separated: kivi, default")
    p.add_argument(
        "--page-size", type=int, default=None, help="tokens per page (default: the scheme's, else 128)"
    )
    p.add_argument("--scheme", default=None, help="kivi backend: the page format (default: the server's)")
    p.add_argument(
        "--kv-cache-space", type=float, default=1.0, help="GiB of KV cache (CPU) for the latency runs"
    )
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--concurrency", default="1,8", help="comma-separated concurrency levels")
    p.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per level, at least one per stream (default: 2 x concurrency, >= 4)",
    )
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument(
        "--capacity-kv-space", type=float, default=0.5, help="GiB of KV cache for the capacity run"
    )
    p.add_argument("--capacity-max-num-seqs", type=int, default=64)
    p.add_argument("--capacity-request-tokens", type=int, default=2048)
    p.add_argument(
        "--capacity-generate",
        type=int,
        default=64,
        help="tokens each capacity request generates (its prompt is the rest)",
    )
    p.add_argument(
        "--no-capacity-run", action="store_true", help="only read the block count (no 2K-token requests sent)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per phase")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="GPU: passed to the server")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", default="latency,capacity", help="comma-separated: latency, capacity")
    return p


def _server_args(a, backend: str, kv_space: float, max_num_seqs: int, max_model_len: int) -> list[str]:
    flags = {
        "--model": a.model,
        "--backend": backend,
        "--page-size": a.page_size,
        "--scheme": a.scheme if backend == "kivi" else None,
        "--kv-cache-space": kv_space,
        "--max-num-seqs": max_num_seqs,
        "--max-model-len": max_model_len,
        "--max-queue": 4096,
        "--request-timeout": a.timeout,
        "--max-tokens-limit": max_model_len,
        "--gpu-memory-utilization": a.gpu_memory_utilization,  # GPU only: None leaves it out
    }
    # --no-access-log: one line per request adds up
    return ["--no-access-log", *(x for k, v in flags.items() if v is not None for x in (k, str(v)))]


def _tree(root) -> list:
    """A psutil process and its live descendants (a vLLM server is an API process, an engine core,
    a worker and a resource tracker)."""
    return [root, *root.children(recursive=True)]


class PeakRss:
    """Peak memory of a server's process tree while the block runs: the tree's total proportional
    set size (PSS: shared pages counted once), sampled every ``period`` seconds, and the largest
    process's own peak resident set as the kernel keeps it (``VmHWM``, Linux; includes loading)."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        import psutil  # vLLM's dependency

        self.root, self.period, self.tree_mib = psutil.Process(pid), period, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            total = 0
            for p in _tree(self.root):
                try:
                    total += p.memory_full_info().pss
                except Exception:  # noqa: BLE001 — a process that just exited holds nothing
                    pass
            self.tree_mib = max(self.tree_mib, total / 2**20)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        hwm = {}
        for p in _tree(self.root):
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
                hwm[p.pid] = int(status.split("VmHWM:")[1].split()[0]) / 1024
            except (OSError, IndexError):
                pass
        return {
            "peak_pss_tree_mib": round(self.tree_mib, 1),
            "peak_rss_process_mib": round(max(hwm.values(), default=0.0), 1),
            "processes": len(hwm),
        }


def _latency(a, backend: str, levels: list[int], res: dict) -> None:
    print(f"[bench serve] {backend}: latency runs", flush=True)
    with ServerProcess(_server_args(a, backend, a.kv_cache_space, a.max_num_seqs, a.max_model_len)) as srv:
        res["ready_s"] = srv.wait_ready(a.ready_timeout)
        res["facts"] = _facts(srv.url)
        with PeakRss(srv.proc.pid) as rss:
            _levels(a, backend, levels, res, srv)
        res["memory"] = rss.result()
        print(f"[bench serve] {backend}: {res['memory']}", flush=True)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid`` and its live
    descendants. On a shared machine a server's wall-clock throughput moves with other jobs' load;
    the CPU time it spends on the same requests barely does, so each level reports both."""
    import psutil  # vLLM's dependency

    total = 0.0
    for p in _tree(psutil.Process(pid)):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a process that just exited
            pass
    return total


def _levels(a, backend: str, levels: list[int], res: dict, srv: ServerProcess) -> None:
    asyncio.run(_level(srv.url, 1, 1, min(a.prompt_tokens, 128), 4, a.timeout, a.seed + 999))  # warm-up
    for c in levels:
        n = max(a.requests, c) if a.requests else max(4, 2 * c)
        cpu0 = tree_cpu_seconds(srv.proc.pid)
        level = asyncio.run(_level(srv.url, c, n, a.prompt_tokens, a.output_tokens, a.timeout, a.seed + c))
        cpu = tree_cpu_seconds(srv.proc.pid) - cpu0
        level["server_cpu_s"] = round(cpu, 2)
        level["output_tokens_per_cpu_s"] = round(level["generated_tokens"] / max(cpu, 1e-9), 4)
        print(
            f"[bench serve] {backend} c={c}: {level['output_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {level['ttft_p50_s']:.3f} s, TPOT p50 {level['tpot_p50_s']:.3f} s, "
            f"server CPU {level['server_cpu_s']:.1f} s",
            flush=True,
        )
        res["levels"].append(level)


def _capacity(a, backend: str) -> dict:
    """The capacity phase of one backend (see the module docstring)."""
    cap_len = a.capacity_request_tokens + 64
    budget = a.capacity_kv_space * 2**30
    seqs = a.capacity_max_num_seqs
    cap: dict[str, Any] = {
        "kv_cache_space_gib": a.capacity_kv_space,
        "request_tokens": a.capacity_request_tokens,
    }
    layer_heads = _layer_heads(a.model) if backend == "kivi" else None
    if layer_heads:
        # Staging slots come out of the budget: size max_num_seqs from a probe's measured costs.
        with ServerProcess(_server_args(a, backend, a.capacity_kv_space, 1, cap_len)) as srv:
            srv.wait_ready(a.ready_timeout)
            probe = _facts(srv.url)
        pages = math.ceil(a.capacity_request_tokens / probe["page_size"])
        seqs = best_max_num_seqs(probe, 1, budget, pages, layer_heads, a.capacity_max_num_seqs)
        cap["probe"] = {"max_num_seqs": 1, **probe}
        print(f"[bench serve] {backend}: probe says max_num_seqs {seqs}", flush=True)
        if seqs < 1:
            raise RuntimeError(
                f"{backend}: not one {a.capacity_request_tokens}-token request fits in "
                f"{a.capacity_kv_space} GiB (probe: {probe})"
            )
    with ServerProcess(_server_args(a, backend, a.capacity_kv_space, seqs, cap_len)) as srv:
        srv.wait_ready(a.ready_timeout)
        facts = _facts(srv.url)
        pages = math.ceil(a.capacity_request_tokens / facts["page_size"])
        fit = facts["num_blocks"] // pages
        count = min(fit, seqs)
        cap.update(
            {
                "max_num_seqs": seqs,
                "pages_per_request": pages,
                "fit_by_blocks": fit,
                "limited_by": (
                    "max_num_seqs (raise --capacity-max-num-seqs)"
                    if fit > seqs and seqs == a.capacity_max_num_seqs
                    else "kv budget"
                ),
                "capacity_requests": count,
                "capacity_request_tokens": count * a.capacity_request_tokens,
                **facts,
            }
        )
        print(
            f"[bench serve] {backend}: {count} concurrent {a.capacity_request_tokens}-token requests fit "
            f"({facts['num_blocks']} blocks, max_num_seqs {seqs})",
            flush=True,
        )
        if not a.no_capacity_run and count > 0:
            run_ = asyncio.run(
                _capacity_run(
                    srv.url, count, a.capacity_request_tokens, a.capacity_generate, a.timeout, a.seed + 7
                )
            )
            cap["run"] = run_
            ok = run_["completed"] and run_["preemptions"] == 0
            cap["held_without_preemption"] = run_["peak_held"] if ok else None
            print(
                f"[bench serve] {backend}: held {run_['peak_held']} of {count} at once, "
                f"{run_['preemptions']} preemptions, completed {run_['completed']} in {run_['wall_s']:.0f} s",
                flush=True,
            )
    return cap


def run(a, save=None) -> dict:
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    phases = {x.strip() for x in a.phases.split(",") if x.strip()}
    out: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "backends": {},
    }
    for backend in backends:
        res: dict[str, Any] = {"levels": []}
        if "latency" in phases:
            _latency(a, backend, levels, res)
        if "capacity" in phases:
            print(f"[bench serve] {backend}: capacity", flush=True)
            res["capacity"] = _capacity(a, backend)
        out["backends"][backend] = res
        if save is not None:
            save(out)
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["capacity_ratio"] = _capacity_ratio(out)
    return out


def _capacity_ratio(result: dict) -> float | None:
    """kivi / default concurrent requests held without preemption (or that fit, without a run)."""
    caps = [result["backends"].get(b, {}).get("capacity") or {} for b in ("kivi", "default")]
    key = "held_without_preemption" if all("run" in c for c in caps) else "capacity_requests"
    vals = [c.get(key) for c in caps]
    return vals[0] / vals[1] if vals[0] and vals[1] else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(result["backends"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for b in backends:
        lv = result["backends"][b]["levels"]
        ax.plot([x["concurrency"] for x in lv], [x["output_tokens_per_s"] for x in lv], marker="o", label=b)
    ax.set(xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput")
    ax.legend()
    ax = axes[1]
    with_levels = [b for b in backends if result["backends"][b]["levels"]]
    width = 0.8 / max(1, len(with_levels))
    labels = ["TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"]
    for i, b in enumerate(with_levels):
        lv = result["backends"][b]["levels"][-1]
        vals = [lv["ttft_p50_s"], lv["ttft_p99_s"], lv["tpot_p50_s"], lv["tpot_p99_s"]]
        ax.bar([j + i * width for j in range(4)], [v or 0 for v in vals], width, label=b)
    if with_levels:
        top = result["backends"][with_levels[0]]["levels"][-1]["concurrency"]
        ax.set_xticks([j + width * (len(with_levels) - 1) / 2 for j in range(4)], labels)
        ax.set(ylabel="seconds", title=f"Latency at {top} concurrent streams")
        ax.set_yscale("log")
        ax.legend()
    ax = axes[2]
    with_cap = [b for b in backends if result["backends"][b].get("capacity")]
    with_mem = [b for b in backends if result["backends"][b].get("memory")]
    if not with_cap and with_mem:  # latency runs only: the servers' peak memory instead
        pss = [result["backends"][b]["memory"]["peak_pss_tree_mib"] for b in with_mem]
        ax.bar(with_mem, pss, color=["C0", "C1", "C2"][: len(with_mem)])
        ax.set(ylabel="MiB", title="Peak PSS of the server process tree")
    caps = [result["backends"][b]["capacity"]["capacity_requests"] for b in with_cap]
    bars = ax.bar(with_cap, caps, color=["C0", "C1", "C2"][: len(with_cap)])
    for bar, b in zip(bars, with_cap):
        cap = result["backends"][b]["capacity"]
        held = cap.get("held_without_preemption")
        note = f"{cap['capacity_requests']} ({cap['capacity_request_tokens']:,} tok)"
        note += f"\nheld {held}" if held is not None else ""
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    if with_cap:
        c0 = result["backends"][with_cap[0]]["capacity"]
        ratio = result.get("capacity_ratio")
        title = f"{c0['request_tokens']}-token requests in {c0['kv_cache_space_gib']} GiB KV"
        ax.set(ylabel="concurrent requests", title=title + (f": {ratio:.1f}x" if ratio else ""))
        ax.set_ylim(0, max(caps) * 1.3)
    fig.suptitle("kivi-serve bench serve (loopback HTTP, " + result["settings"]["model"] + ")")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cli(argv: list[str]) -> int:
    a = build_parser().parse_args(list(argv))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = a.out.with_suffix(".json")
    result = run(a, save=lambda r: json_path.write_text(json.dumps(r, indent=2)))
    json_path.write_text(json.dumps(result, indent=2))
    plot(result, a.out.with_suffix(".png"))
    print(f"[bench serve] wrote {json_path} and {a.out.with_suffix('.png')}", flush=True)
    for b, res in result["backends"].items():
        for lv in res["levels"]:
            print(
                f"{b:8s} c={lv['concurrency']:<3d} {lv['output_tokens_per_s']:8.1f} tok/s  "
                f"TTFT p50/p99 {lv['ttft_p50_s']:.3f}/{lv['ttft_p99_s']:.3f} s  "
                f"TPOT p50/p99 {lv['tpot_p50_s']:.4f}/{lv['tpot_p99_s']:.4f} s"
            )
        if res.get("memory"):
            print(f"{b:8s} memory during the latency runs: {res['memory']}")
        cap = res.get("capacity")
        if cap:
            print(
                f"{b:8s} capacity: {cap['capacity_requests']} x {cap['request_tokens']} tokens "
                f"= {cap['capacity_request_tokens']} tokens (max_num_seqs {cap['max_num_seqs']}, "
                f"{cap['num_blocks']} blocks = {cap['capacity_tokens']} KV tokens), held without preemption: "
                f"{cap.get('held_without_preemption')}"
            )
    if result.get("capacity_ratio"):
        print(f"capacity ratio kivi / default: {result['capacity_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
