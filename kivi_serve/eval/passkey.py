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
from collections.abc import Iterator, Sequence
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

    @property
    def key_starts(self) -> list[int]:
        """Where the key's tokens are written inside the needle, as the answer spells them: the start
        position in ``prompt`` of each occurrence (empty if the needle spells it differently)."""
        a, b = self.needle
        k = len(self.key_ids)
        return [s for s in range(a, b - k + 1) if self.prompt[s : s + k] == self.key_ids]


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
#: The grid of ``kivi-serve eval --task passkey``, sized to finish in 25 minutes on 2 CPU cores
#: (docs/accuracy.md, "What the default grid costs"): fp16 against the default 2-bit format, every
#: context up to 8K, more keys where a trial is cheap (:func:`default_seeds`).
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_SCHEMES = ("fp16", "kivi-serve-2bit")
#: The scheme every other one is paired with (vLLM's own backend, unquantized).
REFERENCE = "fp16"
#: Tokens per engine step: vLLM's serving default on CPU (``kivi-serve serve``'s default there).
DEFAULT_CHUNK = 2048
#: Contexts above this run only the ``long_schemes`` (every scheme by default).
LONG_CONTEXT = 4096
#: Default keys per cell: ``SEED_TOKENS // context`` seeds, at least 1, at most :data:`MAX_SEEDS`.
SEED_TOKENS = 4096
MAX_SEEDS = 4


def default_seeds(context: int) -> int:
    """Seeds (keys) per (context, depth) cell by default: 4 at 1K, 2 at 2K, 1 at 4K and 8K.

    A trial's cost grows faster than its context (attention is quadratic), and at 1K–2K the 2-bit
    formats miss by a single digit on single trials, so the cheap contexts get more keys.
    """
    return min(MAX_SEEDS, max(1, SEED_TOKENS // context))


def seeds_per_context(contexts: Sequence[int], seeds: int | None) -> dict[int, int]:
    """``{context: seeds}``: ``seeds`` at every context, or ``None``: :func:`default_seeds`."""
    return {c: default_seeds(c) if seeds is None else seeds for c in contexts}


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


#: The issue's retrieval bar against fp16 on the same prompts: accuracy at most 5 points lower, the
#: mean key log-probability within 0.5 nats.
BAR_ACCURACY = 0.05
BAR_NATS = 0.5
#: Confidence level of the intervals in the report.
CONFIDENCE = 0.95


def _ci(values: Sequence[float]) -> list[float] | None:
    """Student-t interval (:data:`CONFIDENCE`) of the mean of ``values``; ``None`` below 2 values."""
    import statistics

    from scipy import stats

    if len(values) < 2:
        return None
    m, se = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
    h = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * se
    return [round(m - h, 4), round(m + h, 4)]


def paired(outcomes: Sequence[Outcome], ref: Sequence[Outcome]) -> dict:
    """A scheme's trials against the reference's on the same prompts (same context, depth and seed).

    Returns ``n_paired``; ``accuracy_delta`` (scheme − reference, over the paired trials), ``lost`` /
    ``gained`` (trials only the reference / only the scheme retrieves) and ``mcnemar_p`` (exact
    two-sided McNemar test: are the discordant trials lopsided beyond chance); ``key_logprob_delta``
    (mean of the per-prompt difference of ``log P(key)``) and its Student-t interval
    ``key_logprob_delta_ci``; ``meets_bar``: ``accuracy_delta >= -0.05`` and
    ``|key_logprob_delta| <= 0.5`` (point estimates; the intervals say how firmly). Empty without
    any pair.
    """
    from scipy import stats

    by_cell = {(o.context, o.depth, o.seed): o for o in ref}
    cell = [(o.context, o.depth, o.seed) for o in outcomes]
    pairs = [(o, by_cell[c]) for o, c in zip(outcomes, cell) if c in by_cell]
    if not pairs:
        return {}
    n = len(pairs)
    lost = sum(r.correct and not o.correct for o, r in pairs)
    gained = sum(o.correct and not r.correct for o, r in pairs)
    deltas = [o.key_logprob - r.key_logprob for o, r in pairs]
    acc_delta, lp_delta = (gained - lost) / n, sum(deltas) / n
    return {
        "n_paired": n,
        "accuracy_delta": round(acc_delta, 4),
        "lost": lost,
        "gained": gained,
        "mcnemar_p": round(float(stats.binomtest(lost, lost + gained).pvalue), 4) if lost + gained else 1.0,
        "key_logprob_delta": round(lp_delta, 4),
        "key_logprob_delta_ci": _ci(deltas),
        "meets_bar": bool(acc_delta >= -BAR_ACCURACY and abs(lp_delta) <= BAR_NATS),
    }


def summarize(outcomes: Sequence[Outcome], schemes: Sequence[str], reference: str = REFERENCE) -> list[dict]:
    """Rows ``{scheme, context, depth, accuracy, accuracy_ci, key_logprob, key_rank, n}`` per (scheme,
    context, depth), then per (scheme, context) with ``depth: "all"``; for a scheme other than
    ``reference`` also its comparison with the reference on the same prompts (:func:`paired`).

    ``accuracy``: fraction of trials whose greedy answer's first number is the key, with its Wilson
    interval ``accuracy_ci``; ``key_logprob``: mean over trials of ``log P(key | prompt)``;
    ``key_rank``: median over trials of the worst rank of a key token (1: teacher-forced greedy
    reproduces the whole key).
    """
    import statistics

    from scipy import stats

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
        hits = sum(o.correct for o in os_)
        ci = stats.binomtest(hits, len(os_)).proportion_ci(CONFIDENCE, method="wilson")
        row = {
            "scheme": k[0], "context": k[1], "depth": k[2],
            "accuracy": round(hits / len(os_), 4),
            "accuracy_ci": [round(ci.low, 4), round(ci.high, 4)],
            "key_logprob": round(sum(o.key_logprob for o in os_) / len(os_), 4),
            "key_rank": statistics.median(max(o.key_ranks) for o in os_),
            "n": len(os_),
        }  # fmt: skip
        if k[0] != reference:
            row |= paired(os_, cells.get((reference, *k[1:]), []))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- evidence (harness)
def needle_attention(lm, trial: Trial, scheme, page_size: int = 128,
                     chunk: int = DEFAULT_CHUNK, layers=None) -> dict:
    """Where the key's predictions look, in the accuracy harness under the engine's semantics.

    The harness (:mod:`kivi_serve.eval.harness`, fp32) runs ``trial.scored`` teacher-forced in the
    steps the engine used (:func:`served_chunks`). Returns ``key_logprob`` (``log P(key | prompt)``),
    the predicted ``digits`` (teacher-forced argmax), and per layer the attention mass on the
    needle's tokens from the queries that predict the key: ``mass`` (mean over query heads) and
    ``mass_max`` (the head that looks most); ``copy`` / ``copy_max``: the same for the mass on the
    token each query should copy (key token ``i`` where the key is written in the needle: finding
    the needle but reading the wrong digit shows as ``mass`` kept and ``copy`` lost); ``sink``: the
    mass on token 0. ``layers``: ``{layer index: scheme}`` overriding ``scheme`` in those layers (a
    study of which layers lose the key; the server has one scheme for all layers).
    """
    import torch

    from kivi_serve.eval import harness as H

    ids = torch.tensor([trial.scored], dtype=torch.long)
    n = len(trial.prompt)
    rows = list(range(n - 1, n - 1 + len(trial.key_ids)))  # the queries that predict the key
    chunks = served_chunks(trial, chunk, page_size)
    a, b = trial.needle
    k = len(trial.key_ids)
    starts = trial.key_starts
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
                                      chunks=chunks, positions=rows, layers=layers)
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


def layer_bands(n_layers: int, bands: int = 4) -> dict[str, list[int]]:
    """The model's layers in ``bands`` consecutive groups of (nearly) equal size: ``{"0-7": [0..7], ...}``."""
    edges = [round(i * n_layers / bands) for i in range(bands + 1)]
    return {f"{a}-{b - 1}": list(range(a, b)) for a, b in zip(edges, edges[1:]) if b > a}


def ablate(lm, trial: Trial, scheme, page_size: int, chunk: int = DEFAULT_CHUNK,
           groups: dict[str, list[int]] | None = None) -> Iterator[dict]:
    """Which part of ``scheme``'s pages costs the key on ``trial`` (harness, engine steps, fp32).

    Rows ``{variant, key_logprob, digits, correct}`` (teacher-forced: ``digits`` is the argmax at each
    key position, ``correct`` all of them right) for: ``fp16``; ``scheme``; ``scheme`` with its keys
    read back exact (``K exact``: only the values quantized) and with its values exact (``V exact``);
    and, for each layer group of ``groups`` (default: :func:`layer_bands` of the model, 4 bands),
    ``scheme`` with those layers unquantized (``exact in <group>``) and with *only* those layers
    quantized (``only <group>``; left out where it is the same layer set as an earlier variant, e.g.
    with two groups that cover the model). A variant that recovers the key points at where the loss
    is. Rows are yielded as they are measured (a quantized 1K pass costs a CPU-minute or more).
    """
    import dataclasses

    from kivi_serve.quant.schemes import get_scheme

    fp16 = get_scheme(REFERENCE)
    n_layers = int(lm.model.config.num_hidden_layers)
    groups = groups if groups is not None else layer_bands(n_layers)
    variants = [("fp16", fp16, None), (scheme.name, scheme, None),
                ("K exact", dataclasses.replace(scheme, keep_exact=("k",)), None),
                ("V exact", dataclasses.replace(scheme, keep_exact=("v",)), None)]
    seen = [frozenset()]  # the unquantized layers of each layer variant so far
    for name, layers in groups.items():
        rest = set(range(n_layers)) - set(layers)
        for label, exact in ((f"exact in {name}", set(layers)), (f"only {name}", rest)):
            if frozenset(exact) not in seen:
                seen.append(frozenset(exact))
                variants.append((label, scheme, dict.fromkeys(sorted(exact), fp16)))
    runs = key_logprobs(lm, trial, [(sch, page_size, layers) for _, sch, layers in variants], chunk)
    for (name, _, _), row in zip(variants, runs):
        yield {"variant": name} | row


def key_logprob(lm, trial: Trial, scheme, page_size: int, chunk: int = DEFAULT_CHUNK, layers=None) -> dict:
    """``{key_logprob, digits, correct}`` of ``trial`` under ``scheme`` in the harness, in the engine's
    steps: ``log P(key | prompt)``, the teacher-forced argmax at the key's positions, and whether it
    is the key (``layers``: see :func:`needle_attention`)."""
    return next(key_logprobs(lm, trial, [(scheme, page_size, layers)], chunk))


def key_logprobs(lm, trial: Trial, variants: Sequence[tuple], chunk: int = DEFAULT_CHUNK) -> Iterator[dict]:
    """:func:`key_logprob` of ``trial`` under each ``(scheme, page_size, layers)`` of ``variants``, yielded
    in order. The engine's first step (the document up to ``chunk`` tokens) reads no finalised page, so it
    is computed once, exactly (:func:`kivi_serve.eval.harness.prefix_cache`), and shared by every variant
    with the same first step: up to 2K tokens a further variant costs only the question's tokens."""
    import torch

    from kivi_serve.eval import harness as H

    ids = torch.tensor([trial.scored], dtype=torch.long)
    rows = list(range(len(trial.prompt) - 1, len(trial.prompt) - 1 + len(trial.key_ids)))
    prefixes: dict[int, object] = {}
    for scheme, page_size, layers in variants:
        chunks = served_chunks(trial, chunk, page_size)
        past = None
        if len(chunks) > 1:
            if chunks[1] not in prefixes:
                prefixes[chunks[1]] = H.prefix_cache(lm, ids, chunks[1])
            past = prefixes[chunks[1]]
        lp, argmax, _ = H.token_logprobs(lm, ids, scheme, page_size, chunks=chunks, positions=rows,
                                          layers=layers, past=past)
        yield {"key_logprob": round(float(lp.sum()), 4), "digits": lm.tokenizer.decode(argmax.tolist()),
               "correct": argmax.tolist() == list(trial.key_ids)}


# --------------------------------------------------------------------------- the task
def _check_grid(contexts: Sequence[int], depths: Sequence[int], seeds: int | None, max_len: int) -> None:
    if not contexts or not depths:
        raise ValueError("contexts and depths must not be empty")
    for c in contexts:
        if not 256 <= c <= max_len:
            raise ValueError(f"context {c} must be in [256, {max_len}] (the model's context length)")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depth {d} must be a percentage in [0, 100]")
    if seeds is not None and seeds < 1:
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
    seeds: int | None = None,
    schemes: Sequence[str] | None = None,
    page_size: int | None = None,
    fmt: str = "chat",
    filler: str = "corpus",
    dtype: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    long_schemes: Sequence[str] | None = None,
    evidence: int = 0,
    device: str = "cpu",
    progress: bool = True,
    checkpoint=None,
    resume: dict | None = None,
) -> dict:
    """Run the passkey grid through one vLLM engine per scheme; return the report.

    ``seeds``: keys per (context, depth) cell (``None``: :func:`default_seeds`, by context).
    ``page_size``: every scheme's page size (``None``: each scheme's own, 128 unless the scheme is
    defined for another; fp16's results do not depend on it, so one fp16 run pairs with all).
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
    from kivi_serve.quant.schemes import REFERENCE_SCHEMES, get_scheme

    names = list(schemes) if schemes else list(DEFAULT_SCHEMES)
    if len(set(names)) != len(names):
        raise ValueError(f"schemes must not repeat: {names}")
    if page_size is not None and page_size not in SUPPORTED_PAGE_SIZES:
        raise ValueError(f"page_size must be one of {SUPPORTED_PAGE_SIZES}, got {page_size}")
    pages = {}
    for s in [*names, *(long_schemes or ())]:  # unknown names, wrong page sizes fail before anything heavy
        pages[s] = get_scheme(s).default_page_size if page_size is None else page_size
        get_scheme(s).check_page_size(pages[s])
        if s in REFERENCE_SCHEMES:
            raise ValueError(f"scheme {s!r} is implemented in the reference only (the kernels, hence "
                             "the engine, do not serve it yet): use --task ppl or scripts/study.py prkey")
    for p in set(pages.values()):
        if chunk < p or chunk % p:
            raise ValueError(f"chunk must be a multiple of the page size {p}, got {chunk}")
    path = resolve_model(model)
    _check_grid(contexts, depths, seeds, model_context_length(path))
    corpus_name, text = read_corpus(corpus)
    tok = AutoTokenizer.from_pretrained(str(path))
    builder = PromptBuilder(tok, text, fmt, filler)
    n_seeds = seeds_per_context(contexts, seeds)
    trials = [builder.trial(c, d, s)
              for c in sorted(contexts) for d in sorted(depths) for s in range(n_seeds[c])]  # fmt: skip
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
            "seeds": {str(c): max([n_seeds.get(c, 0), *(o.seed + 1 for o in outcomes if o.context == c)])
                      for c in sorted(set(contexts) | {o.context for o in outcomes})},
            "reference": REFERENCE,
            "page_sizes": {s: pages.get(s) or page_size or get_scheme(s).default_page_size for s in order},
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

            run_scheme(path, s, plan[s], tok, dtype=dtype, page_size=pages[s], chunk=chunk, bar=bar,
                       on_group=on_group)
    final = report(partial=False)
    if evidence:
        cells = sorted({(o.context, o.depth, o.seed) for o in outcomes})  # a resumed report's too
        final["evidence"] = collect_evidence(path, [builder.trial(*c) for c in cells], outcomes, evidence,
                                             final["page_sizes"], chunk, device, progress)
    return final


def _scheme_order(name: str) -> tuple[int, str]:
    from kivi_serve.quant.schemes import SCHEMES

    known = [REFERENCE, *DEFAULT_SCHEMES, *SCHEMES]
    return (known.index(name) if name in known else len(known), name)


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


def collect_evidence(path, trials: Sequence[Trial], outcomes: Sequence[Outcome], limit: int,
                     page_sizes: dict[str, int], chunk: int, device: str, progress: bool) -> list[dict]:
    """:func:`needle_attention` for fp16 and the failing scheme, for up to ``limit`` failed trials
    (``limit < 0``: all): the default 2-bit scheme's first, those fp16 retrieved before the others,
    then the other quantized schemes', then fp16's own failures (``quantized`` is then ``None``).
    ``page_sizes``: each scheme's page size in the engine (fp16 runs in the failing scheme's steps)."""
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
        t, page_size = by_key[k], page_sizes[o.scheme]
        if (k, page_size) not in ref_cache:
            ref_cache[k, page_size] = needle_attention(lm, t, get_scheme("fp16"), page_size, chunk)
        quantized = (None if o.scheme == "fp16"
                     else needle_attention(lm, t, get_scheme(o.scheme), page_size, chunk))
        out.append({"scheme": o.scheme, "context": o.context, "depth": o.depth, "seed": o.seed, "key": o.key,
                    "engine_digits": o.digits, "engine_answer": o.answer, "fp16_engine_correct": k in ref_ok,
                    "fp16": ref_cache[k, page_size], "quantized": quantized})
    return out


def report_trials(report: dict) -> tuple[object, list[Trial], list[Outcome]]:
    """``(model path, trials, outcomes)`` of a saved report (``--out PREFIX`` writes it with every
    trial): the prompts rebuilt from its settings (same tokenizer, corpus, format, filler, seeds), each
    checked against the key the report saved."""
    from transformers import AutoTokenizer

    from kivi_serve.eval.harness import read_corpus
    from kivi_serve.model.prepare import resolve_model

    path = resolve_model(report["model"])
    corpus = report.get("corpus_path") or "hamlet"
    tok = AutoTokenizer.from_pretrained(str(path))
    builder = PromptBuilder(tok, read_corpus(corpus)[1], report["format"], report["filler"])
    outcomes = [Outcome(**(t | {"key_ranks": tuple(t["key_ranks"])})) for t in report["trials"]]
    trials = [builder.trial(c, d, s) for c, d, s in sorted({(o.context, o.depth, o.seed) for o in outcomes})]
    by_cell = {(t.context, t.depth, t.seed): t for t in trials}
    for o in outcomes:
        t = by_cell[(o.context, o.depth, o.seed)]
        if t.key != o.key:
            raise ValueError(f"the rebuilt trial {(o.context, o.depth, o.seed)} has key {t.key}, the report "
                             f"{o.key}: not the same prompts (corpus or tokenizer changed)")
    return path, trials, outcomes


def evidence_from_report(report: dict, limit: int = -1, device: str = "cpu",
                         progress: bool = True) -> list[dict]:
    """:func:`collect_evidence` for a saved report (:func:`report_trials`)."""
    path, trials, outcomes = report_trials(report)
    schemes = {o.scheme for o in outcomes}
    pages = report.get("page_sizes") or dict.fromkeys(schemes, report["page_size"])  # older reports: one size
    return collect_evidence(path, trials, outcomes, limit, pages, report["chunk"], device, progress)


def failed_trials(report: dict, scheme: str) -> list[tuple[Outcome, Trial]]:
    """``scheme``'s failed trials of a saved report with their rebuilt prompts, in grid order."""
    _, trials, outcomes = report_trials(report)
    by_cell = {(t.context, t.depth, t.seed): t for t in trials}
    return [(o, by_cell[(o.context, o.depth, o.seed)])
            for o in outcomes if o.scheme == scheme and not o.correct]  # fmt: skip


# --------------------------------------------------------------------------- output
def seeds_text(report: dict) -> str:
    """The keys per cell of a report: ``"4 at 1024, 2 at 2048"`` (older reports: one number)."""
    seeds = report["seeds"]
    if isinstance(seeds, int):
        return str(seeds)
    return ", ".join(f"{n} at {c}" for c, n in seeds.items())


def _interval(ci: list[float] | None, fmt: str) -> str:
    return "" if ci is None else f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def render_table(report: dict) -> None:
    """Accuracy (and mean key log-probability) per scheme × context × depth, then each scheme against
    the reference on the same prompts, as rich tables."""
    from rich.console import Console
    from rich.table import Table

    depths = [*report["depths"], "all"]
    t = Table(title=f"passkey · {report['model']} · {report['format']} prompt, {report['filler']} filler · "
                    f"seeds (keys) per cell: {seeds_text(report)} · accuracy (mean log P(key))")
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
    ref = report.get("reference", REFERENCE)
    p = Table(title=f"against {ref} on the same prompts ({CONFIDENCE:.0%} intervals; bar: accuracy ≥ {ref}'s "
                    f"− {BAR_ACCURACY * 100:.0f} points, mean Δ log P(key) within {BAR_NATS} nats)")
    for col in ("scheme", "context", "n", "accuracy", f"{ref}", "Δ accuracy (lost/gained, McNemar p)",
                "Δ log P(key)", "bar"):
        p.add_column(col, justify="left" if col == "scheme" else "right")
    for r in report["results"]:
        if r["depth"] != "all" or "n_paired" not in r:
            continue
        base = cells[(ref, r["context"], "all")]
        p.add_row(
            r["scheme"], str(r["context"]), str(r["n_paired"]),
            f"{r['accuracy']:.2f}{_interval(r['accuracy_ci'], '.2f')}", f"{base['accuracy']:.2f}",
            f"{r['accuracy_delta']:+.2f} ({r['lost']}/{r['gained']}, p={r['mcnemar_p']:.2f})",
            f"{r['key_logprob_delta']:+.2f}{_interval(r['key_logprob_delta_ci'], '+.2f')}",
            "met" if r["meets_bar"] else "not met",
        )  # fmt: skip
    if p.row_count:
        Console().print(p)


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
                if r is not None and d == "all" and "key_logprob_delta" in r:
                    label += f"\nΔ{r['key_logprob_delta']:+.1f}"
                ax.text(j, i, label, ha="center", va="center", fontsize=7)
        ax.set_title(s, fontsize=9)
        ax.set_xticks(range(len(depths)), [f"{d}" for d in depths], fontsize=8)
        ax.set_xlabel("needle depth (%)", fontsize=8)
        ax.set_yticks(range(len(contexts)), [str(c) for c in contexts], fontsize=8)
    axes[0][0].set_ylabel("context (tokens)", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"passkey retrieval through vLLM ({report['model']}; keys per cell: {seeds_text(report)})\n"
                 f"cell: accuracy / mean log P(key); all: also Δ vs {report.get('reference', REFERENCE)} "
                 "on the same prompts; —: not run", fontsize=9, y=1.04)  # two lines: above the panel titles
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
