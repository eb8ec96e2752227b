"""Every ``kivi-serve serve`` option, from three places: flags > ``KIVI_SERVE_*`` > ``--config`` YAML.

    kivi-serve serve --port 9000
    KIVI_SERVE_PORT=9000 kivi-serve serve
    kivi-serve serve --config configs/cpu-smollm2.yaml     # port: 9000   (or max-model-len: ...)

The pydantic-settings model :class:`ServeSettings` (the engine's fields and the server's) drives
the argparse parser and its ``--help`` (each field's description); a YAML key is the flag's name
with ``-`` or ``_``.
"""

from __future__ import annotations

import argparse
import contextvars
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from kivi_serve.engine.config import EngineConfig

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
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    api_key: SecretStr | None = Field(
        None,
        description="Require `Authorization: Bearer KEY` on /v1/*, /docs and /openapi.json (default: no "
        "key). Prefer KIVI_SERVE_API_KEY or `api-key:` in the --config file: a flag's value is visible "
        "to every local user in the process list (ps, /proc/PID/cmdline).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    access_log: bool = Field(True, description="One JSON line per request on stderr, with its request id.")
    tokenizer_threads: int = Field(
        2, ge=1, description="Threads that tokenize prompts and render chat templates, off the event loop."
    )
    # -- limits
    max_body_bytes: int = Field(2 * MiB, ge=1024, description="Largest request body; bigger ones get 413.")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest `max_tokens` a request may ask for (default: the context length)."
    )
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per prompt) a request may ask for.")
    max_queue: int = Field(
        256,
        ge=0,
        description="Sequences that may wait beyond the engine's max-num-seqs; more get 429 with "
        "Retry-After.",
    )
    request_timeout: float = Field(
        600.0, gt=0.0, description="Seconds a request may take end to end before it is aborted."
    )
    drain_timeout: float = Field(
        30.0,
        ge=0.0,
        description="On SIGTERM: seconds in-flight requests may take to finish (new ones get 503 "
        "meanwhile); then they are stopped, each stream with an error event. Exit code 0 if all finished, "
        "3 if some were stopped.",
    )
    # -- connections
    header_timeout: float = Field(
        10.0, gt=0.0, description="Seconds a connection may take to send a request's headers (then 408)."
    )
    body_timeout: float = Field(
        30.0, gt=0.0, description="Seconds a request may take to send its body (then 408)."
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0.0, description="Seconds an idle keep-alive connection is kept open between requests."
    )
    max_connections: int = Field(
        512, ge=1, description="Open connections beyond which requests get 503 with Retry-After."
    )

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


#: --help groups: the engine's fields, then these, then the limits.
MODEL, SERVER, LIMITS = "Model and engine", "HTTP server", "Limits"
SERVER_FIELDS = ("host", "port", "api_key", "log_level", "access_log", "tokenizer_threads")
#: Placeholders in --help (other numbers are N; booleans and choices have none).
METAVARS = {
    "model": "PATH",
    "served_model_name": "NAME",
    "gpu_memory_utilization": "FRAC",
    "kv_cache_space": "GIB",
    "dtype": "DTYPE",
    "host": "HOST",
    "port": "PORT",
    "api_key": "KEY",
    "max_body_bytes": "BYTES",
    "request_timeout": "SECONDS",
    "drain_timeout": "SECONDS",
    "header_timeout": "SECONDS",
    "body_timeout": "SECONDS",
    "keep_alive_timeout": "SECONDS",
}

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
    groups = {name: parser.add_argument_group(name) for name in (MODEL, SERVER, LIMITS)}
    for name, field in ServeSettings.model_fields.items():
        group = MODEL if name in EngineConfig.model_fields else SERVER if name in SERVER_FIELDS else LIMITS
        default = _field_default(name)
        shown = "" if default is None else f" (default: {default})"
        kwargs: dict[str, Any] = {
            "dest": name,
            "help": f"{field.description}{shown} [env: {ENV_PREFIX}{name.upper()}]",
        }
        if field.annotation in (bool, bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices := _literal_choices(field.annotation):
            kwargs["choices"] = choices
        else:
            kwargs["metavar"] = METAVARS.get(name, "N")
        groups[group].add_argument("--" + name.replace("_", "-"), **kwargs)
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
