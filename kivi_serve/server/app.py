"""The FastAPI app and the ``kivi-serve serve`` entry point.

    kivi-serve serve --model smollm2 --port 8000          # or: python -m kivi_serve.server ...

The HTTP server listens at once; the engine loads in the background (``/ready`` answers 503 until
it is up). SIGTERM (or Ctrl-C) drains: the server keeps listening, ``/ready`` answers 503
``draining`` and new /v1 requests 503 with Retry-After, while in-flight requests run on for up to
``--drain-timeout`` seconds. Past it they are stopped (a stream ends with an error event and
``[DONE]``, a plain request gets 503) with one warning line. Then the engine stops and the process
exits: 0 if every request finished, 3 if the drain deadline stopped some. A second signal stops
them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from kivi_serve import __version__
from kivi_serve.server.connection import GuardedHttpProtocol
from kivi_serve.server.errors import install_error_handlers
from kivi_serve.server.metrics import ServerMetrics
from kivi_serve.server.middleware import ApiKeyAuth, BodyLimit, RequestContext, configure_access_log
from kivi_serve.server.routes import router
from kivi_serve.server.settings import ServeSettings, SettingsError, parse_args
from kivi_serve.server.state import ServerState, ServingEngine

log = logging.getLogger("kivi_serve.server")

#: Exit codes of run_cli: 0 clean (also after a SIGTERM whose drain finished every request), 1 engine
#: failure, 2 bad usage, 3 stopped at the drain deadline with requests still running (they were cut).
EXIT_OK, EXIT_ENGINE_FAILED, EXIT_USAGE, EXIT_DRAIN_CUT = 0, 1, 2, 3
#: Longest wait for an engine that is still loading when the server is asked to stop.
LOADING_SHUTDOWN_WAIT_S = 180.0
#: After the drain deadline: how long cut requests have to send their last event before uvicorn's
#: own shutdown closes what is left.
CUT_GRACE_S = 3.0


def create_app(settings: ServeSettings | None = None, engine: ServingEngine | None = None) -> FastAPI:
    """The ASGI app. ``engine`` defaults to a :class:`kivi_serve.engine.Engine` built from ``settings``;
    an engine in state ``"new"`` is started in the background by the app's lifespan."""
    settings = settings if settings is not None else ServeSettings()
    if engine is None:
        from kivi_serve.engine import Engine

        # When the engine process gets SIGTERM itself (e.g. sent to the whole process group), it
        # drains for as long as the server does.
        engine = Engine(settings.engine_config(), shutdown_timeout=int(settings.drain_timeout))
    metrics = ServerMetrics()
    state = ServerState(settings=settings, engine=engine, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if engine.state == "new":
            loader = asyncio.create_task(_start_engine(app))
        try:
            yield
        finally:
            state.draining = True
            if loader is not None and not loader.done():
                log.info("waiting for the engine to finish loading before stopping it")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(loader), LOADING_SHUTDOWN_WAIT_S)
            await engine.shutdown()
            state.workers.shutdown(wait=False, cancel_futures=True)
            log.info("engine stopped")

    # /docs serves Swagger UI from fastapi-offline's bundled files: no CDN, works air-gapped.
    app = FastAPIOffline(
        title="kivi-serve",
        version=__version__,
        description="OpenAI-compatible API over vLLM with a 2-bit paged KV cache.",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.kivi = state
    app.state.exit_code = EXIT_OK
    app.state.server = None
    install_error_handlers(app)
    app.include_router(router)
    # Added last = outermost: request id/log, then the API key, then the body limit.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.body_timeout)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(ApiKeyAuth, api_key=api_key)
    app.add_middleware(RequestContext, on_done=metrics.observe_request)
    app.openapi = lambda: _openapi(app, bool(api_key))  # type: ignore[method-assign]
    return app


async def _start_engine(app: FastAPI) -> None:
    engine = app.state.kivi.engine
    try:
        await engine.start()
    except Exception as exc:  # reported, and the server stops with exit code 1
        log.error("engine failed to start: %s: %s", type(exc).__name__, exc)
        app.state.exit_code = EXIT_ENGINE_FAILED
        server = app.state.server
        if server is not None:
            server.should_exit = True


def _openapi(app: FastAPI, with_key: bool) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            # Validation errors are answered 400 in OpenAI's shape, never FastAPI's 422.
            op.get("responses", {}).pop("422", None)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    if with_key:
        schema["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema["paths"].items():
            if path.startswith("/v1"):
                for op in ops.values():
                    op["security"] = [{"bearerAuth": []}]
    app.openapi_schema = schema
    return schema


# ---------------------------------------------------------------------------------------- running
class KiviServer(uvicorn.Server):
    """uvicorn's Server with our shutdown: a signal drains (still listening, new work refused), the
    drain deadline or a second signal cuts what still runs; then uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.kivi_app = app
        self.drain_deadline: float | None = None
        self.cut_at: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler: only flags here; on_tick (in the event loop) acts on them.
        state = self.kivi_app.state.kivi
        name = signal.Signals(sig).name
        if self.drain_deadline is not None:
            log.info("received %s again: stopping in-flight requests now", name)
            self.drain_deadline = time.monotonic()
            return
        state.draining = True
        self.drain_deadline = time.monotonic() + state.settings.drain_timeout
        log.info("received %s: draining in-flight requests (up to %g s)", name, state.settings.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):  # should_exit: the engine failed to start
            return True
        if self.drain_deadline is None:
            return False
        state = self.kivi_app.state.kivi
        if state.admitted == 0:
            return True
        now = time.monotonic()
        if self.cut_at is None and now >= self.drain_deadline:
            self.cut_at = now
            self.kivi_app.state.exit_code = EXIT_DRAIN_CUT
            log.warning(
                "drain timeout (%g s) passed: stopping %d in-flight sequences; streams get an error event",
                state.settings.drain_timeout,
                state.admitted,
            )
            state.cut.set()
        return self.cut_at is not None and now >= self.cut_at + CUT_GRACE_S

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal after a graceful shutdown (exit status 143 for SIGTERM); a
        # drained shutdown is a clean exit, so we only restore the previous handlers and return.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in originals.items():
                signal.signal(s, handler)


def uvicorn_config(app: FastAPI, settings: ServeSettings) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: our HTTP protocol and connection limits, our logs."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=GuardedHttpProtocol,
        log_config=None,
        log_level=settings.log_level,
        access_log=False,  # RequestContext writes the (structured) access log
        timeout_graceful_shutdown=CUT_GRACE_S,  # the drain itself is KiviServer's
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        lifespan="on",
    )
    config.kivi_limits = {  # type: ignore[attr-defined]  (read by GuardedHttpProtocol)
        "header_timeout": settings.header_timeout,
        "max_connections": settings.max_connections,
    }
    return config


def serve(app: FastAPI, settings: ServeSettings) -> int:
    """Run the app with uvicorn until a signal (or an engine failure); returns the exit code."""
    server = KiviServer(uvicorn_config(app, settings), app)
    app.state.server = server
    log.info(
        "kivi-serve %s on http://%s:%d (model %s, backend %s)",
        __version__,
        settings.host,
        settings.port,
        settings.model,
        settings.backend,
    )
    server.run()
    if app.state.kivi.engine.state == "failed" and app.state.exit_code == EXIT_OK:
        return EXIT_ENGINE_FAILED
    return int(app.state.exit_code)


def configure_logging(settings: ServeSettings) -> None:
    level = getattr(logging, settings.log_level.upper())
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("kivi_serve").setLevel(level)
    configure_access_log(settings.access_log)


def preflight(settings: ServeSettings) -> None:
    """Fail fast, before the port opens, on what the user can fix: a missing model, or one whose
    attention kivi-serve does not support (one line naming the feature and the layer kinds)."""
    from kivi_serve.model.prepare import resolve_model
    from kivi_serve.model.support import require_supported

    require_supported(resolve_model(settings.model))


def run_cli(args: list[str]) -> int:
    """``kivi-serve serve ARGS``: parse flags/env/config, check, serve; returns the exit code."""
    try:
        settings = parse_args(list(args))
    except SettingsError as exc:
        print(f"kivi-serve serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings)
    from kivi_serve.model.prepare import ModelError

    try:
        preflight(settings)
    except ModelError as exc:
        print(f"kivi-serve serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return serve(create_app(settings), settings)
