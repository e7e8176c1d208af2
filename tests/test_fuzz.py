"""A schema-driven fuzz run (Schemathesis) over the OpenAPI spec: no input makes a 5xx.

Bounded: a few dozen generated requests per operation, against a real server (open mode
and accounts mode) with the fake provider behind it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from parley.app import create_app
from parley.config import Settings
from tests.conftest import AUTH_MODES, ParleyServer, serve_in_mode
from tests.fake_provider import FakeProvider


@pytest.fixture(scope="module", params=AUTH_MODES)
def fuzzed_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
) -> Iterator[ParleyServer]:
    yield from serve_in_mode(request.param, tmp_path_factory, provider)


# The spec is the one the running servers publish at /openapi.json: the same app, built
# here without starting it.
schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_input_makes_a_server_error(
    case: schemathesis.Case, fuzzed_server: ParleyServer
) -> None:
    case.call_and_validate(base_url=fuzzed_server.url, checks=[not_a_server_error], timeout=30)
