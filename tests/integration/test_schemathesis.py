"""Schemathesis against both OpenAPI documents, over real HTTP (uvicorn on 127.0.0.1) and real PostgreSQL and
Redis: generated valid and invalid inputs, each sent with a real credential and without one. No answer may be a
5xx, and every answer must be declared (status, content type) and match its declared schema. The gateway's engine
is the scripted one: the engine is not what is tested here. Inputs tried per API are printed at the end
(`-s`) for docs/reliability.md."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from apitest_support import flush_redis, fresh_pg, h, served_gateway, tenant_with_key
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from bastion.control.app import create_app as create_control_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    negative_data_rejection,
]
EXAMPLES = 20
TRIED: Counter[str] = Counter()
STATUSES: dict[str, Counter[int]] = {"gateway": Counter(), "admin": Counter()}
NO_THROTTLE = {"failed_auth_limit": 1_000_000}  # generated bad credentials must reach the real checks


def _schema(url: str, document: dict) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=url)
    schema.config.generation.update(
        modes=["positive", "negative"],
        deterministic=True,
        max_examples=EXAMPLES,
        with_security_parameters=False,  # the test sends the real credential (and none) itself
        allow_extra_parameters=False,  # unknown query parameters are ignored, as HTTP APIs do
    )
    return schema


@pytest.fixture(scope="module")
def gateway_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with fresh_pg() as url:
        token = tenant_with_key(url, "fuzz-gw")
        tmp = tmp_path_factory.mktemp("fuzz-gateway")
        with served_gateway(tmp, url, flush_redis(12), auth=NO_THROTTLE) as gateway:
            yield gateway.url, token


@pytest.fixture(scope="module")
def gateway_schema(gateway_env: tuple[str, str]) -> schemathesis.BaseSchema:
    url, _token = gateway_env
    return _schema(url, httpx.get(f"{url}/openapi.json").json())


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> h.TestIdp:
    return h.shared_idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def admin_env(idp: h.TestIdp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("fuzz-admin")
    with fresh_pg() as url:
        tenant_with_key(url, "acme")  # alice's tenant: tenant-scoped routes have something to find
        config = h.platform_config(tmp, url, idp.issuer)
        data = config.model_dump(mode="json", exclude_unset=True)
        data["auth"] = {**data["auth"], **NO_THROTTLE}
        config = type(config).model_validate(data)
        app = create_control_app(config, settings=h.control_settings(config))
        with h.ServerThread(app, h.free_port()) as server:
            yield server.url, idp.token("pat")


@pytest.fixture(scope="module")
def admin_schema(admin_env: tuple[str, str]) -> schemathesis.BaseSchema:
    url, _token = admin_env
    return _schema(url, httpx.get(f"{url}/admin/api/openapi.json").json())


FUZZ = settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


def fuzz(schema: schemathesis.BaseSchema, api: str, token: str) -> list[str]:
    """Every operation, positive then negative inputs, each sent with the credential and without; the failures
    are collected (not raised, so Hypothesis does not spend the time budget shrinking them)."""
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, operation.as_strategy(generation_mode=mode), mode, api, token, failures)
        for strategy in schema.get_strategies_from_examples(operation):  # the documented examples, as given
            _fuzz_operation(operation, strategy, GenerationMode.POSITIVE, api, token, failures)
    return failures


def _fuzz_operation(operation, strategy, mode: GenerationMode, api: str, token: str, failures: list[str]) -> None:
    @given(case=strategy)
    @FUZZ
    def run(case: schemathesis.Case) -> None:
        for headers in ({"Authorization": f"Bearer {token}"}, None):
            TRIED[api] += 1
            try:
                response = case.call_and_validate(headers=headers, checks=CHECKS)
                STATUSES[api][response.status_code] += 1
            except (Exception, BaseExceptionGroup) as exc:  # a check failed (or the call did): keep its first lines
                first = " | ".join(str(exc).strip().splitlines()[:14])
                failures.append(f"{operation.label} {mode.value} auth={bool(headers)}: {first}")

    try:
        run()
    except Unsatisfiable:  # negative mode for an operation with nothing to make invalid (no parameters, no body)
        assert mode is GenerationMode.NEGATIVE, operation.label


def report(failures: list[str]) -> str:
    """One line per kind of failure (check and operation), most frequent first."""
    kinds = Counter(
        f.split(" auth=")[0] + " " + (f.split(" - ")[1].split(" | ")[0] if " - " in f else "") for f in failures
    )
    examples = {f.split(" auth=")[0]: f for f in failures if "ST101" in f or "ST201" in f or "ST102" in f}
    return (
        f"{len(failures)} failures:\n"
        + "\n".join(f"{n:4} {k}" for k, n in kinds.most_common())
        + "\n"
        + "\n".join(list(examples.values())[:5])
    )


def test_gateway_answers_match_its_openapi_document(gateway_schema: schemathesis.BaseSchema, gateway_env) -> None:
    failures = fuzz(gateway_schema, "gateway", gateway_env[1])
    assert not failures, report(failures)


def test_admin_api_answers_match_its_openapi_document(admin_schema: schemathesis.BaseSchema, admin_env) -> None:
    failures = fuzz(admin_schema, "admin", admin_env[1])
    assert not failures, report(failures)


def test_inputs_were_tried(gateway_schema: schemathesis.BaseSchema, admin_schema: schemathesis.BaseSchema) -> None:
    """Runs after the two above (file order); the counts are the figures for docs/reliability.md."""
    operations = {
        "gateway": len(list(gateway_schema.get_all_operations())),
        "admin": len(list(admin_schema.get_all_operations())),
    }
    statuses = {api: dict(sorted(c.items())) for api, c in STATUSES.items()}
    print(f"\nschemathesis requests sent: {dict(TRIED)}; operations: {operations}; statuses: {statuses}")
    for api, count in operations.items():
        assert TRIED[api] >= 2 * count, (api, TRIED[api], count)
        assert STATUSES[api][200] > 0, f"no {api} request got through: {statuses}"
