"""The accuracy harness: a real model whose KV cache goes through exactly the serving format.

``kivi-serve eval --model smollm2 --corpus hamlet.txt --windows 4 --window-len 1024`` runs the
model (transformers, weights loaded as **float32**: the bf16 checkpoint is upcast losslessly and
all evaluation math is fp32) over ``windows`` non-overlapping consecutive windows of
``window_len`` tokens taken from the start of the tokenized corpus (no special tokens added; each
window is its own sequence, so its token 0 is the attention sink), once per scheme, and reports
perplexity, its change against the unquantized cache, top-1 agreement with the unquantized
cache's argmax, and effective bits per element.

**Semantics** — those of :mod:`kivi_serve.kernels.reference` with chunks of one token
(teacher-forced decode). The harness replaces every attention layer with
:func:`kivi_eval_attention` (registered in transformers' ``AttentionInterface`` as
``"kivi_eval"``), which receives the post-RoPE ``q, k, v`` of the whole window. Query ``t`` sees

- key ``s == t``: exact (its own token, from the layer's input);
- key ``s < t``: **dequantized** if ``s``'s page is finalised at time ``t`` — its last token
  ``(s // P + 1) * P - 1 <= t``, i.e. the append of token ``t`` (or an earlier one) completed the
  page — else **exact** (the open page lives in the full-precision staging slot);
- key ``s > t``: masked (causal);
- key ``s <= t - W`` on a layer with a sliding window ``W``: masked (the layer's
  :class:`~kivi_serve.kernels.semantics.LayerAttention`, built from what the model passes its
  attention function: ``sliding_window``, ``softcap``, sink logits ``s_aux``, ``scaling``), exactly as
  the serving backend masks it; soft-cap and sink logits enter the softmax the same way.

Each full page of a window is quantized **once** through
:func:`~kivi_serve.quant.page.quantize_pages` (``sink=True`` for the window's first page)
and read back through :func:`~kivi_serve.quant.page.dequantize_pages`; every later query
reuses those bytes, exactly as the server does. (A scheme that quantizes keys before RoPE, reference
only, gets the window's token positions and the model's :class:`~kivi_serve.quant.rope.Rope`.)
One batched pass per layer computes the exact and
the dequantized scores and mixes them with the mask above before the softmax (and the values
likewise after it): O(T²) per layer, identical to T decode steps.

The unquantized reference is named ``fp16`` after the cache it stands for; it runs through the
same attention function with every key exact (which equals the stock model: see
``tests/test_harness.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kivi_serve.kernels import semantics
from kivi_serve.kernels.semantics import LayerAttention
from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.layout import DEFAULT_PAGE_SIZE, SUPPORTED_PAGE_SIZES
from kivi_serve.quant.rope import Rope, page_positions
from kivi_serve.quant.schemes import DEFAULT_SCHEMES, REFERENCE_HEAD_DIM, Scheme, get_scheme

ATTN_IMPLEMENTATION = "kivi_eval"
REFERENCE_SCHEME = "fp16"

#: Called per layer and window during a run (study instrumentation); see :func:`kivi_eval_attention`.
Observer = Callable[[dict], None]


# --------------------------------------------------------------------------- attention
def finalised_mask(
    T: int, page_size: int, device: torch.device | str = "cpu", chunks: Sequence[int] | None = None
) -> torch.Tensor:
    """``mask[t, s]``: query ``t`` reads key ``s`` dequantized (bool ``(T, T)``).

    The sequence is computed in chunks (engine steps): ``chunks`` lists their start positions
    (``[0, c1, c2, ...]``); ``None`` means one token per step (teacher-forced decode, the default).
    Query ``t`` of the chunk ``[c, c')`` reads key ``s`` dequantized iff ``s < c`` (earlier keys come
    from the cache; its own chunk comes from the layer's input) and ``s``'s page ``[jP, (j+1)P)``
    was complete after the chunk's append (``(j+1)P - 1 <= c' - 1``); else exactly (the open page
    lives in the staging slot). For decode (``c = t``, ``c' = t + 1``) that is ``s < t`` and
    ``(j+1)P - 1 <= t``.
    """
    start, end, page_last = _chunk_bounds(T, page_size, device, chunks)
    return (t_row(T, device) < start.view(T, 1)) & (page_last.view(1, T) <= end.view(T, 1) - 1)


def staged_mask(
    T: int, page_size: int, device: torch.device | str = "cpu", chunks: Sequence[int] | None = None
) -> torch.Tensor:
    """``mask[t, s]``: query ``t`` reads key ``s`` from its staging slot (bool ``(T, T)``): ``s`` is
    before ``t``'s chunk (it comes from the cache) and its page was still open after the chunk's
    append. The complement of :func:`finalised_mask` among the cached keys."""
    start, end, page_last = _chunk_bounds(T, page_size, device, chunks)
    return (t_row(T, device) < start.view(T, 1)) & (page_last.view(1, T) > end.view(T, 1) - 1)


def staged_tokens(T: int, page_size: int, device: torch.device | str = "cpu",
                  chunks: Sequence[int] | None = None) -> torch.Tensor:
    """``(T,)`` bool: token ``s`` went through staging (its page was still open after the append of
    its own chunk), so its page is quantized from the staged (rounded) value; the others — the
    tokens of the chunk that completed their page — are quantized from the layer's input."""
    _, end, page_last = _chunk_bounds(T, page_size, device, chunks)
    return end - 1 < page_last


def t_row(T: int, device) -> torch.Tensor:
    return torch.arange(T, device=device).view(1, T)


def _chunk_bounds(T: int, page_size: int, device, chunks: Sequence[int] | None):
    """Per position: its chunk's start and end, and its page's last position (each ``(T,)``)."""
    t = torch.arange(T, device=device)
    page_last = (t // page_size + 1) * page_size - 1
    if chunks is None:
        return t, t + 1, page_last
    bounds = sorted({int(c) for c in chunks} | {0})
    if bounds[-1] >= T or bounds[0] < 0:
        raise ValueError(f"chunk starts must lie in [0, {T}), got {list(chunks)}")
    b = torch.tensor(bounds + [T], device=device)
    i = torch.searchsorted(b, t, right=True) - 1  # chunk of each position
    return b[i], b[i + 1], page_last


#: Queries per block in :func:`mixed_attention`: bounds the (block, T) score matrices (8K windows).
QUERY_BLOCK = 512


def _block_scores(q: torch.Tensor, kx: torch.Tensor, kd: torch.Tensor | None, deq_mask: torch.Tensor | None,
                  rows: torch.Tensor, scaling: float, attn: LayerAttention | None = None,
                  staged: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Softmax weights (B, Hkv, G, len(rows), T) of the queries ``q`` (B, Hkv, G, len(rows), D) at
    positions ``rows``: causal inside the layer's window, soft-capped, with its sink logits (``attn``);
    exact keys ``kx`` where ``deq_mask`` is False, ``kd`` where True; with ``staged`` = (staged keys,
    their (T, T) mask), the staged keys where that mask is True."""
    B, Hkv, G = q.shape[:3]
    T = kx.shape[-2]
    scores = torch.matmul(q, kx.transpose(-1, -2)) * scaling
    if staged is not None:
        ss = torch.matmul(q, staged[0].transpose(-1, -2)) * scaling
        scores = torch.where(staged[1][rows], ss, scores)
    if kd is not None:
        sd = torch.matmul(q, kd.transpose(-1, -2)) * scaling
        scores = torch.where(deq_mask[rows], sd, scores)
    seen = semantics.visible(attn, rows, torch.arange(T, device=q.device))
    scores = semantics.cap_scores(attn, scores).masked_fill(~seen, -torch.inf)
    sink = None if attn is None or attn.sinks is None else attn.sinks.float().reshape(1, Hkv, G, 1)
    return semantics.softmax(attn, scores, sink)


def mixed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_deq: torch.Tensor | None,
    v_deq: torch.Tensor | None,
    deq_mask: torch.Tensor | None,
    scaling: float,
    need_probs: bool = True,
    block: int = QUERY_BLOCK,
    *,
    attn: LayerAttention | None = None,
    staged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal GQA attention where masked (query, key) pairs read the dequantized cache.

    Computed in blocks of ``block`` queries, so memory grows as ``block * T``, not ``T²``.

    Parameters
    ----------
    query : (B, Hq, Tq, D) — the queries of the last ``Tq <= T`` positions (``Tq < T``: a pass that
        continues a cached prefix, :func:`prefix_cache`); key, value : (B, Hkv, T, D) — exact, post-RoPE.
    k_deq, v_deq : (B, Hkv, T, D) or None — what a finalised page reads back (only the positions
        where ``deq_mask`` is True are used). None: all exact.
    deq_mask : (T, T) bool or None — :func:`finalised_mask`.
    scaling : float — softmax scale.
    need_probs : bool — also return the (B, Hkv, G, T, T) weights (``T²`` memory).
    attn : LayerAttention, optional — the layer's sliding window, logit soft-cap and sink logits
        (``sinks`` of shape (Hq,)).
    staged : (k_staged, v_staged, mask), optional — keys/values (B, Hkv, T, D) as a compact staging
        slot holds them and the (T, T) :func:`staged_mask` of the pairs that read them (None: the
        staging slot is exact).

    Returns
    -------
    out : (B, Hq, Tq, D) fp32; probs : (B, Hkv, G, Tq, T) fp32 attention weights, or None.
    """
    B, Hq, Tq, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    G = Hq // Hkv
    first = T - Tq  # absolute position of the first query
    q = query.float().reshape(B, Hkv, G, Tq, D)
    kx, vx = key.float().unsqueeze(2), value.float().unsqueeze(2)  # (B, Hkv, 1, T, D)
    kd = None if k_deq is None else k_deq.float().unsqueeze(2)
    vd = None if v_deq is None else v_deq.float().unsqueeze(2)
    ks = None if staged is None else (staged[0].float().unsqueeze(2), staged[2])
    vs = None if staged is None else staged[1].float().unsqueeze(2)
    out = torch.empty(B, Hkv, G, Tq, D, dtype=torch.float32, device=query.device)
    probs = torch.empty(B, Hkv, G, Tq, T, dtype=torch.float32, device=query.device) if need_probs else None
    for t0 in range(0, Tq, block):
        rows = torch.arange(first + t0, first + min(t0 + block, Tq), device=query.device)
        p = _block_scores(q[..., t0 : t0 + block, :], kx, kd, deq_mask, rows, scaling, attn, ks)
        o = out[..., t0 : t0 + block, :]
        p_x = p
        if vd is not None:
            p_deq = p * deq_mask[rows]
            p_x = p_x - p_deq
        if vs is not None:
            p_st = p * staged[2][rows]
            p_x = p_x - p_st
        o.copy_(torch.matmul(p_x, vx))
        if vd is not None:
            o.add_(torch.matmul(p_deq, vd))
        if vs is not None:
            o.add_(torch.matmul(p_st, vs))
        if probs is not None:
            probs[..., t0 : t0 + block, :] = p
    return out.reshape(B, Hq, Tq, D), probs


def attention_rows(
    query: torch.Tensor, key: torch.Tensor, k_deq: torch.Tensor | None, deq_mask: torch.Tensor | None,
    scaling: float, rows: Sequence[int], attn: LayerAttention | None = None,
) -> torch.Tensor:
    """The attention weights of the queries at positions ``rows`` only, as :func:`mixed_attention`
    computes them: (B, Hkv, G, len(rows), T) fp32 (query (B, Hq, T, D), key/k_deq (B, Hkv, T, D))."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    r = torch.as_tensor(list(rows), dtype=torch.long, device=query.device)
    q = query.float().reshape(B, Hkv, Hq // Hkv, T, D)[..., r, :]
    kd = None if k_deq is None else k_deq.float().unsqueeze(2)
    return _block_scores(q, key.float().unsqueeze(2), kd, deq_mask, r, scaling, attn)


@dataclass
class _Run:
    """What the registered attention function needs to know about the current forward pass."""

    scheme: Scheme
    page_size: int
    window: int = 0
    observer: Observer | None = None
    observer_probs: bool = True
    chunks: Sequence[int] | None = None
    #: How the staging slot holds open pages (:data:`kivi_serve.quant.staging.SIMULATED_STAGING_DTYPES`;
    #: ``model``: exactly, as the fp32 harness computes them).
    staging: str = "model"
    #: Study only: other schemes for some layers (``{layer index: scheme}``), ``scheme`` for the rest.
    layers: Mapping[int, Scheme] | None = None
    #: The model's key rotation, for schemes that quantize keys before RoPE (set by :func:`_forward`).
    rope: Rope | None = None

    def pre_rope(self) -> bool:
        """True if any layer's scheme quantizes keys before RoPE (:attr:`Scheme.k_pre_rope`)."""
        return any(s.k_pre_rope for s in (self.scheme, *(self.layers or {}).values()))

    def scheme_at(self, layer: int) -> Scheme:
        return self.scheme if not self.layers else self.layers.get(layer, self.scheme)


_ACTIVE: _Run | None = None


def page_roundtrip(
    scheme: Scheme, key: torch.Tensor, value: torch.Tensor, page_size: int, rope: Rope | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize every full page of ``key``/``value`` (B, Hkv, T, D) once and read it back.

    Returns (k_deq, v_deq) of the same shape; positions past the last full page are copied exact
    (they are never read dequantized). Token ``t`` of the window is at position ``t`` (what ``rope``, the
    model's rotation, needs for a scheme that quantizes keys before RoPE).
    """
    B, H, T, D = key.shape
    n_pages = T // page_size
    k_deq, v_deq = key.float().clone(), value.float().clone()
    if n_pages == 0:
        return k_deq, v_deq
    span = n_pages * page_size

    def pages(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :span].float().reshape(B * H * n_pages, page_size, D)

    page_index = torch.arange(B * H * n_pages, device=key.device) % n_pages
    sink = page_index == 0
    extra = {}
    if scheme.k_pre_rope:
        extra = dict(positions=page_positions(page_index, page_size), rope=rope)
    kq, vq = scheme.roundtrip(pages(key), pages(value), page_size, sink, **extra)
    k_deq[:, :, :span] = kq.reshape(B, H, span, D)
    v_deq[:, :, :span] = vq.reshape(B, H, span, D)
    return k_deq, v_deq


def kivi_eval_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``attn_implementation="kivi_eval"``).

    query : (B, Hq, Tq, D), key/value : (B, Hkv, T, D), post-RoPE: the whole window (``Tq == T``), or
    with a cached exact prefix (:func:`prefix_cache`) the last ``Tq`` positions' queries against every
    key. Returns attn_output (B, Tq, Hq, D) as transformers expects. transformers passes no mask for a
    custom implementation; the harness feeds unpadded windows, so the mask is causal, narrowed by the
    layer's ``sliding_window`` (and ``softcap`` / sink logits ``s_aux`` applied) as the model passes them.
    """
    run = _ACTIVE
    if run is None:
        raise RuntimeError("kivi_eval attention called outside kivi_serve.eval.harness (no scheme active)")
    if dropout:
        raise ValueError("kivi_eval attention is for evaluation: dropout must be 0")
    T, D = key.shape[2], query.shape[3]
    scaling = D**-0.5 if scaling is None else scaling
    k_deq = v_deq = mask = staged = None
    scheme = run.scheme_at(module.layer_idx)
    if scheme.quantized:
        k_pg, v_pg = key, value
        if run.staging != "model":
            k_st = staging_format.roundtrip(key, run.staging)
            v_st = staging_format.roundtrip(value, run.staging)
            staged = (k_st, v_st, staged_mask(T, run.page_size, query.device, run.chunks))
            # a page is quantized from what staging held of its tokens (the ones that completed it
            # in their own step come from the layer's input)
            went = staged_tokens(T, run.page_size, query.device, run.chunks).view(1, 1, T, 1)
            k_pg, v_pg = torch.where(went, k_st, key.float()), torch.where(went, v_st, value.float())
        k_deq, v_deq = page_roundtrip(scheme, k_pg, v_pg, run.page_size, run.rope)
        mask = finalised_mask(T, run.page_size, query.device, run.chunks)
    need_probs = run.observer is not None and run.observer_probs
    attn = layer_attention(kwargs)
    out, probs = mixed_attention(
        query, key, value, k_deq, v_deq, mask, scaling, need_probs, attn=attn, staged=staged
    )
    if run.observer is not None:
        run.observer(
            dict(layer=module.layer_idx, window=run.window, query=query, key=key, value=value,
                 k_deq=k_deq, v_deq=v_deq, mask=mask, probs=probs, out=out, scaling=scaling, attn=attn)
        )
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def layer_attention(kwargs: dict) -> LayerAttention | None:
    """The layer's window, soft-cap and sinks from what transformers passes an attention function
    (``sliding_window``: Gemma 2/3, gpt-oss, Mistral; ``softcap``: Gemma 2; ``s_aux``: gpt-oss sinks)."""
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    if not window and not softcap and sinks is None:
        return None
    return LayerAttention(window=int(window) if window else None, softcap=softcap or None, sinks=sinks)


def register_attention() -> None:
    """Register :func:`kivi_eval_attention` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, kivi_eval_attention)


# --------------------------------------------------------------------------- inputs
@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    head_dim: int
    device: torch.device


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def load_model(model: str | Path, device: str | None = "cpu") -> LoadedModel:
    """Load ``model`` (``smollm2`` or a local transformers folder) in fp32 with the kivi_eval attention.

    Raises :class:`~kivi_serve.model.prepare.ModelError` for a folder without weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kivi_serve.model.prepare import resolve_model

    path = resolve_model(str(model))
    dev = resolve_device(device)
    register_attention()
    lm = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    )
    lm.eval().to(dev)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return LoadedModel(lm, tok, str(model), int(head_dim), dev)


def read_corpus(corpus: str | Path) -> tuple[str, str]:
    """Return ``(display name, text)`` of a UTF-8 text file; ``hamlet`` is the bundled default corpus.

    ``FileNotFoundError`` if the file does not exist, ``ValueError`` if it is not readable UTF-8
    text (see :func:`kivi_serve.eval.corpus.load_corpus`).
    """
    from kivi_serve.eval.corpus import hamlet_path, load_corpus

    path = hamlet_path() if str(corpus) == "hamlet" else Path(corpus).expanduser()
    return path.name, load_corpus(path)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text with BOS by default (Gemma, Llama 2/3 do; SmolLM2 not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def make_windows(tokenizer, text: str, windows: int, window_len: int) -> torch.Tensor:
    """The first tokens of ``text`` as ``(windows, window_len)`` int64: consecutive runs of
    ``window_len`` tokens, or, when the tokenizer adds BOS by default (:func:`adds_bos`), BOS followed
    by ``window_len - 1`` tokens — each window is a sequence as the model sees one when served."""
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if window_len < 2:
        raise ValueError(f"window_len must be >= 2, got {window_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = adds_bos(tokenizer)
    per = window_len - 1 if bos else window_len
    need = windows * per
    if len(ids) < need:
        raise ValueError(
            f"corpus too short: {len(ids)} tokens, need {windows} windows * {per} tokens = {need}"
        )
    out = torch.tensor(ids[:need], dtype=torch.long).reshape(windows, per)
    if bos:
        out = torch.cat([torch.full((windows, 1), tokenizer.bos_token_id, dtype=torch.long), out], 1)
    return out


# --------------------------------------------------------------------------- runs
@dataclass
class SchemeRun:
    """Per-token results of one scheme: ``nll`` and ``argmax`` are (windows, window_len - 1)."""

    scheme: Scheme
    nll: torch.Tensor
    argmax: torch.Tensor
    staging: str = "model"


def _forward(lm: LoadedModel, ids: torch.Tensor, run: _Run, hidden: bool = False, past=None) -> torch.Tensor:
    """One teacher-forced pass of ``ids`` (B, T) with ``run`` active: logits (B, T, vocab) fp32, or with
    ``hidden`` the final hidden states (B, T, H) (the logits are ``output_head(hidden)``). With ``past``
    (:func:`prefix_cache` of the first ``L`` tokens; a copy is extended) only positions ``L ..`` are
    computed: (B, T - L, ...)."""
    global _ACTIVE
    _check_page_size(run.page_size)
    if run.pre_rope() and run.rope is None:
        run = dataclasses.replace(run, rope=Rope.from_model(lm.model))
    _ACTIVE = run
    try:
        x = ids.to(lm.device)
        kw: dict = {"use_cache": False}
        if past is not None:
            x = x[:, past.get_seq_length():]
            kw = {"use_cache": True, "past_key_values": copy.deepcopy(past)}
        if hidden:
            return lm.model.get_decoder()(input_ids=x, **kw).last_hidden_state
        return lm.model(input_ids=x, **kw).logits.float()
    finally:
        _ACTIVE = None


@torch.no_grad()
def prefix_cache(lm: LoadedModel, ids: torch.Tensor, end: int):
    """The exact (fp16-scheme) keys and values of ``ids[:, :end]`` at every layer, as a transformers
    ``DynamicCache`` for :func:`token_logprobs` ``(past=...)``.

    Every scheme computes the first engine step (chunk) of a prompt exactly — its queries read no
    finalised page (:func:`finalised_mask`) — so one prefix pass serves every scheme of a study
    (a passkey trial's document is one 2048-token step up to 2K tokens: each further scheme then costs
    only the question's tokens).
    """
    from transformers import DynamicCache

    if not 0 < end < ids.shape[1]:
        raise ValueError(f"prefix end must be in [1, {ids.shape[1]}), got {end}")
    cache = DynamicCache()  # plain full layers: the harness applies sliding windows itself
    global _ACTIVE
    _ACTIVE = _Run(get_scheme(REFERENCE_SCHEME), DEFAULT_PAGE_SIZE)
    try:
        lm.model.get_decoder()(input_ids=ids[:, :end].to(lm.device), use_cache=True, past_key_values=cache)
    finally:
        _ACTIVE = None
    return cache


def _plain_head(lm: LoadedModel) -> bool:
    """True if the logits are just the output embedding of the final hidden state (no soft-capping
    or scaling), so that they can be computed a block of positions at a time."""
    cfg = lm.model.config
    extras = ("final_logit_softcapping", "logit_scale", "output_multiplier")
    return not any(getattr(cfg, a, None) for a in extras)


@torch.no_grad()
def run_logits(
    lm: LoadedModel, ids: torch.Tensor, scheme: Scheme, page_size: int, window: int = 0,
    observer: Observer | None = None, chunks: Sequence[int] | None = None,
) -> torch.Tensor:
    """Logits ``(B, T, vocab)`` fp32 of a teacher-forced pass of ``ids`` ``(B, T)`` under ``scheme``
    (``chunks``: see :func:`finalised_mask`)."""
    return _forward(lm, ids, _Run(scheme, page_size, window, observer, chunks=chunks))


@torch.no_grad()
def token_logprobs(
    lm: LoadedModel, ids: torch.Tensor, scheme: Scheme, page_size: int, *, window: int = 0,
    observer: Observer | None = None, observer_probs: bool = True, chunks: Sequence[int] | None = None,
    positions: Sequence[int] | None = None, block: int = 1024, staging: str = "model",
    layers: Mapping[int, Scheme] | None = None, past=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probability of each next token of ``ids`` (1, T) under ``scheme`` (``layers``:
    another scheme for some layers, ``{layer index: scheme}``, a study of where the loss comes from).

    Only the predictions of ``positions`` (default: every position ``0 .. T-2``, predicting tokens
    ``1 .. T-1``) are computed, a block at a time: an 8K window never holds (T, vocab) logits.
    ``past``: :func:`prefix_cache` of ``ids``' first ``L`` tokens, which must all lie in the first
    chunk (they read no finalised page, so they are the same under every scheme); only positions
    ``>= L`` are computed then, and ``positions`` must be ``>= L``. The observer sees the queries of
    positions ``L ..`` only.

    Returns
    -------
    logprob : (n,) fp64 — ``log p(ids[t + 1] | ids[:t + 1])`` for each ``t`` in ``positions``;
    argmax : (n,) int64 — the most likely next token; rank : (n,) int64 — 1 + the number of tokens
    more likely than ``ids[t + 1]``.
    """
    T = ids.shape[1]
    pos = torch.arange(T - 1) if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
    first = 0 if past is None else past.get_seq_length()
    if ids.shape[0] != 1 or (pos.numel() and (pos.min() < first or pos.max() >= T - 1)):
        raise ValueError(f"ids must be (1, T) and positions in [{first}, {T - 2}]")
    if first and int(_chunk_bounds(T, page_size, "cpu", chunks)[0][first - 1]) != 0:
        raise ValueError(f"a cached prefix of {first} tokens must lie in the first chunk (chunks={chunks})")
    run = _Run(scheme, page_size, window, observer, observer_probs, chunks, staging, layers)
    plain = _plain_head(lm)
    out = _forward(lm, ids, run, hidden=plain, past=past)
    head = lm.model.get_output_embeddings() if plain else None
    x = ids[0].to(lm.device)
    lps, argmaxes, ranks = [], [], []
    for i in range(0, pos.numel(), block):
        p = pos[i : i + block].to(lm.device)
        logits = head(out[0, p - first]).float() if plain else out[0, p - first]
        logp = torch.log_softmax(logits, dim=-1)
        target = logp.gather(1, x[p + 1].unsqueeze(1))
        lps.append(target.squeeze(1).double().cpu())
        argmaxes.append(logits.argmax(-1).cpu())
        ranks.append((logp > target).sum(-1).cpu() + 1)
    if not lps:
        empty = torch.empty(0, dtype=torch.long)
        return empty.double(), empty, empty.clone()
    return torch.cat(lps), torch.cat(argmaxes), torch.cat(ranks)


def run_scheme(
    lm: LoadedModel,
    ids: torch.Tensor,
    scheme: Scheme,
    page_size: int,
    observer: Observer | None = None,
    bar=None,
    staging: str = "model",
) -> SchemeRun:
    """Teacher-forced pass of every window (one at a time) under ``scheme`` (open pages held in
    ``staging``)."""
    nlls, argmaxes = [], []
    for w in range(ids.shape[0]):
        lp, am, _ = token_logprobs(
            lm, ids[w : w + 1], scheme, page_size, window=w, observer=observer, staging=staging
        )
        nlls.append(-lp)
        argmaxes.append(am)
        if bar is not None:
            bar.update(1)
    return SchemeRun(scheme, torch.stack(nlls), torch.stack(argmaxes), staging)


def summarize(run: SchemeRun, ref: SchemeRun, page_size: int, head_dim: int) -> dict:
    """One row of the report (the issue's JSON shape, plus the model-head_dim bits)."""
    ppl = math.exp(run.nll.mean().item())
    ref_ppl = math.exp(ref.nll.mean().item())
    top1 = (run.argmax == ref.argmax).double().mean().item()
    return {
        "scheme": run.scheme.name + ("" if run.staging == "model" else f"+{run.staging}-staging"),
        "staging": run.staging,
        "ppl": round(ppl, 4),
        "delta_pct": round(100.0 * (ppl / ref_ppl - 1.0), 3),
        "bits_per_element": round(run.scheme.bits_per_element(REFERENCE_HEAD_DIM, page_size), 4),
        "greedy_agreement": round(top1, 4),
        "top1_agreement": round(top1, 4),
        "bits_per_element_model": round(run.scheme.bits_per_element(head_dim, page_size), 4),
    }


def _check_page_size(page_size: int) -> None:
    if page_size not in SUPPORTED_PAGE_SIZES:
        raise ValueError(f"page_size must be one of {SUPPORTED_PAGE_SIZES}, got {page_size}")


def _as_stagings(staging: Sequence[str] | str) -> list[str]:
    out = [s.strip() for s in staging.split(",") if s.strip()] if isinstance(staging, str) else list(staging)
    bad = [s for s in out if s not in staging_format.SIMULATED_STAGING_DTYPES]
    if bad or not out:
        known = staging_format.SIMULATED_STAGING_DTYPES
        raise ValueError(f"staging must name formats among {known}, got {out}")
    return out


def _as_schemes(schemes: Sequence[str | Scheme] | str | None) -> list[Scheme]:
    if schemes is None:
        schemes = DEFAULT_SCHEMES
    if isinstance(schemes, str):
        schemes = [s.strip() for s in schemes.split(",") if s.strip()]
    out = [s if isinstance(s, Scheme) else get_scheme(s) for s in schemes]
    if not out:
        raise ValueError("schemes must name at least one scheme")
    return out


def evaluate(
    model: str | Path | LoadedModel = "smollm2",
    corpus: str | Path = "hamlet",
    windows: int = 4,
    window_len: int = 1024,
    page_size: int = DEFAULT_PAGE_SIZE,
    schemes: Sequence[str | Scheme] | str | None = None,
    device: str | None = "cpu",
    progress: bool = True,
    observer: Observer | None = None,
    staging: Sequence[str] | str = ("model",),
) -> dict:
    """Run every scheme over the same windows and return the report dict.

    Each quantized scheme runs once per ``staging`` format (:mod:`kivi_serve.quant.staging`:
    ``model`` holds the open page exactly; ``int8`` / ``fp8`` round it as the compact staging does);
    its rows are named ``<scheme>+<format>-staging`` for the compact formats.

    The unquantized ``fp16`` run is always made first (it is the reference for ``delta_pct`` and
    the agreements); it is listed in ``results`` only if requested. ``tokens`` is the number of
    predicted tokens, ``windows * (window_len - 1)``.
    """
    from tqdm.auto import tqdm

    _check_page_size(page_size)
    wanted = _as_schemes(schemes)
    for s in wanted:
        s.check_page_size(page_size)
    stagings = _as_stagings(staging)
    name, text = read_corpus(corpus)  # bad corpus fails before the model loads
    lm = model if isinstance(model, LoadedModel) else load_model(model, device)
    ids = make_windows(lm.tokenizer, text, windows, window_len)
    ref_scheme = get_scheme(REFERENCE_SCHEME)
    order = [ref_scheme] + [s for s in wanted if s.name != REFERENCE_SCHEME]
    jobs = [(s, st) for s in order for st in (stagings if s.quantized else ["model"])]
    runs: dict[tuple[str, str], SchemeRun] = {}
    bar = tqdm(total=len(jobs) * windows, desc="eval", unit="window", file=sys.stderr, disable=not progress)
    with bar:
        for s, st in jobs:
            bar.set_postfix_str(s.name if st == "model" else f"{s.name}+{st}")
            runs[s.name, st] = run_scheme(lm, ids, s, page_size, observer if s.quantized else None, bar, st)
    ref = runs[REFERENCE_SCHEME, "model"]
    return {
        "model": lm.name,
        "corpus": name,
        "tokens": int(ref.nll.numel()),
        "page_size": page_size,
        "windows": windows,
        "window_len": window_len,
        "head_dim": lm.head_dim,
        "results": [
            summarize(runs[s.name, st], ref, page_size, lm.head_dim) for s, st in jobs if s in wanted
        ],
    }


def render_table(report: dict) -> None:
    """Print the report as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{report['model']} · {report['corpus']} · {report['tokens']} tokens · "
        f"page {report['page_size']}",
    )
    for col in ("scheme", "ppl", "Δ %", "top-1", "bits (hd128)", f"bits (hd{report['head_dim']})"):
        t.add_column(col, justify="left" if col == "scheme" else "right")
    for r in report["results"]:
        t.add_row(
            r["scheme"],
            f"{r['ppl']:.3f}",
            f"{r['delta_pct']:+.2f}",
            f"{r['top1_agreement']:.3f}",
            f"{r['bits_per_element']:.3f}",
            f"{r['bits_per_element_model']:.3f}",
        )
    Console().print(t)


def run_cli(
    model: str = "smollm2",
    corpus: str = "hamlet",
    windows: int = 4,
    window_len: int = 1024,
    page_size: int = DEFAULT_PAGE_SIZE,
    schemes: Sequence[str] | str | None = None,
    json_out: bool = False,
    device: str | None = "cpu",
    staging: Sequence[str] | str = ("model",),
) -> int:
    """Entry point of ``kivi-serve eval``: a rich table, or with ``json_out`` one JSON object on the
    last line of stdout. Errors (``ValueError``, ``FileNotFoundError``, ``ModelError``) propagate
    to the CLI, which prints them and exits 2.
    """
    report = evaluate(
        model, corpus, windows, window_len, page_size, schemes, device, progress=True, staging=staging
    )
    if json_out:
        out = {k: report[k] for k in ("model", "corpus", "tokens", "results")}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    else:
        render_table(report)
    return 0
