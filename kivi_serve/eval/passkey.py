"""Passkey retrieval through the real serving path: ``kivi-serve eval --task passkey``.

A random 5-digit key sentence is hidden in filler text at a relative depth; the model is then asked
for it. Each trial is one prompt of exactly ``context - ANSWER_ROOM`` tokens:

    head (instruction) · filler[:cut] · needle · filler[cut:] · tail (question, answer prefix)

Formats (``--format``): ``chat`` (default) puts the instruction, the text and the question in one
user turn of the model's chat template and starts the assistant's answer with
``"The pass key is "``; ``completion`` is the same text without the chat template. Filler
(``--filler``): ``corpus`` (consecutive lines of the corpus from a random line, default) or
``repeat`` (the short repeated sentences of the original passkey test).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

#: The needle: the key stated twice (a repeated key is easier to retrieve for a small model).
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
QUESTION = "What is the pass key?"
#: The answer starts with this (the key's digits follow it: the trailing space is its own token).
ANSWER_PREFIX = "The pass key is "
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: Tokens left free after the prompt for the answer: the context is prompt + answer.
ANSWER_ROOM = 8
KEY_DIGITS = 5
#: A corpus shorter than this would repeat within a 1K prompt (longer prompts wrap around it).
MIN_CORPUS_TOKENS = 1024
FORMATS = ("chat", "completion")
FILLERS = ("corpus", "repeat")
_MARK = "\x00DOCUMENT\x00"


@dataclass(frozen=True)
class Trial:
    """One passkey prompt.

    ``prompt`` ends with the answer prefix (greedy decoding continues it); ``key_ids`` are the key's
    tokens as the answer continues; ``doc_len`` is the length of ``prompt``'s document part (head,
    filler and needle: everything before the question); ``needle`` is the needle's token span
    ``[start, end)`` in ``prompt``.
    """

    context: int
    depth: int  # percent
    seed: int
    key: str
    prompt: tuple[int, ...]
    key_ids: tuple[int, ...]
    doc_len: int
    needle: tuple[int, int]

    @property
    def scored(self) -> tuple[int, ...]:
        """``prompt + key_ids``: the teacher-forced sequence whose last tokens are the key."""
        return self.prompt + self.key_ids


@dataclass
class PromptBuilder:
    """Builds :class:`Trial` prompts for one tokenizer, format and filler.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer (with a chat template for ``fmt="chat"``).
    corpus : str
        Filler text (``filler="corpus"``); its non-empty lines are the units the needle goes between.
    fmt, filler : see the module docstring.
    """

    tokenizer: object
    corpus: str = ""
    fmt: str = "chat"
    filler: str = "corpus"
    _units: list[list[int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.fmt!r}")
        if self.filler not in FILLERS:
            raise ValueError(f"filler must be one of {FILLERS}, got {self.filler!r}")
        if self.filler == "corpus":
            lines = [ln.strip() for ln in self.corpus.splitlines() if ln.strip()]
            texts = [ln + "\n" for ln in lines]
        else:
            texts = [s.strip() + ". " for s in REPEAT_FILLER.split(".") if s.strip()]
        self._units = [self._ids(t) for t in texts]
        if self.filler == "corpus" and sum(map(len, self._units)) < MIN_CORPUS_TOKENS:
            raise ValueError(f"the corpus is too short for filler: need at least {MIN_CORPUS_TOKENS} tokens")
        head, tail = self._frame()
        self.head, self.tail = self._ids(head), self._ids(tail)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _frame(self) -> tuple[str, str]:
        """The text before and after the document."""
        if self.fmt == "chat":
            user = f"{INSTRUCTION}\n\n{_MARK}\n\n{QUESTION}"
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            head, tail = text.split(_MARK)
            return head, tail + ANSWER_PREFIX
        return f"{INSTRUCTION}\n\n", f"\n\n{QUESTION} {ANSWER_PREFIX}"

    def trial(self, context: int, depth: int, seed: int) -> Trial:
        """The prompt of ``context`` tokens (answer room included) with the needle at ``depth`` %.

        ``seed`` picks the key and where the filler starts; the same seed gives the same key and
        filler at every depth, so that depths differ only by where the needle sits.
        """
        if not 0 <= depth <= 100:
            raise ValueError(f"depth must be in [0, 100] percent, got {depth}")
        rng = random.Random(f"passkey-{seed}")
        key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
        needle = self._ids(("\n" if self.filler == "corpus" else "") + NEEDLE.format(key=key) + "\n")
        key_ids = tuple(self._ids(key))
        n_filler = context - ANSWER_ROOM - len(self.head) - len(self.tail) - len(needle)
        if n_filler < 1:
            raise ValueError(f"context {context} is too short for the prompt frame")
        start = rng.randrange(len(self._units))
        units, total = [], 0
        while total < n_filler:  # whole units from ``start`` on, wrapping around the text
            u = self._units[(start + len(units)) % len(self._units)]
            units.append(u)
            total += len(u)
        # the needle goes between two units: the boundary nearest to depth % of the filler
        bounds = [0]
        for u in units:
            bounds.append(bounds[-1] + len(u))
        bounds = [b for b in bounds if b <= n_filler] + [n_filler]
        cut = min(bounds, key=lambda b: (abs(b - depth / 100 * n_filler), b))
        flat = [t for u in units for t in u][:n_filler]
        doc = self.head + flat[:cut] + needle + flat[cut:]
        prompt = tuple(doc + self.tail)
        at = len(self.head) + cut
        return Trial(context, depth, seed, key, prompt, key_ids, len(doc), (at, at + len(needle)))

    def grid(self, contexts: Sequence[int], depths: Sequence[int], seeds: Sequence[int]) -> list[Trial]:
        return [self.trial(c, d, s) for c in contexts for d in depths for s in seeds]


def answer_digits(text: str) -> str:
    """The first run of digits in an answer ('' if none): what the model gave as the key."""
    run = ""
    for ch in text:
        if ch.isdigit():
            run += ch
        elif run:
            break
    return run


# --------------------------------------------------------------------------- through the engine
#: The grid of ``kivi-serve eval --task passkey`` (sized to run in about 25 minutes on 2 CPU cores).
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_SEEDS = 1
DEFAULT_SCHEMES = ("fp16", "kivi-serve-2bit", "kivi-serve-3bit", "kivi-serve-4bit", "kivi2-uniform")
#: Tokens per engine step: vLLM's serving default on CPU (``kivi-serve serve``'s default there).
DEFAULT_CHUNK = 2048
#: Contexts above this run only the ``long_schemes`` (on CPU a quantized 8K prompt costs ~7x fp16's
#: time: kivi-serve's CPU attention is the PyTorch reference, vLLM's is a C++ kernel).
LONG_CONTEXT = 4096
DEFAULT_LONG_SCHEMES = ("fp16", "kivi-serve-2bit")


@dataclass(frozen=True)
class Outcome:
    """One trial under one scheme: what the engine answered and how likely it found the key.

    ``key_logprob`` is ``log P(key | prompt)`` teacher-forced (the sum over the key's tokens);
    ``key_ranks`` the rank of each key token among the vocabulary (1: the greedy choice).
    ``cached_tokens`` is how much of the prompt the answer read from the prefix cache.
    """

    scheme: str
    context: int
    depth: int
    seed: int
    key: str
    answer: str
    correct: bool
    key_logprob: float
    key_ranks: tuple[int, ...]
    cached_tokens: int

    @property
    def digits(self) -> str:
        return answer_digits(self.answer)


def served_chunks(trial: Trial, chunk: int, page_size: int) -> list[int]:
    """Start positions of the steps that compute ``trial.scored`` in :func:`run_scheme`: the document
    in ``chunk``-token steps, then, from its last full page on, the rest in one step (the
    question reads the document's full pages from the cache). See
    :func:`kivi_serve.eval.harness.finalised_mask`."""
    cached = trial.doc_len // page_size * page_size
    return sorted(set(range(0, cached, chunk)) | {cached})


def run_scheme(model, scheme: str, trials: Sequence[Trial], tokenizer, *, dtype: str = "auto",
               page_size: int = 128, chunk: int = DEFAULT_CHUNK, bar=None, on_group=None) -> list[Outcome]:
    """Every trial through a real vLLM engine on ``scheme``, greedy.

    For each engine step's worth of trials: (1) each trial's document (everything before the
    question) is prefilled from scratch in ``chunk``-token steps (each step reads the earlier
    steps' pages from the cache), and its full pages enter the prefix cache; (2) the whole prompt is
    answered greedily: the question (and the document's last, partial page) is computed against the
    document's pages *as the cache holds them* — what a follow-up question about a document does on
    a server; (3) the prompt followed by the key is scored the same way (teacher-forced).
    ``on_group`` is called with each step group's outcomes as soon as they are known.
    """
    from kivi_serve.engine.offline import OfflineEngine, step_groups

    if chunk < page_size or chunk % page_size:
        raise ValueError(f"chunk must be a multiple of the page size {page_size}, got {chunk}")
    max_len = max(t.context for t in trials)
    out: list[Outcome] = []
    with OfflineEngine(model, scheme, max_model_len=max_len, dtype=dtype, page_size=page_size,
                       max_num_batched_tokens=min(chunk, max_len)) as eng:
        for idx in step_groups([t.doc_len for t in trials], eng.budget):
            group = [trials[i] for i in idx]
            eng.prefill([t.prompt[: t.doc_len] for t in group])
            answers = eng.greedy([t.prompt for t in group], ANSWER_ROOM)
            scored = eng.score([t.scored for t in group], [len(t.prompt) for t in group])
            new = []
            for t, a, s in zip(group, answers, scored):
                text = tokenizer.decode(a.token_ids, skip_special_tokens=True)
                ok = answer_digits(text) == t.key
                new.append(Outcome(scheme, t.context, t.depth, t.seed, t.key, text, ok,
                                   sum(s.logprobs), tuple(s.ranks), a.cached_tokens))
            out += new
            if on_group is not None:
                on_group(new)
            if bar is not None:
                bar.update(len(group))
    return out


def summarize(outcomes: Sequence[Outcome], schemes: Sequence[str]) -> list[dict]:
    """Rows ``{scheme, context, depth, accuracy, key_logprob, key_rank, n}`` per (scheme, context, depth),
    then per (scheme, context) with ``depth: "all"``.

    ``accuracy``: fraction of trials whose greedy answer's first number is the key; ``key_logprob``:
    mean over trials of ``log P(key | prompt)``; ``key_rank``: median over trials of the worst rank of
    a key token (1: teacher-forced greedy reproduces the whole key).
    """
    import statistics

    cells: dict[tuple, list[Outcome]] = {}
    for o in outcomes:
        cells.setdefault((o.scheme, o.context, o.depth), []).append(o)
        cells.setdefault((o.scheme, o.context, "all"), []).append(o)
    order = {s: i for i, s in enumerate(schemes)}

    def sort_key(k):
        return (order[k[0]], k[1], 1 if k[2] == "all" else 0, 0 if k[2] == "all" else k[2])

    rows = []
    for k in sorted(cells, key=sort_key):
        os_ = cells[k]
        rows.append({
            "scheme": k[0], "context": k[1], "depth": k[2],
            "accuracy": round(sum(o.correct for o in os_) / len(os_), 4),
            "key_logprob": round(sum(o.key_logprob for o in os_) / len(os_), 4),
            "key_rank": statistics.median(max(o.key_ranks) for o in os_),
            "n": len(os_),
        })  # fmt: skip
    return rows


# --------------------------------------------------------------------------- evidence (harness)
def needle_attention(lm, trial: Trial, scheme, page_size: int = 128,
                     chunk: int = DEFAULT_CHUNK) -> dict:
    """Where the key's predictions look, in the accuracy harness under the engine's semantics.

    The harness (:mod:`kivi_serve.eval.harness`, fp32) runs ``trial.scored`` teacher-forced in the
    steps the engine used (:func:`served_chunks`). Returns ``key_logprob`` (``log P(key | prompt)``),
    the predicted ``digits`` (teacher-forced argmax), and per layer the attention mass on the
    needle's tokens from the queries that predict the key: ``mass`` (mean over query heads) and
    ``mass_max`` (the head that looks most); ``copy`` / ``copy_max``: the same for the mass on the
    token each query should copy (key token ``i`` where the key is written in the needle: finding
    the needle but reading the wrong digit shows as ``mass`` kept and ``copy`` lost); ``sink``: the
    mass on token 0.
    """
    import torch

    from kivi_serve.eval import harness as H

    ids = torch.tensor([trial.scored], dtype=torch.long)
    n = len(trial.prompt)
    rows = list(range(n - 1, n - 1 + len(trial.key_ids)))  # the queries that predict the key
    chunks = served_chunks(trial, chunk, page_size)
    a, b = trial.needle
    k = len(trial.key_ids)
    starts = [s for s in range(a, b - k + 1) if trial.prompt[s : s + k] == trial.key_ids]
    if not starts:
        raise ValueError("the key's tokens do not occur in the needle as in the answer")
    copy_at = torch.zeros(k, len(trial.scored))  # (key token, position): where that token is written
    for s in starts:
        copy_at[torch.arange(k), s + torch.arange(k)] = 1.0
    mass: dict[int, torch.Tensor] = {}
    copy: dict[int, torch.Tensor] = {}
    sink: dict[int, torch.Tensor] = {}

    def observe(d: dict) -> None:
        p = H.attention_rows(d["query"], d["key"], d["k_deq"], d["mask"], d["scaling"], rows, d["attn"])
        mass[d["layer"]] = p[..., a:b].sum(-1).mean(-1).flatten()  # (Hq,): per query head
        copy[d["layer"]] = (p * copy_at.to(p.device)).sum(-1).mean(-1).flatten()
        sink[d["layer"]] = p[..., 0].mean(-1).flatten()

    lp, argmax, _ = H.token_logprobs(lm, ids, scheme, page_size, observer=observe, observer_probs=False,
                                      chunks=chunks, positions=rows)
    def per_layer(x: dict, reduce) -> list[float]:
        return [round(float(reduce(x[i])), 4) for i in sorted(x)]

    return {
        "key_logprob": round(float(lp.sum()), 4),
        "digits": lm.tokenizer.decode(argmax.tolist()),
        "mass": per_layer(mass, torch.mean),
        "mass_max": per_layer(mass, torch.max),
        "copy": per_layer(copy, torch.mean),
        "copy_max": per_layer(copy, torch.max),
        "sink": per_layer(sink, torch.mean),
    }


# --------------------------------------------------------------------------- the task
def _check_grid(contexts: Sequence[int], depths: Sequence[int], seeds: int, max_len: int) -> None:
    if not contexts or not depths:
        raise ValueError("contexts and depths must not be empty")
    for c in contexts:
        if not 256 <= c <= max_len:
            raise ValueError(f"context {c} must be in [256, {max_len}] (the model's context length)")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depth {d} must be a percentage in [0, 100]")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")


def model_context_length(path) -> int:
    """The model's ``max_position_embeddings`` (its context length)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(path)).max_position_embeddings)


def evaluate(
    model: str = "smollm2",
    corpus: str = "hamlet",
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    depths: Sequence[int] = DEFAULT_DEPTHS,
    seeds: int = DEFAULT_SEEDS,
    schemes: Sequence[str] | None = None,
    page_size: int = 128,
    fmt: str = "chat",
    filler: str = "corpus",
    dtype: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    long_schemes: Sequence[str] | None = DEFAULT_LONG_SCHEMES,
    evidence: int = 0,
    device: str = "cpu",
    progress: bool = True,
    checkpoint=None,
    resume: dict | None = None,
) -> dict:
    """Run the passkey grid through one vLLM engine per scheme; return the report.

    ``long_schemes``: the schemes that also run contexts above :data:`LONG_CONTEXT` (``None``: every
    scheme). ``evidence``: for up to that many failed trials of a quantized scheme, also run the
    accuracy harness on the trial for fp16 and that scheme (:func:`needle_attention`).
    ``checkpoint``: called with the report so far (``"partial": True``) after each engine step, so
    that a long grid cut short keeps the trials it finished; ``resume``: such a report (same settings)
    whose trials are kept and not run again. The report's ``seconds`` / ``cpu_seconds`` per scheme are
    the wall time and the process's CPU time (all threads) of its engine runs, summed over resumes.
    """
    import sys
    import time

    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from kivi_serve.eval.harness import read_corpus
    from kivi_serve.model.prepare import resolve_model
    from kivi_serve.quant.layout import SUPPORTED_PAGE_SIZES
    from kivi_serve.quant.schemes import get_scheme

    names = list(schemes) if schemes else list(DEFAULT_SCHEMES)
    for s in [*names, *(long_schemes or ())]:
        get_scheme(s).check_page_size(page_size)  # unknown names, wrong page sizes fail before anything heavy
    if len(set(names)) != len(names):
        raise ValueError(f"schemes must not repeat: {names}")
    if page_size not in SUPPORTED_PAGE_SIZES:
        raise ValueError(f"page_size must be one of {SUPPORTED_PAGE_SIZES}, got {page_size}")
    if chunk < page_size or chunk % page_size:
        raise ValueError(f"chunk must be a multiple of the page size {page_size}, got {chunk}")
    path = resolve_model(model)
    _check_grid(contexts, depths, seeds, model_context_length(path))
    corpus_name, text = read_corpus(corpus)
    tok = AutoTokenizer.from_pretrained(str(path))
    builder = PromptBuilder(tok, text, fmt, filler)
    trials = sorted(builder.grid(contexts, depths, range(seeds)), key=lambda t: (t.context, t.depth, t.seed))
    long_ok = set(names if long_schemes is None else long_schemes)
    settings = dict(model=str(model), corpus=corpus_name, format=fmt, filler=filler, dtype=dtype,
                    page_size=page_size, chunk=chunk)
    outcomes, seconds = _resumed(resume, builder, settings)
    cpu_seconds = dict((resume or {}).get("cpu_seconds", {}))
    prior = list(dict.fromkeys(r["scheme"] for r in (resume or {}).get("results", [])))
    prior += sorted({o.scheme for o in outcomes} - set(prior), key=_scheme_order)
    done = {(o.scheme, o.context, o.depth, o.seed) for o in outcomes}
    plan = {s: [t for t in trials if (t.context <= LONG_CONTEXT or s in long_ok)
                and (s, t.context, t.depth, t.seed) not in done] for s in names}

    def report(partial: bool) -> dict:
        failures = [
            {"scheme": o.scheme, "context": o.context, "depth": o.depth, "seed": o.seed, "key": o.key,
             "answer": o.answer, "digits": o.digits, "key_logprob": round(o.key_logprob, 4),
             "key_ranks": list(o.key_ranks)}
            for o in outcomes if not o.correct
        ]  # fmt: skip
        ran = {o.scheme for o in outcomes}
        order = list(dict.fromkeys([*prior, *names]))  # a resumed report's schemes keep their place
        return {
            "model": str(model),
            "task": "passkey",
            "corpus": corpus_name,
            "corpus_path": str(corpus),
            "format": fmt,
            "filler": filler,
            "dtype": dtype,
            "page_size": page_size,
            "chunk": chunk,
            "long_schemes": sorted(long_ok & set(names), key=names.index),
            "contexts": sorted(set(contexts) | {o.context for o in outcomes}),
            "depths": sorted(set(depths) | {o.depth for o in outcomes}),
            "seeds": max([seeds, *(o.seed + 1 for o in outcomes)]),
            "partial": partial,
            "results": summarize(outcomes, [s for s in order if s in ran]),
            "failures": failures,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "trials": [vars(o) | {"key_ranks": list(o.key_ranks)} for o in outcomes],
        }

    with tqdm(total=sum(map(len, plan.values())), desc="passkey", unit="trial", file=sys.stderr,
              disable=not progress) as bar:
        for s in names:
            if not plan[s]:
                continue
            bar.set_postfix_str(s)
            t0, before = time.perf_counter(), seconds.get(s, 0.0)
            c0, cpu_before = time.process_time(), cpu_seconds.get(s, 0.0)

            def on_group(new: list[Outcome], s=s, t0=t0, before=before, c0=c0, cpu_before=cpu_before) -> None:
                outcomes.extend(new)
                seconds[s] = round(before + time.perf_counter() - t0, 1)
                cpu_seconds[s] = round(cpu_before + time.process_time() - c0, 1)  # all threads
                if checkpoint is not None:
                    checkpoint(report(partial=True))

            run_scheme(path, s, plan[s], tok, dtype=dtype, page_size=page_size, chunk=chunk, bar=bar,
                       on_group=on_group)
    final = report(partial=False)
    if evidence:
        cells = sorted({(o.context, o.depth, o.seed) for o in outcomes})  # a resumed report's too
        final["evidence"] = collect_evidence(path, [builder.trial(*c) for c in cells], outcomes, evidence,
                                             page_size, chunk, device, progress)
    return final


def _scheme_order(name: str) -> tuple[int, str]:
    return (DEFAULT_SCHEMES.index(name) if name in DEFAULT_SCHEMES else len(DEFAULT_SCHEMES), name)


def _resumed(resume: dict | None, builder: PromptBuilder,
             settings: dict) -> tuple[list[Outcome], dict[str, float]]:
    """The outcomes (and seconds) of an earlier report to keep: all its trials, also those of schemes,
    contexts, depths or seeds this run does not ask for (a grid is extended, never cut: run it in
    stages). Its settings must match, and each kept trial's key must be the one this run would build
    (else the trials would not be the same prompts)."""
    if not resume:
        return [], {}
    for k, v in settings.items():
        if str(resume.get(k)) != str(v):
            raise ValueError(f"cannot resume: the saved report has {k}={resume.get(k)!r}, this run {v!r}")
    keys: dict[tuple, str] = {}
    kept = []
    for t in resume.get("trials", []):
        cell = (t["context"], t["depth"], t["seed"])
        if cell not in keys:
            keys[cell] = builder.trial(*cell).key
        if keys[cell] != t["key"]:
            raise ValueError(f"cannot resume: the saved trial {cell} has key {t['key']}, this run builds "
                             f"{keys[cell]} (the corpus or the tokenizer changed)")
        kept.append(Outcome(**(t | {"key_ranks": tuple(t["key_ranks"])})))
    return kept, dict(resume.get("seconds", {}))


def collect_evidence(path, trials: Sequence[Trial], outcomes: Sequence[Outcome], limit: int, page_size: int,
                     chunk: int, device: str, progress: bool) -> list[dict]:
    """:func:`needle_attention` for fp16 and the failing scheme, for up to ``limit`` failed trials
    (``limit < 0``: all): the default 2-bit scheme's first, those fp16 retrieved before the others,
    then the other quantized schemes', then fp16's own failures (``quantized`` is then ``None``)."""
    import sys

    from tqdm.auto import tqdm

    from kivi_serve.eval import harness as H
    from kivi_serve.quant.schemes import DEFAULT_SCHEME, get_scheme

    by_key = {(t.context, t.depth, t.seed): t for t in trials}
    ref_ok = {(o.context, o.depth, o.seed) for o in outcomes if o.scheme == "fp16" and o.correct}
    failed = [o for o in outcomes if not o.correct]
    failed.sort(key=lambda o: (o.scheme == "fp16", o.scheme != DEFAULT_SCHEME,
                               (o.context, o.depth, o.seed) not in ref_ok, o.context, o.depth, o.seed))
    picked = failed if limit < 0 else failed[:limit]
    if not picked:
        return []
    lm = H.load_model(path, device)
    ref_cache: dict[tuple, dict] = {}
    out = []
    for o in tqdm(picked, desc="evidence", unit="trial", file=sys.stderr, disable=not progress):
        k = (o.context, o.depth, o.seed)
        t = by_key[k]
        if k not in ref_cache:
            ref_cache[k] = needle_attention(lm, t, get_scheme("fp16"), page_size, chunk)
        quantized = (None if o.scheme == "fp16"
                     else needle_attention(lm, t, get_scheme(o.scheme), page_size, chunk))
        out.append({"scheme": o.scheme, "context": o.context, "depth": o.depth, "seed": o.seed, "key": o.key,
                    "engine_digits": o.digits, "engine_answer": o.answer, "fp16_engine_correct": k in ref_ok,
                    "fp16": ref_cache[k], "quantized": quantized})
    return out


def evidence_from_report(report: dict, limit: int = -1, device: str = "cpu",
                         progress: bool = True) -> list[dict]:
    """:func:`collect_evidence` for a saved report (``--out PREFIX`` writes it with every trial): the
    trials are rebuilt from the report's settings (same tokenizer, corpus, format, filler, seeds)."""
    from transformers import AutoTokenizer

    from kivi_serve.eval.harness import read_corpus
    from kivi_serve.model.prepare import resolve_model

    path = resolve_model(report["model"])
    corpus = report.get("corpus_path") or "hamlet"
    tok = AutoTokenizer.from_pretrained(str(path))
    builder = PromptBuilder(tok, read_corpus(corpus)[1], report["format"], report["filler"])
    outcomes = [Outcome(**(t | {"key_ranks": tuple(t["key_ranks"])})) for t in report["trials"]]
    trials = [builder.trial(c, d, s) for c, d, s in sorted({(o.context, o.depth, o.seed) for o in outcomes})]
    for o in outcomes:
        t = next(t for t in trials if (t.context, t.depth, t.seed) == (o.context, o.depth, o.seed))
        if t.key != o.key:
            raise ValueError(f"the rebuilt trial {(o.context, o.depth, o.seed)} has key {t.key}, the report "
                             f"{o.key}: not the same prompts (corpus or tokenizer changed)")
    return collect_evidence(path, trials, outcomes, limit, report["page_size"], report["chunk"], device,
                            progress)


# --------------------------------------------------------------------------- output
def render_table(report: dict) -> None:
    """Accuracy (and mean key log-probability) per scheme × context × depth, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    depths = [*report["depths"], "all"]
    t = Table(title=f"passkey · {report['model']} · {report['format']} prompt, {report['filler']} filler · "
                    f"{report['seeds']} seed(s) per cell · accuracy (mean log P(key))")
    t.add_column("scheme")
    t.add_column("context", justify="right")
    for d in depths:
        t.add_column(f"{d} %" if d != "all" else "all", justify="right")
    cells = {(r["scheme"], r["context"], r["depth"]): r for r in report["results"]}
    schemes = list(dict.fromkeys(r["scheme"] for r in report["results"]))
    for s in schemes:
        for c in report["contexts"]:
            if (s, c, "all") not in cells:
                continue
            vals = []
            for d in depths:
                r = cells.get((s, c, d))
                vals.append("—" if r is None else f"{r['accuracy']:.2f} ({r['key_logprob']:.2f})")
            t.add_row(s, str(c), *vals)
    Console().print(t)


def plot_heatmap(report: dict, path) -> None:
    """One panel per scheme: accuracy by context (rows) and depth (columns), with the mean key
    log-probability written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [*report["depths"], "all"]
    contexts = report["contexts"]
    schemes = list(dict.fromkeys(r["scheme"] for r in report["results"]))
    cells = {(r["scheme"], r["context"], r["depth"]): r for r in report["results"]}
    fig, axes = plt.subplots(1, len(schemes), figsize=(3.2 * len(schemes) + 1, 0.55 * len(contexts) + 1.6),
                             squeeze=False, sharey=True)
    for ax, s in zip(axes[0], schemes):
        nan = float("nan")  # a cell not run (a long context for a scheme not in long_schemes)
        grid = [[cells[(s, c, d)]["accuracy"] if (s, c, d) in cells else nan for d in depths]
                for c in contexts]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, c in enumerate(contexts):
            for j, d in enumerate(depths):
                r = cells.get((s, c, d))
                label = "—" if r is None else f"{r['accuracy']:.2f}\n{r['key_logprob']:.1f}"
                ax.text(j, i, label, ha="center", va="center", fontsize=7)
        ax.set_title(s, fontsize=9)
        ax.set_xticks(range(len(depths)), [f"{d}" for d in depths], fontsize=8)
        ax.set_xlabel("needle depth (%)", fontsize=8)
        ax.set_yticks(range(len(contexts)), [str(c) for c in contexts], fontsize=8)
    axes[0][0].set_ylabel("context (tokens)", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"passkey retrieval through vLLM ({report['model']}, {report['seeds']} seed(s) per cell; "
                 "cell: accuracy / mean log P(key); —: not run)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_cli(out: str | None = None, json_out: bool = False, resume: bool = False, **kwargs) -> int:
    """Entry point of ``kivi-serve eval --task passkey``: a rich table, or with ``json_out`` one JSON
    object on the last line of stdout (without the per-trial list); ``out``: also write
    ``out.json`` (the whole report) and ``out.png`` (the heatmap), rewritten after each engine step;
    ``resume``: keep the trials an earlier ``out.json`` already has."""
    import json
    import sys
    from pathlib import Path

    base = Path(out) if out else None

    def save(report: dict) -> None:
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        if report["results"]:
            plot_heatmap(report, base.with_suffix(".png"))

    prior = None
    if resume:
        if base is None:
            raise ValueError("--resume needs --out (the report to resume)")
        if base.with_suffix(".json").is_file():
            prior = json.loads(base.with_suffix(".json").read_text())
    report = evaluate(checkpoint=save if base else None, resume=prior, **kwargs)
    if base:
        save(report)
        print(f"[passkey] wrote {base.with_suffix('.json')} and {base.with_suffix('.png')}", file=sys.stderr)
    if json_out:
        sys.stdout.write(json.dumps({k: v for k, v in report.items() if k != "trials"}) + "\n")
        sys.stdout.flush()
    else:
        render_table(report)
    return 0
