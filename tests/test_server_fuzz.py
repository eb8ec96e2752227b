"""Property-based fuzzing of /v1/completions and /v1/chat/completions: no input gets a 5xx.

Hypothesis builds request bodies field by field from plausible values and hostile ones (lone
surrogates, NULs, ints far beyond 64 bits, NaN and infinities, deep nesting, wrong types), plus raw
bodies that are not UTF-8 JSON at all, on both routes, streamed or not. Every answer must be a
success, or an error in OpenAI's shape with a 4xx status (a stream: only complete events, ending
with ``[DONE]``, none of them a server error); afterwards the server is healthy with nothing in
flight.

- ``test_fuzz_in_process``: 2,000+ requests to the app over the tests' FakeEngine (which fails
  where vLLM does: on text that is not Unicode and on sampling ints that msgpack cannot carry);
  ~15-40 s on 2 busy cores.
- ``test_fuzz_real_server`` (vllm): 60 of the same requests (the issue's reproductions first) to the
  shared real server, each generating at most 2 tokens for 1 choice.

Derandomized (the same requests every run) and bounded in count; no shrinking (a failure prints the
request that failed).
"""

from __future__ import annotations

import asyncio
import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_harness import API_KEY, FakeEngine, shared_server  # noqa: E402

from kivi_serve.server.app import create_app  # noqa: E402
from kivi_serve.server.settings import ServeSettings  # noqa: E402

IN_PROCESS_EXAMPLES = 2000
REAL_SERVER_EXAMPLES = 60
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
ROUTES = ("/v1/completions", "/v1/chat/completions")

# ------------------------------------------------------------------------------------- strategies
NASTY_CHARS = ["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\ufeff", "\u2028", "\U0001f600", "é", "\\"]
texts = st.text(alphabet=st.one_of(st.characters(codec=None), st.sampled_from(NASTY_CHARS)), max_size=24)
huge_ints = st.sampled_from(
    [-(10**30), -(2**63) - 1, -(2**63), -2, -1, 0, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]
)
ints = st.one_of(st.integers(-3, 40), huge_ints, st.integers(-(2**200), 2**200))
floats = st.floats(allow_nan=True, allow_infinity=True)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3), max_leaves=8
)


clean_texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=24)
token_ids = st.lists(st.one_of(st.integers(0, 999), ints), min_size=0, max_size=6)

#: Per field: (a valid value, a hostile one). A request is valid, or valid but for one or two
#: fields, or anything at all.
SAMPLING = {
    "model": (st.none(), st.one_of(texts, json_values)),
    "max_tokens": (st.integers(1, 3), ints),
    "temperature": (st.floats(0, 2), floats),
    "top_p": (st.floats(0.01, 1), floats),
    "top_k": (st.integers(-1, 50), ints),
    "n": (st.integers(1, 2), ints),
    "stop": (st.one_of(clean_texts.filter(bool), st.lists(clean_texts.filter(bool), max_size=3)), texts),
    "seed": (st.integers(0, 2**63 - 1), ints),
    "presence_penalty": (st.floats(-2, 2), floats),
    "frequency_penalty": (st.floats(-2, 2), floats),
    "repetition_penalty": (st.floats(0.1, 2), floats),
    "logit_bias": (
        st.dictionaries(st.integers(0, 999).map(str), st.floats(-100, 100), max_size=3),
        st.dictionaries(st.one_of(texts, ints.map(str)), floats, max_size=3),
    ),
    "stream": (st.booleans(), json_values),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "user": (clean_texts, texts),
    "ignore_eos": (st.booleans(), json_values),
    "min_tokens": (st.integers(0, 2), ints),
}
COMPLETION = {
    **SAMPLING,
    "prompt": (
        st.one_of(clean_texts.filter(bool), st.lists(clean_texts.filter(bool), min_size=1, max_size=2)),
        st.one_of(texts, st.lists(texts, max_size=3), token_ids, st.lists(token_ids, max_size=2)),
    ),
    "logprobs": (st.integers(0, 3), ints),
    "echo": (st.booleans(), json_values),
    "best_of": (st.integers(1, 2), ints),
    "suffix": (st.none(), texts),
}
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": clean_texts}
)
hostile_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "tool"]), json_values)},
    optional={
        "content": st.one_of(
            texts,
            st.lists(
                st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}),
                max_size=2,
            ),
            json_values,
        ),
        "name": texts,
    },
)
CHAT = {
    **SAMPLING,
    "messages": (st.lists(valid_message, min_size=1, max_size=3), st.lists(hostile_message, max_size=3)),
    "max_completion_tokens": (st.integers(1, 3), ints),
    "logprobs": (st.booleans(), json_values),
    "top_logprobs": (st.integers(0, 3), ints),
    "response_format": (st.just({"type": "text"}), st.fixed_dictionaries({"type": texts})),
    "tools": (st.none(), st.lists(json_values, max_size=1)),
}


@st.composite
def _object(draw, fields: dict, required: str) -> dict:
    """A request object: ``required`` and a few other fields valid, then 0-2 of them hostile."""
    names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True))
    obj = {name: draw(fields[name][0]) for name in {required, *names}}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        obj[name] = draw(fields[name][1])
    return obj


def _body(fields: dict, required: str) -> st.SearchStrategy[bytes]:
    anything = st.dictionaries(st.sampled_from(sorted(fields)), json_values, max_size=4)
    objects = st.one_of(_object(fields, required), _object(fields, required), anything)
    # ensure_ascii writes a lone surrogate as its \\u escape; allow_nan writes NaN / Infinity
    return objects.map(lambda obj: json.dumps(obj, allow_nan=True).encode())


RAW_BODIES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'"prompt"',
            b'{"prompt": "hi", ',
            b'{"prompt": "a\xffb"}',
            b'{"prompt": "a\x00b"}',
            b'{\x00"prompt": "hi"}',
            '{"prompt": "hi"}'.encode("utf-16"),
            b'{"prompt": "hi", "temperature": NaN}',
            b'{"prompt": "hi", "max_tokens": Infinity}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        ]
    ),
)
requests = st.one_of(
    st.tuples(st.just(ROUTES[0]), _body(COMPLETION, "prompt")),
    st.tuples(st.just(ROUTES[1]), _body(CHAT, "messages")),
    st.tuples(st.sampled_from(ROUTES), RAW_BODIES),
)

#: The issue's reproductions, always run.
KNOWN = [
    (ROUTES[1], b'{"messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":2}'),
    (ROUTES[1], b'{"messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":2,"stream":true}'),
    (ROUTES[0], b'{"model":"x\\ud800","prompt":"hi","max_tokens":2}'),
    (ROUTES[0], b'{"prompt":"hi","max_tokens":2,"top_k":1000000000000000000000000000000}'),
    (
        ROUTES[1],
        b'{"messages":[{"role":"user","content":"hi"}],"top_k":1000000000000000000000000000000,"stream":true}',
    ),
    (ROUTES[0], b'{"prompt":"hi","stop":["\\udc00"]}'),
    (ROUTES[0], b'{"prompt":[1,-5]}'),
]


# ------------------------------------------------------------------------------------------ checks
def check_answer(status: int, content_type: str, body: bytes, request: tuple[str, bytes]) -> None:
    """No 5xx; an error is OpenAI-shaped JSON; a stream is complete events ending with [DONE]."""
    assert status < 500, (status, body[:500], request)
    if status != 200:
        assert content_type.startswith("application/json"), (status, content_type, request)
        data = json.loads(body)
        assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}, data
        assert data["error"]["type"] in ("invalid_request_error", "rate_limit_error"), (data, request)
        assert isinstance(data["error"]["message"], str) and len(data["error"]["message"]) <= 2048
        return
    if content_type.startswith("text/event-stream"):
        events = [e for e in body.decode().split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]", (body[-300:], request)
        for event in events[:-1]:
            assert event.startswith("data: "), (event, request)
            chunk = json.loads(event[6:])
            if "error" in chunk:
                assert chunk["error"]["type"] != "server_error", (chunk, request)
        return
    data = json.loads(body)
    assert data["object"] in ("text_completion", "chat.completion"), data


FUZZ_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def with_known(test):
    for route, body in KNOWN:
        test = example(request=(route, body))(test)
    return test


# -------------------------------------------------------------------------------------------- runs
def test_fuzz_in_process():
    engine = FakeEngine(max_model_len=64)
    app = create_app(
        ServeSettings(api_key=API_KEY, max_tokens_limit=16, max_n=2, max_body_bytes=2 << 20), engine=engine
    )
    loop = asyncio.new_event_loop()
    # raise_app_exceptions=False: an unhandled error is what a client would see, a 500
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://fuzz")
    sent: list[int] = []

    @settings(max_examples=IN_PROCESS_EXAMPLES, **FUZZ_SETTINGS)
    @given(request=requests)
    @with_known
    def fuzz(request: tuple[str, bytes]) -> None:
        route, body = request
        resp = loop.run_until_complete(client.post(route, content=body, headers=HEADERS))
        sent.append(resp.status_code)
        check_answer(resp.status_code, resp.headers.get("content-type", ""), resp.content, request)

    try:
        fuzz()
        health = loop.run_until_complete(client.get("/health"))
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
    assert len(sent) >= IN_PROCESS_EXAMPLES, len(sent)
    assert health.status_code == 200
    assert app.state.kivi.admitted == 0  # every admitted request was released
    codes = {c: sent.count(c) for c in set(sent)}
    assert codes.get(200, 0) >= 400 and sum(v for c, v in codes.items() if c >= 400) >= 800, codes


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_real_server():
    server = shared_server()
    sent: list[int] = []

    def capped(body: bytes) -> bytes:
        """At most 2 generated tokens of 1 choice for a request that would run (the server's bounds
        are tested elsewhere); anything that is not a JSON object goes as it is."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return body
        if isinstance(obj, dict):
            for key, cap in (("max_tokens", 2), ("max_completion_tokens", 2), ("n", 1)):
                if isinstance(obj.get(key), int) and not isinstance(obj[key], bool) and obj[key] > cap:
                    obj[key] = cap
            obj.setdefault("max_tokens", 2)
            return json.dumps(obj, allow_nan=True).encode()
        return body

    with httpx.Client(base_url=server.url, timeout=300) as client:

        @settings(max_examples=REAL_SERVER_EXAMPLES, **FUZZ_SETTINGS)
        @given(request=requests)
        @with_known
        def fuzz(request: tuple[str, bytes]) -> None:
            route, body = request
            body = capped(body)
            resp = client.post(route, content=body, headers=HEADERS)
            sent.append(resp.status_code)
            check_answer(resp.status_code, resp.headers.get("content-type", ""), resp.content, (route, body))

        fuzz()
        assert client.get("/health").status_code == 200
    assert len(sent) >= REAL_SERVER_EXAMPLES
    assert 200 in sent, sent
