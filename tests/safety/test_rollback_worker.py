"""A real Celery worker runs a rollback against the Binance stub and is SIGKILLed in the
middle of stage 1; a new worker resumes it at start (worker_ready) and finishes flat,
with exactly one closing sell per symbol and no client order id sent twice."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import Counter
from decimal import Decimal

import pytest
from django.db import connection
from stack import PYTHON, Stack

from canary import killswitch
from canary.models import Rollback, RollbackState, RollbackStep
from canary.rollback import STAGE2, rollback_request
from canary.stage1 import STEPS
from config.celery import app
from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub, StubMarket
from trading.models import KillSwitch, Order, Position

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore::celery.exceptions.AlwaysEagerIgnored"),
]
BASES = [f"K{n}" for n in range(6)]
SYMBOLS = [f"{b}/BTC" for b in BASES]
HELD = 5.0
ORDER = ("POST", "/api/v3/order")


def _markets() -> list[StubMarket]:
    return [
        StubMarket(f"{b}BTC", b, "BTC", 0.001 * (n + 1), "0.01", "0.01", "0.000001", "0.0001")
        for n, b in enumerate(BASES)
    ]


def _database_url() -> str:
    conf = connection.settings_dict
    if connection.vendor == "postgresql":
        return (
            f"postgres://{conf['USER'] or 'postgres'}@{conf['HOST'] or '127.0.0.1'}:"
            f"{conf['PORT'] or 5432}/{conf['NAME']}"
        )
    return f"sqlite:///{conf['NAME']}"


def _worker_env(settings, stub: BinanceStub) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=_database_url(),
        REDIS_URL=settings.REDIS_URL,
        CELERY_TASK_ALWAYS_EAGER="false",
        PYTHONUNBUFFERED="1",
        SAFETY_REDIS_PREFIX=settings.SAFETY_REDIS_PREFIX,
        SAFETY_BACKUP_DIR=str(settings.SAFETY_BACKUP_DIR),
        SAFETY_JOURNAL_DIR=str(settings.SAFETY_JOURNAL_DIR),
        SAFETY_CLOSE_DELAY_S="0.6",
        SAFETY_ORDER_GRACE_S="1",
        SAFETY_ROLLBACK_LEASE_S="2",
        SAFETY_FLAT_CHECK_PAUSE_S="0",
        TRADING_UNKNOWN_GRACE_S="1",
        SAFETY_EXCHANGE_OVERRIDE=json.dumps(
            {
                "kind": "ccxt",
                "exchange_id": "binance",
                "base_url": stub.base_url,
                "api_key": API_KEY,
                "api_secret": API_SECRET,
                "timeout_ms": 3000,
            }
        ),
    )
    return env


def _start_worker(stack: Stack, name: str, queue: str) -> None:
    stack.start(
        name,
        [PYTHON, "-m", "celery", "-A", "config", "worker", "-l", "info", "-n", f"{name}-{queue}@%h",
         "-Q", queue, "--concurrency", "1", "--without-gossip", "--without-mingle"],
    )  # fmt: skip


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached within {timeout:.0f} s")


def _state(pk: int) -> str:
    return Rollback.objects.filter(pk=pk).values_list("state", flat=True).get()


@pytest.fixture
def stub():
    with BinanceStub(_markets(), balances={"BTC": 1.0}) as server:
        for base in BASES:
            server.set_balance(base, HELD)
        yield server


def test_worker_killed_mid_stage1_resumes_and_finishes_flat(
    stub, make_deployment, settings, redis_url, monkeypatch, tmp_path
):
    deployment = make_deployment(symbols=SYMBOLS, exchange="binance")
    for n, symbol in enumerate(SYMBOLS):
        price = 0.001 * (n + 1)
        Position.objects.create(
            deployment=deployment, symbol=symbol, qty=HELD, avg_entry=price, last_price=price
        )
    killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
    queue = f"safety-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(
        "canary.rollback.enqueue_run",
        lambda pk, queue_name=None: app.send_task("canary.rollback_run", args=[pk], queue=queue),
    )
    stack = Stack(env=_worker_env(settings, stub), log_dir=tmp_path / "logs")
    try:
        _start_worker(stack, "first", queue)
        rollback = rollback_request(
            deployment=deployment, trigger="gate", cause="drawdown", actor="monitor"
        )
        _wait(lambda: stub.count(*ORDER) >= 2, 60, "two closing orders sent")
        stack.kill("first")
        sent_before_kill = stub.count(*ORDER)
        assert sent_before_kill < len(SYMBOLS)
        assert _state(rollback.pk) == RollbackState.RUNNING

        _start_worker(stack, "second", queue)
        _wait(lambda: _state(rollback.pk) == RollbackState.COMPLETED, 90, "rollback completed")
    finally:
        stack.stop()
        _dump_logs(tmp_path / "logs")

    assert all(stub.balance(base) == (Decimal(0), Decimal(0)) for base in BASES)
    posts = [r for r in stub.log if (r.method, r.path) == ORDER]
    cids = [r.params.get("newClientOrderId") for r in posts]
    assert len(cids) == len(set(cids)), "a client order id was sent twice"
    sells = Counter(
        o.symbol for o in stub.orders.values() if o.side == "SELL" and o.executed_qty > 0
    )
    assert sells == Counter({s.replace("/", ""): 1 for s in SYMBOLS})
    rollback.refresh_from_db()
    assert rollback.report["runs"] >= 2
    assert killswitch.read_state(deployment.pk) == KillSwitch.HALTED
    outcomes = dict(RollbackStep.objects.filter(rollback=rollback).values_list("name", "outcome"))
    assert all(outcomes[s] == "ok" for s in STEPS), sorted(outcomes.items())
    assert all(outcomes[s] == "ok" for s in STAGE2), sorted(outcomes.items())
    filled = Order.objects.filter(deployment=deployment, purpose="flatten", status="FILLED")
    assert sorted(filled.values_list("symbol", flat=True)) == sorted(SYMBOLS)


def _dump_logs(directory) -> None:
    """On failure the worker logs explain why; pytest shows captured output then."""
    for log in sorted(directory.glob("*.log")):
        sys.stdout.write(f"\n===== {log.name} =====\n{log.read_text()[-4000:]}\n")
