"""A real stack for end-to-end tests: uvicorn (ASGI), a Celery worker and, when asked,
beat, all as subprocesses on the test database and the real Redis."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from stack import Stack, free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveStack:
    stack: Stack
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None
    ) -> tuple[int, dict]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Token {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def start_beat(self) -> None:
        if "beat" not in self.stack.procs:
            self.stack.start_beat()

    def quiesce(self, timeout: float = 30.0) -> None:
        """Stop beat and wait until the worker has no task running or reserved, so the
        next test's table flush does not race work the last test left behind."""
        from config.celery import app

        if "beat" in self.stack.procs:
            self.stack.kill("beat", signal.SIGTERM)
        inspect = app.control.inspect(timeout=1.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = [
                task
                for replies in (inspect.active() or {}, inspect.reserved() or {})
                for tasks in replies.values()
                for task in tasks
            ]
            if not busy:
                return
            time.sleep(0.2)


def _stack_env(redis_url: str) -> dict[str, str]:
    from django.db import connection

    settings_dict = connection.settings_dict
    env = dict(os.environ)
    if connection.vendor == "postgresql":
        env["DATABASE_URL"] = (
            f"postgres://{settings_dict['USER'] or 'postgres'}@{settings_dict['HOST'] or '127.0.0.1'}:"
            f"{settings_dict['PORT'] or 5432}/{settings_dict['NAME']}"
        )
    else:
        env["DATABASE_URL"] = f"sqlite:///{settings_dict['NAME']}"
    env.update(
        REDIS_URL=redis_url,
        DEBUG="true",
        CELERY_TASK_ALWAYS_EAGER="false",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        HEARTBEAT_INTERVAL_S="1",
        PYTHONUNBUFFERED="1",
    )
    return env


# One stack per module, stopped at its end: a worker and beat left running would act on
# the next modules' rows in the shared test database (watchdogs, resumed rollbacks).
@pytest.fixture(scope="module")
def live_stack(django_db_setup, django_db_blocker, request, tmp_path_factory):
    from django.conf import settings

    if request.config.redis_problem:
        pytest.skip(request.config.redis_problem)
    env = _stack_env(settings.REDIS_URL)
    log_dir = ROOT / "var" / "test-logs" / uuid.uuid4().hex[:8]
    stack = Stack(env=env, log_dir=log_dir)
    port = free_port()
    try:
        stack.start_worker(concurrency=2)
        stack.start_web(port)
        yield LiveStack(stack=stack, port=port)
    finally:
        stack.stop()


@pytest.fixture(autouse=True)
def _quiet_after_live_stack(request):
    """After a test on the live stack, stop beat and let the worker drain before the
    database is flushed (requested after the database fixture, so torn down before it)."""
    if "live_stack" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("transactional_db")
    stack = request.getfixturevalue("live_stack")
    yield
    stack.quiesce()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
