"""Fixtures of the API tests: clients per role, private folders, a clean throttle cache."""

from __future__ import annotations

import uuid

import pytest
from rest_framework.test import APIClient


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path):
    from django.core.cache import cache

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.SAFETY_PREFLIGHT_DIR = tmp_path / "preflight"
    settings.SAFETY_BACKUP_DIR = tmp_path / "backups"
    settings.SAFETY_REDIS_PREFIX = f"api-test-{uuid.uuid4().hex[:8]}"
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def client_for(api_token):
    def make(username: str, role: str) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(username, role)}")
        return client

    return make
