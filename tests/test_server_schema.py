"""Schemathesis over the running server's /openapi.json: generated valid and invalid requests to every
operation; no 5xx, status codes, content types and bodies as the schema documents.

Bounded: a fixed number of examples per operation (a few hundred requests in all), derandomized,
no shrinking; generated requests that would really generate are capped at 2 new tokens (the
server's own bounds are tested in test_server_api.py).
"""

from __future__ import annotations

import pytest
from server_harness import API_KEY, shared_server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

#: Examples per operation and mode (positive, negative): 2 POST + 6 GET operations, <= 196 requests.
EXAMPLES = {"POST": 25, "GET": 8}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
GENERATED_TOKENS_CAP = 2


def cap_generation(case) -> None:
    """Keep generated completions short: a valid max_tokens becomes at most 2, a missing one 2."""
    body = case.body
    if case.method.upper() != "POST" or not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > GENERATED_TOKENS_CAP:
            body[key] = GENERATED_TOKENS_CAP
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = GENERATED_TOKENS_CAP


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_contract(mode):
    server = shared_server()
    schema = schemathesis.openapi.from_url(
        server.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    generation_mode = GenerationMode(mode)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "GET /v1/models",
    }
    ran: dict[str, int] = {}
    for op in operations:
        try:
            contract_check(op, generation_mode, ran)()
        except Unsatisfiable:
            continue  # e.g. no invalid data exists for an operation without inputs
    assert sum(ran.values()) >= 50, ran


def contract_check(op, generation_mode, ran: dict[str, int]):
    """A hypothesis test of one operation: call the server with each generated case, run the checks."""
    label = f"{op.method.upper()} {op.path}"

    @given(case=op.as_strategy(generation_mode=generation_mode))
    @settings(
        max_examples=EXAMPLES.get(op.method.upper(), 8),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        ran[label] = ran.get(label, 0) + 1
        cap_generation(case)
        response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
        case.validate_response(response, checks=CHECKS)

    return check
