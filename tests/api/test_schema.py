"""The OpenAPI schema: complete (validates with no warning), served to people signed in,
with a docs page whose assets are served locally (no CDN)."""

from __future__ import annotations

import re

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_spectacular_validates_without_a_warning(tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for path in (
        "/api/v1/rollouts/{id}/promote",
        "/api/v1/preflight/",
        "/api/v1/rollbacks/{id}/restore",
        "/api/v1/audit/export",
        "/api/v1/deliveries/",
        "/api/v1/alerts/{id}/ack",
        "/api/v1/market/candles",
    ):
        assert f"{path}:" in text, path


def test_schema_needs_a_signed_in_person(client_for):
    from rest_framework.test import APIClient

    assert APIClient().get("/api/schema/").status_code == 401
    response = client_for("vic", "Viewer").get(
        "/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json"
    )
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert {"tokenAuth", "cookieAuth"} <= set(schema["components"]["securitySchemes"])
    operation = schema["paths"]["/api/v1/rollouts/{id}/pause"]["post"]
    assert {"200", "400", "401", "403", "404", "409", "429"} <= set(operation["responses"])


def test_docs_page_loads_its_assets_locally(client, make_user):
    client.force_login(make_user("vic", "Viewer"))
    page = client.get("/api/docs/").content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any("swagger-ui" in s for s in sources), sources
    assert not [s for s in sources if s.startswith(("http://", "https://", "//"))], sources
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert finders.find(f"drf_spectacular_sidecar/swagger-ui-dist/{asset}"), asset
