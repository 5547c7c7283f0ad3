"""A Celery worker keeps its PostgreSQL connection across tasks, and a connection the
database dropped is replaced on the next task instead of failing it (config/celery.py:
WORKER_DB_CONN_MAX_AGE with Django's health checks)."""

from __future__ import annotations

import time
import uuid

import pytest
from django.db import connection
from stack import ROOT, Stack

from .conftest import _stack_env, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.filterwarnings("ignore:task_always_eager has no effect"),
]


@pytest.fixture
def candle_worker(django_db_setup, request):
    from django.conf import settings

    if connection.vendor != "postgresql":
        pytest.skip("persistent worker connections are checked on PostgreSQL")
    if request.config.redis_problem:
        pytest.skip(request.config.redis_problem)
    stack = Stack(
        env=_stack_env(settings.REDIS_URL),
        log_dir=ROOT / "var" / "test-logs" / uuid.uuid4().hex[:8],
    )
    try:
        stack.start_worker("worker-candles", concurrency=1, queues=("alerts.candles",))
        log = stack.log_dir / "worker-candles.log"
        wait_until(lambda: log.exists() and "ready." in log.read_text(), timeout=60)
        yield stack
    finally:
        stack.stop()


def _process(pk: int) -> None:
    from config.celery import app
    from trading.models import Candle

    app.send_task("alerts.process_candles", args=[[pk]])
    wait_until(lambda: Candle.objects.filter(pk=pk, processed_at__isnull=False).exists(), 30)


def _candle(i: int) -> int:
    from django.utils import timezone

    from trading.models import Candle

    open_ms = 1_600_000_000_000 + i * 300_000
    candle = Candle.objects.create(
        exchange="conn",
        symbol="CONN/USDT",
        timeframe="5m",
        open_time_ms=open_ms,
        close_time_ms=open_ms + 299_999,
        open=100.0,
        high=101.0,
        low=99.0,
        close=100.5,
        volume=1.0,
        ingested_at=timezone.now(),
    )
    return candle.pk


def _worker_backends() -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return {pid for (pid,) in cursor.fetchall()}


def test_worker_reuses_its_connection_and_replaces_a_dropped_one(candle_worker):
    _process(_candle(0))
    first = _worker_backends()
    assert first, "the worker holds no connection between tasks"
    for i in range(1, 4):
        _process(_candle(i))
    assert _worker_backends() == first

    with connection.cursor() as cursor:
        for pid in first:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_until(lambda: not (_worker_backends() & first), 10)
    time.sleep(0.2)

    _process(_candle(4))
    after = _worker_backends()
    assert after and not (after & first)
    log = (candle_worker.log_dir / "worker-candles.log").read_text()
    assert "raised unexpected" not in log, log[-3000:]
