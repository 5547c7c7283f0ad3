"""The database unreachable during an active phase, for real processes.

One run (module fixture): a Celery worker and beat whose DATABASE_URL goes through a cut
(a TCP proxy in front of PostgreSQL, a directory link in front of SQLite) on a private
Redis; a binance deployment in phase 1 of a RUNNING rollout holds three coins on the
Binance stub. The cut is made; the watchdog (beat, every second) must start stage 1 from
Redis and the exchange alone and flatten; the cut is restored; the journaled records must
appear, once. The in-process version of the journal path is
tests/safety/test_rollback.py::test_stage1_runs_with_the_database_down_and_is_replayed.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection

from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub, StubMarket

from .harness import (
    database_cut,
    flush_database,
    private_stack,
    restored_connection,
    tail,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

BASES = ["D0", "D1", "D2"]
SYMBOLS = [f"{b}/BTC" for b in BASES]
HELD = 4.0
DEPLOYMENT_ID = 1_900_000_101


@dataclass
class Outcome:
    during_rollbacks: int
    during_journals: int
    flat_during_cut: bool
    stub_orders: list[tuple[str, str, str, Decimal]]
    cut_at: float
    order_times: list[float]
    rollbacks: list[dict]
    steps: dict[str, str]
    closes: list[tuple[str, str, str]]
    kill_switch: str
    mirror: str
    signals_enabled: bool
    rollout_state: str
    rollback_rollout: int | None
    rollout_id: int
    logs: str


def _markets() -> list[StubMarket]:
    return [
        StubMarket(f"{b}BTC", b, "BTC", 0.001 * (n + 1), "0.01", "0.01", "0.000001", "0.0001")
        for n, b in enumerate(BASES)
    ]


def _active_phase() -> int:
    """The deployment, its positions and a RUNNING rollout in phase 1; the rollout id."""
    from django.utils import timezone

    from canary.models import Phase, Rollout
    from trading.models import Deployment, KillSwitch, MarketStream, Position

    now = timezone.now()
    deployment = Deployment.objects.create(
        id=DEPLOYMENT_ID, name="faults-db-down", exchange="binance", symbols=SYMBOLS,
        timeframe="5m", full_order_notional=0.1, allocation=0.1, starting_cash=1.0, cash=1.0,
        kill_switch=KillSwitch.ACTIVE,
    )  # fmt: skip
    for n, symbol in enumerate(SYMBOLS):
        price = 0.001 * (n + 1)
        Position.objects.create(
            deployment=deployment, symbol=symbol, qty=HELD, avg_entry=price, last_price=price
        )
        MarketStream.objects.create(
            exchange="binance", symbol=symbol, timeframe="5m", last_received_at=now
        )
    plan = [{"allocation": a, "min_duration_s": 86400, "extension_s": 600} for a in (0.1, 0.5)]
    rollout = Rollout.objects.create(
        deployment=deployment, name="faults-db-down", plan=plan, state="RUNNING",
        current_phase=1, created_at=now, started_at=now,
    )  # fmt: skip
    Phase.objects.create(
        rollout=rollout, index=1, allocation=0.1, min_duration_s=86400, extension_s=600,
        started_at=now, ends_at=now + timedelta(days=1),
    )  # fmt: skip
    return rollout.pk


def _env(stub: BinanceStub, tmp, prefix: str) -> dict[str, str]:
    return {
        "TRADING_EXCHANGE_BASE_URL": stub.base_url,
        "TRADING_EXCHANGE_API_KEY": API_KEY,
        "TRADING_EXCHANGE_API_SECRET": API_SECRET,
        "TRADING_EXCHANGE_TIMEOUT_MS": "3000",
        "TRADING_UNKNOWN_GRACE_S": "1",
        "SAFETY_REDIS_PREFIX": prefix,
        "SAFETY_JOURNAL_DIR": str(tmp / "journal"),
        "SAFETY_BACKUP_DIR": str(tmp / "backups"),
        "SAFETY_PREFLIGHT_DIR": str(tmp / "preflight"),
        "SAFETY_WATCHDOG_INTERVAL_S": "1",
        "SAFETY_DB_DOWN_TICKS": "2",
        "SAFETY_ORDER_GRACE_S": "1",
        "SAFETY_FLAT_CHECK_PAUSE_S": "0",
        "SAFETY_ROLLBACK_LEASE_S": "2",
        "CANARY_MONITOR_INTERVAL_S": "1",
        "TRADING_RECONCILE_INTERVAL_S": "3600",
        "SAFETY_STREAM_SILENT_S": "600",
        # SQLite's cut removes the directory link to the file: a connection opened before it
        # keeps the file and goes on writing. Each task opens its own, as after a real loss.
        **({"WORKER_DB_CONN_MAX_AGE": "0"} if connection.vendor == "sqlite" else {}),
    }


def _monitor_steps(stack) -> int:
    log = stack.log_dir / "worker.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(
        1 for line in text.splitlines() if "Task canary.monitor[" in line and " succeeded" in line
    )


def _cut_between_monitor_steps(stack, cut) -> None:
    """Cut right after a monitor step ended: the next one starts a second later and fails
    on its first query. (A cut in the middle of a monitor step is another story:
    test_a_monitor_failing_closed_first_does_not_stop_the_offline_flatten.)"""
    seen = _monitor_steps(stack)
    wait_for(lambda: _monitor_steps(stack) > seen, 30, "a monitor step", interval=0.02)
    cut.cut()


def _flat(stub: BinanceStub) -> bool:
    return all(stub.balance(b) == (Decimal(0), Decimal(0)) for b in BASES)


def _collect(stub: BinanceStub, rollout_id: int, cut_at: float, during: tuple, logs: str):
    from canary import killswitch
    from canary.models import Rollback, RollbackStep, Rollout
    from trading.models import Deployment, Order

    rollbacks = list(
        Rollback.objects.filter(deployment_id=DEPLOYMENT_ID).values(
            "pk", "trigger", "cause", "state", "rollout_id"
        )
    )
    steps = dict(
        RollbackStep.objects.filter(rollback__deployment_id=DEPLOYMENT_ID).values_list(
            "name", "outcome"
        )
    )
    deployment = Deployment.objects.get(pk=DEPLOYMENT_ID)
    try:
        state = killswitch.read_state(DEPLOYMENT_ID).value
    except killswitch.KillSwitchUnreadable as exc:
        state = f"unreadable: {exc}"
    posts = [r for r in stub.log if (r.method, r.path) == ("POST", "/api/v3/order")]
    return Outcome(
        during_rollbacks=during[0],
        during_journals=during[1],
        flat_during_cut=during[2],
        stub_orders=[
            (o.client_order_id, o.side, o.symbol, o.executed_qty) for o in stub.orders.values()
        ],
        cut_at=cut_at,
        order_times=[r.at for r in posts],
        rollbacks=rollbacks,
        steps=steps,
        closes=list(
            Order.objects.filter(deployment_id=DEPLOYMENT_ID, purpose="flatten").values_list(
                "client_order_id", "symbol", "status"
            )
        ),
        kill_switch=state,
        mirror=deployment.kill_switch,
        signals_enabled=deployment.signals_enabled,
        rollout_state=Rollout.objects.get(pk=rollout_id).state,
        rollback_rollout=rollbacks[0]["rollout_id"] if rollbacks else None,
        rollout_id=rollout_id,
        logs=logs,
    )


def _run(tmp) -> Outcome:
    from django.test import override_settings

    from canary import killswitch
    from canary.heartbeat import redis_client
    from canary.journal import pending_journals
    from canary.models import Rollback, RollbackState
    from canary.stage1 import snapshot_load
    from trading.models import KillSwitch

    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    rollout_id = _active_phase()
    with (
        BinanceStub(_markets(), balances={"BTC": 1.0}) as stub,
        database_cut(tmp) as cut,
        private_stack(_env(stub, tmp, prefix), web=False, beat=True, database_url=cut.url) as (
            live,
            redis,
        ),
        override_settings(REDIS_URL=redis.url, SAFETY_REDIS_PREFIX=prefix),
    ):
        redis_client.cache_clear()
        for base in BASES:
            stub.set_balance(base, HELD)
        killswitch.write_redis(DEPLOYMENT_ID, KillSwitch.ACTIVE)
        try:
            wait_for(lambda: snapshot_load(DEPLOYMENT_ID), 60, "the watchdog's snapshot")
            _cut_between_monitor_steps(live.stack, cut)
            cut_at = time.monotonic()
            try:
                wait_for(lambda: _flat(stub), 60, "stage 1 flat while the database is down")
                time.sleep(1.0)
                during = (
                    Rollback.objects.count(),
                    len(pending_journals(tmp / "journal")),
                    _flat(stub),
                )
            finally:
                cut.restore()
            done = Rollback.objects.filter(state=RollbackState.COMPLETED)
            wait_for(done.exists, 60, "the journaled rollback recorded and completed")
            time.sleep(3.0)  # monitor steps after the rollback is back
        finally:
            logs = tail(live.stack)
        outcome = _collect(stub, rollout_id, cut_at, during, logs)
        redis_client.cache_clear()
    return outcome


@pytest.fixture(scope="module")
def outcome(django_db_setup, django_db_blocker, request, tmp_path_factory) -> Outcome:
    if request.config.redis_problem:
        pytest.skip(request.config.redis_problem)
    with django_db_blocker.unblock():
        try:
            result = _run(tmp_path_factory.mktemp("dbdown"))
        except Exception as exc:  # not an AssertionError: no xfail may swallow it
            raise RuntimeError(f"the scenario did not run: {exc}") from exc
        finally:
            flush_database()
    print(
        f"\ndatabase down: rollbacks {result.rollbacks}; kill switch {result.kill_switch}; "
        f"rollout {result.rollout_state}; stub orders {len(result.stub_orders)}"
    )
    return result


def test_stage1_flattens_while_the_database_is_down(outcome: Outcome):
    assert outcome.flat_during_cut
    assert outcome.during_rollbacks == 0, "written while the database was unreachable?"
    assert outcome.during_journals == 1


def test_no_new_order_is_placed(outcome: Outcome):
    assert outcome.stub_orders, "nothing reached the exchange"
    assert all(side == "SELL" for _, side, _, _ in outcome.stub_orders), outcome.stub_orders
    sells = Counter(symbol for _, _, symbol, qty in outcome.stub_orders if qty > 0)
    assert sells == Counter({f"{b}BTC": 1 for b in BASES})
    ids = [cid for cid, *_ in outcome.stub_orders]
    assert len(ids) == len(set(ids))
    assert all(at > outcome.cut_at for at in outcome.order_times)


def test_the_records_appear_once_the_database_is_back(outcome: Outcome):
    from canary.stage1 import STEPS

    [rollback] = outcome.rollbacks
    assert rollback["trigger"] == "watchdog" and rollback["cause"] == "database unreachable"
    assert rollback["state"] == "COMPLETED"
    assert all(outcome.steps.get(name) == "ok" for name in STEPS), outcome.steps
    filled = {cid for cid, _, status in outcome.closes if status == "FILLED"}
    assert filled == {cid for cid, _, _, qty in outcome.stub_orders if qty > 0}
    assert len(outcome.closes) == len({cid for cid, _, _ in outcome.closes})
    assert outcome.kill_switch == outcome.mirror == "HALTED"
    assert outcome.signals_enabled is False


def test_the_active_rollout_follows_the_rollback(outcome: Outcome):
    assert outcome.rollback_rollout == outcome.rollout_id
    assert outcome.rollout_state in ("ROLLING_BACK", "ROLLED_BACK")


def _lose_the_database() -> None:
    """The database goes away: the connection now points at nothing."""
    from django.db import connection

    connection.close()
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = "/nonexistent-dir/db.sqlite3"
    else:
        connection.settings_dict["PORT"] = 1


def test_a_monitor_failing_closed_first_does_not_stop_the_offline_flatten(
    deployment_factory, safety_tmp, redis_url, monkeypatch
):
    from django.db import OperationalError
    from django.utils import timezone

    from canary import killswitch, safety_adapters
    from canary.models import Phase, Rollout
    from canary.monitor import monitor_all
    from canary.stage1 import DeploymentSnapshot, snapshot_store
    from canary.watchdogs import watchdogs_tick
    from tests.safety.helpers import open_positions, paper_exchange
    from trading.models import KillSwitch

    symbols = ("ETH/BTC", "LTC/BTC")
    deployment = deployment_factory(symbols=symbols)
    paper = paper_exchange(symbols)
    open_positions(deployment, paper, [("ETH/BTC", 1.0), ("LTC/BTC", 2.0)])
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: paper)
    killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
    now = timezone.now()
    rollout = Rollout.objects.create(
        deployment=deployment, name="mid-step", plan=[{"allocation": 0.1,
        "min_duration_s": 3600, "extension_s": 600}], state="RUNNING", current_phase=1,
        created_at=now, started_at=now,
    )  # fmt: skip
    Phase.objects.create(rollout=rollout, index=1, allocation=0.1, min_duration_s=3600,
                         extension_s=600, started_at=now, ends_at=now + timedelta(hours=1))  # fmt: skip
    snapshot_store(DeploymentSnapshot.of(deployment))

    def dies_mid_step(**kwargs):
        _lose_the_database()
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr("canary.monitor.monitor_step", dies_mid_step)
    with restored_connection():
        monitor_all(now=now)
        watchdogs_tick()
        watchdogs_tick()
    assert killswitch.read_state(deployment.pk) == KillSwitch.HALTED
    assert paper.positions() == {}, f"still held with the database down: {paper.positions()}"
