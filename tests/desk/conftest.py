"""Fixtures of the desk tests: users of each role, a seeded desk, reports kept in a
temporary VAR_DIR, and (for the browser tests) a live stack with beat."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROLES = ("Ops", "Viewer", "Alpha", "Planner")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(autouse=True)
def reports_in_tmp(settings, tmp_path, request):
    settings.VAR_DIR = tmp_path
    if request.node.get_closest_marker("e2e") is None:  # the live stack checks real hashes
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.DESK_REPORT_RECIPIENTS = []
    from canary import dashboard

    dashboard._health_cache.clear()
    return tmp_path


@pytest.fixture
def desk_users(make_user):
    return {
        role: make_user(role.lower(), role, email=f"{role.lower()}@example.test") for role in ROLES
    }


@pytest.fixture
def desk(desk_users):
    from tests.desk.factories import seed_desk

    return seed_desk(desk_users)


@pytest.fixture
def client_for(client):
    def login(user):
        client.force_login(user)
        return client

    return login


@pytest.fixture
def killswitch_redis(redis_url, settings):
    """The real Redis for kill-switch tests (keys set here are removed after)."""
    from canary.heartbeat import redis_client

    redis_client.cache_clear()
    client = redis_client()
    before = set(client.keys("killswitch:*"))
    yield client
    for key in set(client.keys("killswitch:*")) - before:
        client.delete(key)


# --------------------------------------------------------------------------- live stack


# Beat runs (the desk shows its heartbeat), but the schedules that act on deployments
# (canary monitor, watchdogs, reconciliation, equity) are pushed out of the test's time:
# the desk tests drive the page, not the lifecycle of their seeded rollout.
QUIET_SCHEDULES = {
    "CANARY_MONITOR_INTERVAL_S": "3600",
    "SAFETY_WATCHDOG_INTERVAL_S": "3600",
    "TRADING_RECONCILE_INTERVAL_S": "3600",
    "TRADING_EQUITY_INTERVAL_S": "7200",
}


@pytest.fixture(scope="module")  # stopped with its module, as tests/e2e's live_stack
def desk_stack(django_db_setup, django_db_blocker, request, tmp_path_factory) -> Iterator:
    """uvicorn + Celery worker + beat on the test database (as tests/e2e's live_stack),
    polling every second, with its own VAR_DIR for stored reports."""
    from django.conf import settings
    from stack import Stack, free_port

    from tests.e2e.conftest import ROOT, LiveStack, _stack_env

    if request.config.redis_problem:
        pytest.skip(request.config.redis_problem)
    env = _stack_env(settings.REDIS_URL)
    var_dir = tmp_path_factory.mktemp("desk-var")
    env.update(DESK_POLL_S="1", VAR_DIR=str(var_dir), **QUIET_SCHEDULES)
    stack = Stack(env=env, log_dir=ROOT / "var" / "test-logs" / f"desk-{uuid.uuid4().hex[:8]}")
    port = free_port()
    try:
        stack.start_worker(concurrency=2)
        stack.start_web(port)
        stack.start_beat()
        live = LiveStack(stack=stack, port=port)
        live.var_dir = var_dir  # type: ignore[attr-defined]
        yield live
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser(django_db_setup):
    """Debian's Chromium driven by Playwright (never a downloaded browser).

    Playwright's sync API keeps an event loop in this thread while it is open, which
    Django's async-safety check takes for async code; the ORM calls of these tests are
    plain synchronous calls, so the check is lifted for this module only."""
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        yield from _chromium(sync_playwright)
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def _chromium(sync_playwright) -> Iterator:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield chromium
        chromium.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def screenshot_dir() -> Path:
    folder = ARTIFACTS / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
