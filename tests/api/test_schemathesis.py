"""Schemathesis against the OpenAPI schema, in-process through the WSGI app, as an Ops
user: no 500, every response conforming to the schema (status, content type, body), over
valid and invalid input. Bounded by a small number of examples per operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.permissions.conftest import Scene

# Each request commits on its own, as in production: a value refused by the database
# inside one request cannot poison the next one's transaction.
pytestmark = pytest.mark.django_db(transaction=True)

MAX_EXAMPLES = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def ops_token(db, make_user):
    from rest_framework.authtoken.models import Token

    return Token.objects.create(user=make_user("ops-fuzz", "Ops", is_staff=True)).key


@pytest.fixture
def world(make_user):
    """Something for the ids to find: a running rollout, an alert, a rollback."""
    scene = Scene(make_user)
    scene.running()
    scene.alert()
    scene.completed_rollback()
    return scene


@pytest.fixture
def api_schema(settings, ops_token, world):
    """The schema as the app serves it; the app keeps the test's database connection open
    across requests, as Django's test client does."""
    from django.core.signals import request_finished, request_started
    from django.core.wsgi import get_wsgi_application
    from django.db import close_old_connections

    settings.ALLOWED_HOSTS = ["localhost", "testserver"]
    settings.SAFETY_PREFLIGHT_TIMEOUT_S = 0.5
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi(
            "/api/schema/",
            get_wsgi_application(),
            headers={
                "Authorization": f"Token {ops_token}",
                "Accept": "application/vnd.oai.openapi+json",
            },
        )
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def _fuzz(operation, mode, token: str) -> list[str]:
    """Run one operation's examples; the failures, as text."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
    )
    def run(case):
        try:
            case.call_and_validate(headers={"Authorization": f"Token {token}"}, checks=CHECKS)
        except (AssertionError, FailureGroup) as exc:  # keep it, go on
            failures.append(f"{operation.label} [{mode.value}]: {str(exc)[:1500]}")

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (e.g. a GET without parameters)
        assert mode == GenerationMode.NEGATIVE, operation.label
    return failures


def test_api_conforms_to_its_schema(api_schema, ops_token):
    """Every operation, valid and invalid input; all failures reported together."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 30
    failures = [
        failure
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for failure in _fuzz(operation, mode, ops_token)
    ]
    assert failures == [], "\n\n".join(failures[:20])
