"""Hostile client input, over the app in process: each case of issue #18 gets a 4xx that says what is
wrong, nothing leaks, and the event loop keeps answering while big prompts are tokenized.

(The property-based sweep over the same ground is test_server_fuzz.py.)
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from server_harness import FakeEngine, fake_client  # noqa: E402

from kivi_serve.server.settings import build_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
VOCAB = FakeEngine().vocab_size


def send(*requests, engine: FakeEngine | None = None, headers: dict | None = AUTH, **settings) -> list:
    """(method, path, raw bytes or JSON) requests to the app over ``engine``; the responses."""
    settings.setdefault("api_key", KEY)

    async def go():
        async with fake_client(engine or FakeEngine(max_model_len=1024), **settings) as c:
            out = []
            for method, path, body in requests:
                content = (
                    body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
                )
                hdrs = {"Content-Type": "application/json", **(headers or {})}
                out.append(await c.request(method, path, content=content, headers=hdrs))
            return out

    return asyncio.run(go())


def error_of(r) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.headers
    data = r.json()
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}, data
    assert r.status_code >= 400 and data["error"]["type"] == "invalid_request_error", (r.status_code, data)
    return data["error"]


def stream_events(r) -> list:
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
    return [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]


HI = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------------- no 5xx for client input
@pytest.mark.parametrize(
    "path, raw, param",
    [  # the reproductions, written as the client sent them (JSON \u escapes)
        (
            "/v1/chat/completions",
            rb'{"messages":[{"role":"user","content":"a\ud800b"}],"max_tokens":2}',
            "messages",
        ),
        (
            "/v1/chat/completions",
            rb'{"messages":[{"role":"user","content":"a\ud800b"}],"max_tokens":2,"stream":true}',
            "messages",
        ),
        ("/v1/completions", rb'{"model":"x\ud800","prompt":"hi","max_tokens":2}', "model"),
        ("/v1/completions", rb'{"prompt":"hi","stop":["ab\udc00"]}', "stop"),
        ("/v1/completions", rb'{"prompt":["ok","\udbff"]}', "prompt"),
        ("/v1/completions", rb'{"prompt":"hi","logit_bias":{"\ud800":1}}', "logit_bias"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(path, raw, param):
    (r,) = send(("POST", path, raw))
    err = error_of(r)
    assert r.status_code == 400 and err["param"] == param, err
    assert "lone UTF-16 surrogate" in err["message"] and err["message"].startswith(param), err


def test_paired_surrogates_are_one_character_and_fine():
    (r,) = send(("POST", "/v1/completions", rb'{"prompt":"smile \ud83d\ude00","max_tokens":1}'))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_huge_ints_are_400(path, stream):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": HI}
    huge_top_k, over_vocab, at_vocab, seed = send(
        ("POST", path, {**base, "max_tokens": 2, "stream": stream, "top_k": 10**30}),
        ("POST", path, {**base, "max_tokens": 2, "stream": stream, "top_k": VOCAB + 1}),
        ("POST", path, {**base, "max_tokens": 2, "stream": stream, "top_k": VOCAB}),
        ("POST", path, {**base, "max_tokens": 2, "stream": stream, "seed": 2**63}),
    )
    for r, param in ((huge_top_k, "top_k"), (over_vocab, "top_k"), (seed, "seed")):
        assert r.status_code == 400 and error_of(r)["param"] == param, r.text
    assert f"at most {VOCAB}" in error_of(huge_top_k)["message"]
    assert at_vocab.status_code == 200, at_vocab.text


def test_echoed_input_is_clipped_and_encodable():
    long_name = "m" * 100_000
    model, bias, path = send(
        ("POST", "/v1/completions", {"model": long_name, "prompt": "hi"}),
        ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {"x" * 50_000: 1}}),
        ("GET", "/v1/" + "p" * 20_000, None),
        max_body_bytes=1 << 20,
    )
    for r, status in ((model, 404), (bias, 400), (path, 404)):
        assert r.status_code == status and len(r.content) < 1200, (status, len(r.content))
    assert "m" * 200 in error_of(model)["message"] and "(100000 characters)" in error_of(model)["message"]


@pytest.mark.parametrize(
    "raw, says",
    [
        (b'{"prompt": "a\xffb"}', "byte 0xff at position 13 is not UTF-8"),
        (b'{"prompt": "hi"}\x00', "Extra data"),
        (b'{\x00"prompt": "hi"}', "Expecting property name"),
        ('{"prompt": "hi"}'.encode("utf-16"), "is not UTF-8"),
        (b'{"prompt": "hi", "temperature": NaN}', "NaN is not a JSON number"),
        (b'{"prompt": "hi", "max_tokens": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
        (b'{"prompt": "hi", ', "Expecting property name"),
    ],
)
def test_undecodable_bodies_are_400_not_valid_utf8_json(raw, says):
    (r,) = send(("POST", "/v1/completions", raw), max_body_bytes=1 << 20)
    err = error_of(r)
    assert r.status_code == 400 and err["code"] == "invalid_json", err
    assert (
        err["message"].startswith("The request body is not valid UTF-8 JSON: ") and says in err["message"]
    ), err


def test_body_must_be_an_object_and_is_json_whatever_the_content_type():
    array, form = send(
        ("POST", "/v1/completions", b"[1, 2]"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 1}'),
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},  # what curl -d sends
    )
    assert array.status_code == 400 and "must be a JSON object, not list" in error_of(array)["message"]
    assert form.status_code == 200 and form.json()["choices"][0]["text"] == "a"


@pytest.mark.parametrize("prompt, bad", [([1, -5], -5), ([[1, 2], [3, 10**30]], 10**30), ([VOCAB], VOCAB)])
def test_token_id_prompts_out_of_range_say_so(prompt, bad):
    (r,) = send(("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1}))
    err = error_of(r)
    assert r.status_code == 400 and err["param"] == "prompt"
    assert err["message"] == f"token ids must be in [0, {VOCAB}); got {bad}.", err


def test_union_fields_say_what_they_take():
    prompt, stop, content = send(
        ("POST", "/v1/completions", {"prompt": [1, "a"]}),
        ("POST", "/v1/completions", {"prompt": "hi", "stop": 7}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    )
    assert error_of(prompt)["message"] == (
        "prompt must be a string, an array of strings, an array of token ids or an array of arrays of "
        "token ids."
    )
    assert error_of(stop)["message"] == "stop must be a string or an array of strings."
    assert error_of(content)["message"] == "messages.0.content must be a string or an array of text parts."
    assert error_of(content)["param"] == "messages"


# ------------------------------------------------------------------------------------------- leaks
def test_version_without_the_key_shows_versions_only():
    (anonymous,) = send(("GET", "/version", None), headers=None)
    keyed, models = send(("GET", "/version", None), ("GET", "/v1/models", None))
    assert anonymous.status_code == 200
    assert anonymous.json() == {"version": anonymous.json()["version"], "vllm_version": "0", "engine": None}
    assert keyed.json()["engine"]["model"] == "fake"
    (open_server,) = send(("GET", "/version", None), headers=None, api_key=None)
    assert open_server.json()["engine"]["model"] == "fake"  # no key configured: nothing to hide behind
    card = models.json()["data"][0]
    assert card["root"] == "fake" and "/" not in json.dumps(card)


def test_model_path_is_in_no_engine_description():
    from kivi_serve.engine import Engine, EngineConfig

    engine = Engine(EngineConfig())
    engine.model_path = Path("/root/secret/models/smollm2")
    assert "/root" not in json.dumps(engine.describe(), default=str)


def test_docs_work_offline_and_follow_the_key():
    anonymous = send(("GET", "/docs", None), ("GET", "/openapi.json", None), headers=None)
    keyed_docs, keyed_spec = send(("GET", "/docs", None), ("GET", "/openapi.json", None))
    for r in anonymous:
        assert r.status_code == 401 and error_of(r)["code"] == "missing_api_key"
    assert keyed_spec.status_code == 200 and "/v1/completions" in keyed_spec.json()["paths"]
    html = keyed_docs.text
    assert keyed_docs.status_code == 200 and "swagger" in html.lower()
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", html)
    assert urls and not [u for u in urls if "//" in u], urls  # nothing from another host (no CDN)
    assets = [u for u in urls if u.endswith((".js", ".css"))]
    assert len(assets) >= 2, urls
    fetched = send(*(("GET", u, None) for u in assets), headers=None)
    assert [r.status_code for r in fetched] == [200] * len(assets)
    assert all(len(r.content) > 10_000 for r in fetched)  # the real Swagger UI bundle, from the package
    open_docs, open_spec = send(
        ("GET", "/docs", None), ("GET", "/openapi.json", None), headers=None, api_key=None
    )
    assert open_docs.status_code == open_spec.status_code == 200


def test_help_and_readme_recommend_the_environment_over_the_api_key_flag():
    helptext = " ".join(build_parser().format_help().split())
    assert "Prefer KIVI_SERVE_API_KEY or `api-key:` in the --config file" in helptext
    assert "process list" in helptext
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "KIVI_SERVE_API_KEY" in readme and "process list" in readme


# ------------------------------------------------------------------------------------- event loop
BIG_PROMPT_BYTES = 1_900_000
#: /health's bounds while four big prompts are tokenized: 95 % of the waits within the issue's
#: 100 ms, and none as long as tokenizing one such prompt (1.3-2.4 s here), which is what a blocked
#: event loop gives (before this fix: one poll, 7-16 s). Measured on the shared 2-core machine: worst
#: wait 29-49 ms at load average 10-12; one 0.8 s outlier at load 14 with a vLLM engine test beside
#: it, where the OS, not the loop, held the thread back.
HEALTH_P95_S = 0.100
HEALTH_WORST_S = 1.0


def test_health_answers_within_100ms_while_four_big_prompts_are_tokenized():
    """Four 1.9 MB prompts (two completions, two chats) through the served model's real tokenizer and
    chat template; /health is polled meanwhile and answers within 100 ms (see HEALTH_P95_S)."""
    pytest.importorskip("transformers")
    from server_harness import TokenizingEngine

    engine = TokenizingEngine()
    words = "The quick brown fox jumps over the lazy dog while seven wizards quietly judge the boxing match. "
    text = (words * (BIG_PROMPT_BYTES // len(words) + 1))[:BIG_PROMPT_BYTES]

    async def go():
        async with fake_client(engine, api_key=KEY, max_body_bytes=2 << 20) as c:
            bodies = [
                ("/v1/completions", {"prompt": text, "max_tokens": 1}),
                ("/v1/completions", {"prompt": text, "max_tokens": 1, "stream": True}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "stream": True}),
            ]
            t0 = time.perf_counter()
            big = [asyncio.ensure_future(c.post(path, json=body, headers=AUTH)) for path, body in bodies]
            waits = []  # each poll's answer time, and how late each 20 ms pause between polls woke up
            while not all(t.done() for t in big):
                t = time.perf_counter()
                r = await c.get("/health")
                waits.append(time.perf_counter() - t)
                assert r.status_code == 200
                t = time.perf_counter()
                await asyncio.sleep(0.02)
                waits.append(time.perf_counter() - t - 0.02)
            return await asyncio.gather(*big), waits, time.perf_counter() - t0

    answers, waits, total = asyncio.run(go())
    waits.sort()
    p95, worst, polls = waits[int(0.95 * (len(waits) - 1))], waits[-1], len(waits) // 2
    seen = f"/health waits: p95 {p95 * 1e3:.0f} ms, worst {worst * 1e3:.0f} ms ({polls} polls, {total:.1f} s)"
    assert p95 < HEALTH_P95_S and worst < HEALTH_WORST_S, seen
    assert polls >= 10, (polls, total)  # the prompts took a while, and /health was asked all along
    for r in answers:  # they were really tokenized: ~400k tokens each, over the model's context
        err = error_of(r)
        assert err["code"] == "context_length_exceeded", err
        assert int(re.search(r"resulted in (\d+) tokens", err["message"]).group(1)) > 200_000, err
