"""Every ``kivi-serve serve`` option, from three places: flags > ``KIVI_SERVE_*`` > ``--config`` YAML.

    kivi-serve serve --port 9000
    KIVI_SERVE_PORT=9000 kivi-serve serve
    kivi-serve serve --config configs/cpu-smollm2.yaml     # port: 9000   (or max-model-len: ...)

One table (:data:`OPTIONS`) drives the pydantic-settings model, the argparse parser and its
``--help``; a YAML key is the flag's name with ``-`` or ``_``.
"""

from __future__ import annotations

import argparse
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from kivi_serve.config import EMBEDDED_MODEL
from kivi_serve.engine.config import EngineConfig
from kivi_serve.quant.layout import SUPPORTED_PAGE_SIZES

ENV_PREFIX = "KIVI_SERVE_"
MiB = 1 << 20

_YAML_VALUES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "kivi_yaml", default=None
)


class SettingsError(ValueError):
    """A bad flag, environment variable or config file; the message names which."""


class ServeSettings(EngineConfig, BaseSettings):
    """The server's settings: the engine's (:class:`EngineConfig`, inherited field by field) and the
    HTTP server's. Field names are the flags without ``--`` (``_`` for ``-``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # -- HTTP server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # -- limits
    max_body_bytes: int = Field(2 * MiB, ge=1024)
    max_tokens_limit: int | None = Field(None, ge=1)
    max_n: int = Field(8, ge=1)
    max_queue: int = Field(256, ge=0)
    request_timeout: float = Field(600.0, gt=0.0)
    drain_timeout: float = Field(30.0, ge=0.0)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Flags (init kwargs) > environment > YAML config file > defaults.
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, init_kwargs=dict(_YAML_VALUES.get() or {})),
        )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(include=set(EngineConfig.model_fields)))


@dataclass(frozen=True)
class Option:
    """One flag: its help text, metavar and argparse group."""

    name: str
    group: str
    help: str
    metavar: str | None = None


MODEL, SERVER, LIMITS = "Model and engine", "HTTP server", "Limits"
PAGE_SIZES = ", ".join(map(str, SUPPORTED_PAGE_SIZES))
OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        MODEL,
        f"Model folder (Hugging Face layout), or '{EMBEDDED_MODEL}' for the embedded SmolLM2-135M-Instruct.",
        "PATH",
    ),
    Option(
        "served_model_name", MODEL, "Model name clients pass as `model` (default: the model's name).", "NAME"
    ),
    Option(
        "backend",
        MODEL,
        "KV cache: 'kivi' (2-bit paged, this project) or 'default' (vLLM's own, bf16; for comparison).",
    ),
    Option("page_size", MODEL, f"Tokens per KV page = vLLM block size (kivi: {PAGE_SIZES}).", "N"),
    Option(
        "max_model_len", MODEL, "Context length in tokens (prompt + completion); default: the model's.", "N"
    ),
    Option(
        "gpu_memory_utilization",
        MODEL,
        "GPU only: fraction of GPU memory for weights, activations and KV cache.",
        "FRAC",
    ),
    Option("tensor_parallel_size", MODEL, "Number of GPUs to shard each layer over.", "N"),
    Option("pipeline_parallel_size", MODEL, "Number of pipeline stages.", "N"),
    Option(
        "kv_cache_space",
        MODEL,
        "CPU only: KV cache budget in GiB (default: VLLM_CPU_KVCACHE_SPACE, else 2).",
        "GIB",
    ),
    Option(
        "max_num_seqs",
        MODEL,
        "Most sequences the engine runs at once (default: with backend 'kivi' on CPU, as many as keep "
        "the staging pool within 1/16 of the KV budget, at most 128; else vLLM's).",
        "N",
    ),
    Option("max_num_batched_tokens", MODEL, "Most tokens per engine step (default: vLLM's).", "N"),
    Option("enable_prefix_caching", MODEL, "Reuse KV pages of identical prompt prefixes (default: vLLM's)."),
    Option("seed", MODEL, "Engine random seed (a request's `seed` overrides it for that request).", "N"),
    Option("dtype", MODEL, "Model weights/activations dtype: auto, bfloat16, float16, float32.", "DTYPE"),
    Option(
        "enforce_eager", MODEL, "Run the model eagerly, no torch.compile / CUDA graphs (default: on for CPU)."
    ),
    Option("host", SERVER, "Address to listen on.", "HOST"),
    Option("port", SERVER, "Port to listen on.", "PORT"),
    Option("api_key", SERVER, "Require `Authorization: Bearer KEY` on /v1/* (default: no key).", "KEY"),
    Option("log_level", SERVER, "Log level."),
    Option("access_log", SERVER, "One JSON line per request on stderr, with its request id."),
    Option("max_body_bytes", LIMITS, "Largest request body; bigger ones get 413.", "BYTES"),
    Option(
        "max_tokens_limit",
        LIMITS,
        "Largest `max_tokens` a request may ask for (default: the context length).",
        "N",
    ),
    Option("max_n", LIMITS, "Largest `n` (choices per prompt) a request may ask for.", "N"),
    Option(
        "max_queue",
        LIMITS,
        "Sequences that may wait beyond the engine's max-num-seqs; more get 429 with Retry-After.",
        "N",
    ),
    Option(
        "request_timeout", LIMITS, "Seconds a request may take end to end before it is aborted.", "SECONDS"
    ),
    Option(
        "drain_timeout",
        LIMITS,
        "On SIGTERM: seconds in-flight requests may take to finish before they are "
        "aborted; then the server exits 0.",
        "SECONDS",
    ),
)

DESCRIPTION = (
    "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models) "
    "with vLLM and kivi-serve's 2-bit paged KV cache; Prometheus metrics on /metrics."
)
EPILOG = (
    "Every option can also be set in the environment as KIVI_SERVE_<OPTION> (e.g. "
    "KIVI_SERVE_MAX_MODEL_LEN=4096) or in the --config YAML file (e.g. `max-model-len: 4096`). Flags win "
    "over the environment, the environment over the file."
)


def _field_default(name: str) -> Any:
    value = ServeSettings.model_fields[name].default
    if isinstance(value, SecretStr):
        return "***"
    return value


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=100)


def build_parser(prog: str = "kivi-serve serve") -> argparse.ArgumentParser:
    """The ``serve`` parser; only flags the user gave end up in the namespace (no defaults)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", metavar="FILE", type=Path, help="YAML file with any of the options below."
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS:
        group = groups.get(opt.group) or groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        field = ServeSettings.model_fields[opt.name]
        flag = "--" + opt.name.replace("_", "-")
        default = _field_default(opt.name)
        env = ENV_PREFIX + opt.name.upper()
        shown = "" if default is None else f" (default: {default})"
        help_text = f"{opt.help}{shown} [env: {env}]"
        annotation = field.annotation
        kwargs: dict[str, Any] = {"dest": opt.name, "help": help_text}
        if annotation in (bool, bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = _literal_choices(annotation)
            if choices:
                kwargs["choices"] = choices
            else:
                kwargs["metavar"] = opt.metavar
        group.add_argument(flag, **kwargs)
    return parser


def _literal_choices(annotation: Any) -> list[str] | None:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is Literal and args:
        return list(args)
    return None


def read_yaml_config(path: Path) -> dict[str, Any]:
    """Read a ``--config`` file: a mapping of option names (``-`` or ``_``) to values."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must be a mapping of option: value")
    known = set(ServeSettings.model_fields)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise SettingsError(f"config file {path}: unknown option '{key}'")
        out[name] = value
    return out


def load_settings(cli: dict[str, Any] | None = None, config: Path | None = None) -> ServeSettings:
    """Merge flags (``cli``, only those given), ``KIVI_SERVE_*`` and the YAML file ``config``."""
    cli = dict(cli or {})
    if config is None:
        import os

        env_config = os.environ.get(ENV_PREFIX + "CONFIG")
        config = Path(env_config) if env_config else None
    yaml_values = read_yaml_config(config) if config is not None else {}
    token = _YAML_VALUES.set(yaml_values)
    try:
        return ServeSettings(**cli)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
    finally:
        _YAML_VALUES.reset(token)


def parse_args(args: list[str]) -> ServeSettings:
    """``kivi-serve serve`` arguments → settings (argparse exits 2 itself on a bad flag)."""
    ns = vars(build_parser().parse_args(args))
    config = ns.pop("config", None)
    return load_settings(ns, config)
