"""Schemathesis against both services' OpenAPI schemas, in-process over ASGI: for every operation, bounded
generated requests (valid and invalid) must never get a 5xx and every answer must match the schema
(status documented, content type declared, body valid against its schema)."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from advexplain.services.blackbox.app import create_app as create_blackbox
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.services.explainer.app import create_app as create_explainer
from advexplain.services.explainer.settings import ExplainerSettings

TOKEN = "schemathesis-token-0123456789"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Bounded for CI: at most this many generated requests per operation, no per-example deadline (one CPU thread).
BOUNDED = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))


# Schemathesis runs each app's lifespan itself (started on first use, ended with the test), and a lifespan
# registers the service's metrics, so every test gets apps of its own. The explainer's black box is a
# separate app instance behind a TestClient.

@pytest.fixture
def blackbox_schema(tiny_models):
    app = create_blackbox(BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1, max_images=8,
                                           max_upload_bytes=1_000_000))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def box_transport(tiny_models):
    with TestClient(create_blackbox(BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1))) as box:
        yield box


@pytest.fixture
def explainer_schema(box_transport, tiny_models):
    settings_ = ExplainerSettings(surrogate=[tiny_models["surrogate"]], blackbox_url="http://testserver", device="cpu",
                                  threads=1, max_queries=10, whitebox_model=tiny_models["blackbox"],
                                  whitebox_token=TOKEN, max_upload_bytes=1_000_000)
    return schemathesis.openapi.from_asgi("/openapi.json", create_explainer(settings_, blackbox_client=box_transport))


def run_operation(
    schema, path: str, method: str, mode: GenerationMode, headers: dict[str, str] | None = None
) -> Counter:
    """Bounded generated cases for one operation, each sent in-process and checked; the statuses seen.

    Positive cases follow the schema; negative ones break it on purpose (wrong types, missing fields)."""
    operation = schema[path][method]
    statuses: Counter = Counter()

    @BOUNDED
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        statuses[response.status_code] += 1

    check()
    print(f"{mode.value} {method} {path}: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 1
    return statuses


# Schemathesis' own pytest fixture loader (`schemathesis.pytest.from_fixture`) does not work with pytest 9
# (it reads `Function._nodeid`), so each operation is one parametrized test driving hypothesis directly.
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
MODES = pytest.mark.parametrize("mode", [POSITIVE, NEGATIVE], ids=lambda m: m.value)
# A GET without parameters has no negative form: positive only.
BLACKBOX_OPS = [("/predict", "POST", POSITIVE), ("/predict", "POST", NEGATIVE), ("/healthz", "GET", POSITIVE),
                ("/metrics", "GET", POSITIVE)]
EXPLAINER_OPS = [("/explain", "POST", POSITIVE), ("/explain", "POST", NEGATIVE),
                 ("/internal/whitebox/explain", "POST", POSITIVE), ("/internal/whitebox/explain", "POST", NEGATIVE),
                 ("/healthz", "GET", POSITIVE), ("/metrics", "GET", POSITIVE)]


def op_id(value):
    return value.value if isinstance(value, GenerationMode) else None


@pytest.mark.parametrize("path,method,mode", BLACKBOX_OPS, ids=op_id)
def test_blackbox_conforms_to_its_schema(blackbox_schema, path, method, mode):
    run_operation(blackbox_schema, path, method, mode)


@pytest.mark.parametrize("path,method,mode", EXPLAINER_OPS, ids=op_id)
def test_explainer_conforms_to_its_schema(explainer_schema, path, method, mode):
    run_operation(explainer_schema, path, method, mode)


@MODES
def test_explainer_whitebox_with_the_token_conforms_too(explainer_schema, mode):
    statuses = run_operation(explainer_schema, "/internal/whitebox/explain", "POST", mode,
                             headers={"Authorization": f"Bearer {TOKEN}"})
    if mode is POSITIVE:  # negative cases also break the Authorization header on purpose
        assert not set(statuses) & {401, 403}, "with the token every request gets past the guard"


def test_every_operation_is_covered(blackbox_schema, explainer_schema):
    def operations(schema):
        return {(op.ok().path, op.ok().method.upper()) for op in schema.get_all_operations()}

    assert operations(blackbox_schema) == {("/predict", "POST"), ("/healthz", "GET"), ("/metrics", "GET")}
    assert operations(explainer_schema) == {("/explain", "POST"), ("/internal/whitebox/explain", "POST"),
                                            ("/healthz", "GET"), ("/metrics", "GET")}
