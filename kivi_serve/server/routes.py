"""The HTTP endpoints: OpenAI's /v1 subset, plus /health, /ready, /version and /metrics.

A /v1 request is validated into a job (:mod:`~kivi_serve.server.jobs`) and run
(:mod:`~kivi_serve.server.running`), which renders it (:mod:`~kivi_serve.server.render`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kivi_serve import __version__
from kivi_serve.server.body import JSONBodyRoute
from kivi_serve.server.jobs import chat_job, check_model, completion_job, require_engine
from kivi_serve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    ReadyResponse,
    VersionResponse,
)
from kivi_serve.server.running import run_job
from kivi_serve.server.state import ServerState, state_of


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse} for code in codes}


V1_ERRORS = _errors(400, 401, 404, 413, 429, 503, 504)
router = APIRouter(route_class=JSONBodyRoute)


# ------------------------------------------------------------------------------------------- routes
# One server-sent event (how OpenAPI tools such as Schemathesis read a text/event-stream body: event
# by event). ``data`` is a chunk's JSON, or ``[DONE]`` for the last event.
_STREAM_DOC = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "One server-sent event: `data: <chunk JSON>`; "
            "the stream ends with `data: [DONE]`.",
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
            "required": ["data"],
        }
    }
}


def _v1_post(path: str, response_model: type, stream_model: type, what: str):
    """``POST path`` answering ``response_model``, or with ``stream: true`` ``stream_model`` events."""
    description = f"A {what}, or with `stream: true` a stream of {stream_model.__name__} events."
    return router.post(
        path,
        response_model=response_model,
        responses={**V1_ERRORS, 200: {"content": _STREAM_DOC, "description": description}},
        tags=["OpenAI"],
    )


@_v1_post("/v1/completions", CompletionResponse, CompletionStreamResponse, "completion")
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Create a completion for one prompt or a batch (text or token ids)."""
    state = state_of(request)
    return await run_job(state, request, await completion_job(state, body))


@_v1_post("/v1/chat/completions", ChatCompletionResponse, ChatCompletionStreamResponse, "chat completion")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Create a chat completion; the messages go through the model's chat template."""
    state = state_of(request)
    return await run_job(state, request, await chat_job(state, body))


def _model_card(state: ServerState) -> dict:
    engine = state.engine
    return ModelCard(
        id=engine.model_name,
        created=int(state.started),
        root=engine.model_name,  # not the model's path: it would show the server's file system
        max_model_len=engine.max_model_len or None,
    ).model_dump()


@router.get("/v1/models", response_model=ModelList, responses=_errors(401, 503), tags=["OpenAI"])
async def list_models(request: Request) -> dict:
    """The served model."""
    state = state_of(request)
    require_engine(state)
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model}", response_model=ModelCard, responses=_errors(401, 404, 503), tags=["OpenAI"])
async def get_model(model: str, request: Request) -> dict:
    state = state_of(request)
    require_engine(state)
    check_model(state, model)
    return _model_card(state)


@router.get(
    "/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["ops"]
)
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the process and its engine are alive (also while loading)."""
    engine = state_of(request).engine
    if engine.state == "failed" or (engine.ready and not engine.healthy):
        return JSONResponse({"status": "failed", "detail": engine.error}, status_code=503)
    return JSONResponse({"status": "ok", "detail": None})


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, tags=["ops"])
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded; 503 while loading, draining or failed."""
    state = state_of(request)
    engine = state.engine
    if state.draining:
        return JSONResponse({"status": "draining", "detail": None}, status_code=503)
    if engine.ready and engine.healthy:
        return JSONResponse({"status": "ready", "detail": None})
    status = {"failed": "failed", "stopped": "stopped", "stopping": "draining"}.get(engine.state, "loading")
    return JSONResponse(
        {"status": status, "detail": engine.error},
        status_code=503,
        headers={"Retry-After": "5"} if status == "loading" else None,
    )


@router.get("/version", response_model=VersionResponse, tags=["ops"])
async def version(request: Request) -> dict:
    """kivi-serve and vLLM versions; with the API key (or on a server without one), also what the
    engine runs (backend, attention impl, cache dtype, limits)."""
    engine = state_of(request).engine
    out = {"version": __version__, "vllm_version": engine.vllm_version or None, "engine": None}
    if request.state.authorized:
        out["engine"] = engine.describe() if engine.ready else {"state": engine.state}
    return out


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format: kivi_* and vllm:* series.",
        }
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: ours (kivi_*) and vLLM's own (vllm:*)."""
    state = state_of(request)
    engine = state.engine
    await state.metrics.refresh(engine)
    registry = engine.vllm_metrics_registry() if engine.ready else None
    return Response(state.metrics.render(registry), media_type="text/plain; version=0.0.4; charset=utf-8")
