"""Suite-wide fixtures.

With REQUIRE_SERVICES=1 (set by `make test` when CI=true) PostgreSQL and Redis must be
reachable: the run stops with an error instead of skipping. Elsewhere tests needing Redis
skip with the reason, and the rest run on SQLite.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"
os.environ.setdefault("CHANNELS_PREFIX", f"test-{uuid.uuid4().hex[:8]}")


def _redis_reachable(url: str) -> str | None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except redis.RedisError as exc:
        return f"Redis at {url} is unreachable: {exc}"
    return None


def pytest_configure(config):
    from django.conf import settings

    problem = _redis_reachable(settings.REDIS_URL)
    if REQUIRE_SERVICES:
        if problem:
            pytest.exit(f"CI requires Redis: {problem}", returncode=3)
        if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
            pytest.exit("CI requires DATABASE_URL to point at PostgreSQL", returncode=3)
    config.redis_problem = problem
    settings.CELERY_TASK_ALWAYS_EAGER = True
    settings.CELERY_TASK_EAGER_PROPAGATES = True
    if problem:
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    _flush_past_audit_triggers()
    from config.celery import app

    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True


def _flush_past_audit_triggers() -> None:
    """TransactionTestCase flushes every table between tests; the audit table's
    append-only triggers are dropped and re-created around that flush only, in the
    flush's own transaction."""
    from django.db import OperationalError, transaction
    from django.db.backends.base.operations import BaseDatabaseOperations

    from audit.triggers import suspended

    original = BaseDatabaseOperations.execute_sql_flush

    def execute_sql_flush(self, sql_list):
        # A live stack's worker may still hold row locks from the test that just ended;
        # TRUNCATE's exclusive lock can then deadlock with it. PostgreSQL aborts one side;
        # when it is the flush, the flush is retried (the whole transaction rolled back).
        for attempt in range(5):
            try:
                with transaction.atomic(using=self.connection.alias), suspended(self.connection):
                    original(self, sql_list)
                return
            except OperationalError as exc:
                if "deadlock detected" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    BaseDatabaseOperations.execute_sql_flush = execute_sql_flush


@pytest.fixture
def redis_url(request) -> str:
    """The real Redis for this run (flushed of this test's keys is not needed: keys are
    namespaced by CHANNELS_PREFIX and test-specific names)."""
    from django.conf import settings

    problem = request.config.redis_problem
    if problem:
        pytest.skip(problem)
    return settings.REDIS_URL


@pytest.fixture
def roles(db):
    from audit.roles import ensure_roles

    ensure_roles()


@pytest.fixture
def make_user(roles):
    from django.contrib.auth.models import Group, User

    def make(username: str, role: str | None = None, **extra) -> User:
        user = User.objects.create_user(
            username=username, password="pw-" + uuid.uuid4().hex, **extra
        )
        if role:
            user.groups.add(Group.objects.get(name=role))
        return user

    return make


@pytest.fixture
def api_token(make_user):
    from rest_framework.authtoken.models import Token

    def token_for(username: str = "ops", role: str = "Ops") -> str:
        return Token.objects.create(user=make_user(username, role)).key

    return token_for


@pytest.fixture(autouse=True)
def _reset_error_log_pause():
    """The Redis error-log handler goes quiet for a while after a Redis failure (class
    state); a test that broke Redis on purpose must not silence the next test's records."""
    from canary.journal import RedisErrorLogHandler

    RedisErrorLogHandler._skip_until = 0.0
