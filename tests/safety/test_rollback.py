"""Rollback in-process against a paper exchange: stages 1 and 2 recorded, a second request
joining the first, nothing to close, an entry filled on the exchange but not yet recorded
(looked up first, then closed; or, when it cannot be, no claim of flat), a crash mid stage 1 resumed without a second close,
stage 1 with the database unreachable (journal, then replay), stage 3, the stream watchdog."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from audit.models import AuditEvent
from canary import killswitch, safety_adapters
from canary.backup import backup_create
from canary.journal import pending_journals
from canary.models import Rollback, RollbackState, RollbackStep
from canary.rollback import (
    RollbackDenied,
    pnl_impact,
    rollback_request,
    rollback_restore,
    rollback_run,
)
from canary.stage1 import STEPS, DeploymentSnapshot, Recorder, snapshot_store
from canary.watchdogs import watchdogs_tick
from tests.safety.helpers import fresh_market, open_positions, paper_exchange
from trading.exchange import OrderRequest, TemporaryExchangeError
from trading.models import Deployment, KillSwitch, MarketStream, Order, OrderStatus, Position

pytestmark = pytest.mark.django_db(transaction=True)
SYMBOLS = ("ETH/BTC", "LTC/BTC", "XRP/BTC")
LOTS = [("ETH/BTC", 1.5), ("LTC/BTC", 2.0), ("ETH/BTC", 0.5), ("XRP/BTC", 3.0)]
STAGE2 = ("capture_logs", "snapshot_db", "pnl_impact", "report")


class Crash(BaseException):
    """A worker dying: not an Exception, nothing catches it."""


@pytest.fixture
def trading(make_deployment, monkeypatch, settings, redis_url):
    settings.TRADING_UNKNOWN_GRACE_S = 0.0
    deployment = make_deployment(symbols=SYMBOLS)
    paper = paper_exchange(SYMBOLS)
    open_positions(deployment, paper, LOTS, resting=["LTC/BTC"])
    killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: paper)
    deployment.refresh_from_db()
    return deployment, paper


class Wrapped:
    """The paper exchange with some of its methods replaced by a subclass."""

    def __init__(self, paper):
        self.paper = paper

    def __getattr__(self, name):
        return getattr(self.paper, name)


def _closing_orders(deployment: Deployment) -> list[Order]:
    return list(Order.objects.filter(deployment=deployment, purpose="flatten"))


def _assert_flat_and_halted(deployment: Deployment, paper) -> None:
    assert paper.positions() == {}
    assert paper.fetch_open_orders() == []
    assert killswitch.read_state(deployment.pk) == KillSwitch.HALTED
    deployment.refresh_from_db()
    assert deployment.kill_switch == KillSwitch.HALTED
    assert deployment.signals_enabled is False


def _sells_per_symbol(paper) -> Counter:
    return Counter(
        cid.split("-")[0] + ":" + cid for cid, side, _, _ in paper.fills if side == "sell"
    )


def test_rollback_flattens_halts_records_and_reports(trading, capsys):
    deployment, paper = trading
    logging.getLogger("trading.execution").error("order error before the rollback")
    rollback = rollback_request(
        deployment=deployment,
        trigger="gate",
        cause="drawdown -3.4 %",
        reasons=[{"metric": "drawdown_pct"}],
        actor="monitor",
    )
    rollback.refresh_from_db()
    assert rollback.state == RollbackState.COMPLETED, rollback.report
    _assert_flat_and_halted(deployment, paper)
    steps = {s.name: s for s in RollbackStep.objects.filter(rollback=rollback)}
    assert list(steps) == [*STEPS, *STAGE2]
    assert all(s.outcome == "ok" and s.started_at <= s.ended_at for s in steps.values())
    closes = _closing_orders(deployment)
    assert sorted(o.symbol for o in closes) == sorted(SYMBOLS)
    assert all(o.status == "FILLED" and o.reduce_only and o.side == "sell" for o in closes)
    assert not Position.objects.filter(deployment=deployment, qty__gt=0).exists()
    report = rollback.report
    assert report["stage1"]["within_target"] is True and report["stage1"]["complete"] is True
    assert report["pnl"]["closing_orders"] == 3 and report["pnl"]["flatten_fees"] > 0
    assert report["backup"]["sha256"] and report["holdings_before"]["ETH/BTC"] == pytest.approx(2.0)
    actions = set(
        AuditEvent.objects.filter(target_id=str(rollback.pk)).values_list("action", flat=True)
    )
    assert {
        "rollback.requested",
        "rollback.step",
        "rollback.stage1_done",
        "rollback.completed",
    } <= actions
    from alerts.models import Alert

    alert = Alert.objects.get(dedupe_key__contains=f"rollback:{rollback.pk}:stage1:flat")
    assert alert.severity == "critical"
    messages = [e["message"] for e in report["logs"]["errors"]]
    assert "order error before the rollback" in messages
    call_command("rollback_report", "--rollback", str(rollback.pk))
    printed = capsys.readouterr().out
    assert "COMPLETED" in printed and "close_positions" in printed and "pnl:" in printed


def test_the_reports_flatten_pnl_is_against_the_entry_prices(trading):
    """Stage 2 runs after stage 1 closed the positions, whose average entry is then 0: the
    entry prices are those stage 1 read before closing, not the proceeds of the sales."""
    deployment, _ = trading
    before = {p.symbol: p.avg_entry for p in Position.objects.filter(deployment=deployment)}
    rollback = rollback_request(deployment=deployment, trigger="gate", cause="x", actor="m")
    rollback.refresh_from_db()
    closes = _closing_orders(deployment)
    expected = sum((o.avg_fill_price - before[o.symbol]) * o.filled_qty for o in closes)
    proceeds = sum(o.avg_fill_price * o.filled_qty for o in closes)
    assert rollback.report["pnl"]["flatten_realised_pnl"] == pytest.approx(expected, abs=1e-12)
    assert abs(expected) < proceeds / 10


def test_second_request_joins_the_first_and_it_runs_once(trading, monkeypatch):
    deployment, paper = trading
    queued = []
    monkeypatch.setattr("canary.rollback.enqueue_run", lambda pk, queue=None: queued.append(pk))
    first = rollback_request(
        deployment=deployment, trigger="gate", cause="error rate 7 %", actor="monitor"
    )
    second = rollback_request(
        deployment=deployment, trigger="watchdog", cause="stream silent", actor="watchdog"
    )
    assert second.pk == first.pk and queued == [first.pk]
    assert killswitch.read_state(deployment.pk) == KillSwitch.REDUCING
    rollback_run(first.pk)
    rollback_run(first.pk)
    first.refresh_from_db()
    assert first.state == RollbackState.COMPLETED
    assert [j["cause"] for j in first.report["joined"]] == ["stream silent"]
    assert len(_closing_orders(deployment)) == len(SYMBOLS)
    assert len([f for f in paper.fills if f[1] == "sell"]) == len(SYMBOLS)


def test_rollback_with_no_open_positions_completes_cleanly(make_deployment, monkeypatch, redis_url):
    deployment = make_deployment(symbols=SYMBOLS)
    paper = paper_exchange(SYMBOLS)
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: paper)
    rollback = rollback_request(deployment=deployment, trigger="watchdog", cause="test", actor="w")
    rollback.refresh_from_db()
    assert rollback.state == RollbackState.COMPLETED
    outcomes = dict(RollbackStep.objects.filter(rollback=rollback).values_list("name", "outcome"))
    assert outcomes["close_positions"] == "skipped" and outcomes["verify_flat"] == "ok"
    assert _closing_orders(deployment) == []


def _lost_entry(deployment: Deployment, paper, qty: float) -> str:
    """An entry the exchange filled while its record says UNKNOWN (the answer was lost):
    no position counts it yet."""
    cid = f"entry-{deployment.pk}-lost"
    paper.create_order(OrderRequest("ETH/BTC", "buy", "market", qty, client_order_id=cid))
    Order.objects.create(
        deployment=deployment,
        client_order_id=cid,
        symbol="ETH/BTC",
        side="buy",
        requested_qty=qty,
        status=OrderStatus.UNKNOWN,
        created_at=timezone.now() - timedelta(seconds=30),
        submitted_at=timezone.now() - timedelta(seconds=30),
    )
    return cid


def test_an_entry_filled_but_recorded_unknown_is_settled_then_closed(
    make_deployment, monkeypatch, settings, redis_url
):
    settings.TRADING_UNKNOWN_GRACE_S = 0.0
    deployment = make_deployment(symbols=("ETH/BTC",))
    paper = paper_exchange(("ETH/BTC",))
    cid = _lost_entry(deployment, paper, 1.5)
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: paper)
    rollback = rollback_request(deployment=deployment, trigger="gate", cause="test", actor="m")
    rollback.refresh_from_db()
    assert paper.positions() == {}
    entry = Order.objects.get(client_order_id=cid)
    assert entry.status == OrderStatus.FILLED and entry.filled_qty == pytest.approx(1.5)
    (close,) = _closing_orders(deployment)
    assert close.status == OrderStatus.FILLED and close.filled_qty == pytest.approx(1.5)
    assert not Position.objects.filter(deployment=deployment, qty__gt=0).exists()
    outcomes = dict(RollbackStep.objects.filter(rollback=rollback).values_list("name", "outcome"))
    assert outcomes["close_positions"] == "ok" and outcomes["verify_flat"] == "ok"
    assert rollback.state == RollbackState.COMPLETED


class LookupDown(Wrapped):
    """The paper exchange, its look-ups by client id failing."""

    def fetch_order_by_client_id(self, symbol, client_order_id):
        raise TemporaryExchangeError("lookup timed out")


def test_an_entry_that_cannot_be_looked_up_keeps_the_rollback_from_saying_flat(
    make_deployment, monkeypatch, settings, redis_url
):
    settings.TRADING_UNKNOWN_GRACE_S = 0.0
    deployment = make_deployment(symbols=("ETH/BTC",))
    paper = paper_exchange(("ETH/BTC",))
    cid = _lost_entry(deployment, paper, 1.5)
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: LookupDown(paper))
    rollback = rollback_request(deployment=deployment, trigger="gate", cause="test", actor="m")
    rollback.refresh_from_db()
    assert rollback.state != RollbackState.COMPLETED
    steps = {s.name: s for s in RollbackStep.objects.filter(rollback=rollback)}
    for name in ("close_positions", "verify_flat"):
        assert steps[name].outcome == "failed"
        assert cid in steps[name].detail["unsettled"]["ETH/BTC"], steps[name].detail
        assert "lookup timed out" in steps[name].detail["unsettled"]["ETH/BTC"]
    from alerts.models import Alert

    assert Alert.objects.filter(dedupe_key__contains=f"rollback:{rollback.pk}:stage1:incomplete")
    assert not Alert.objects.filter(dedupe_key__contains=f"rollback:{rollback.pk}:stage1:flat")


def test_person_needs_the_permission(trading, make_user):
    deployment, _ = trading
    viewer = make_user("viewer", "Viewer")
    with pytest.raises(RollbackDenied):
        rollback_request(deployment=deployment, trigger="person", cause="manual", actor=viewer)
    ops = make_user("ops", "Ops")
    rollback = rollback_request(deployment=deployment, trigger="person", cause="manual", actor=ops)
    assert rollback.requested_by == "ops"


class CrashAfterSends(Wrapped):
    """Crashes right after the n-th order reached the exchange (its reply never recorded)."""

    def __init__(self, paper, after: int):
        super().__init__(paper)
        self.left = after

    def create_order(self, request):
        result = self.paper.create_order(request)
        self.left -= 1
        if self.left == 0:
            raise Crash("worker killed")
        return result


def test_crash_mid_stage1_resumes_without_closing_twice(trading, monkeypatch, settings):
    deployment, paper = trading
    settings.SAFETY_FLATTEN_WORKERS = 1  # one close after the other: the crash lands between
    monkeypatch.setattr("canary.rollback.enqueue_run", lambda pk, queue=None: None)
    rollback = rollback_request(
        deployment=deployment, trigger="gate", cause="fail", actor="monitor"
    )
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: CrashAfterSends(paper, 2))
    with pytest.raises(Crash):
        rollback_run(rollback.pk)
    rollback.refresh_from_db()
    assert rollback.state == RollbackState.RUNNING
    assert len(paper.positions()) == 1
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: paper)
    rollback_run(rollback.pk)
    rollback.refresh_from_db()
    assert rollback.state == RollbackState.COMPLETED, rollback.report
    _assert_flat_and_halted(deployment, paper)
    sells = [f for f in paper.fills if f[1] == "sell"]
    assert len(sells) == len(SYMBOLS)
    assert len({cid for cid, *_ in sells}) == len(SYMBOLS)
    closes = _closing_orders(deployment)
    filled = Counter(o.symbol for o in closes if o.status == "FILLED")
    assert filled == Counter(SYMBOLS)
    [never_sent] = [o for o in closes if o.status != "FILLED"]
    assert never_sent.status == "ERROR" and never_sent.filled_qty == 0


@contextlib.contextmanager
def database_unreachable():
    """Point the connection at nothing (a missing directory / a closed port)."""
    saved = dict(connection.settings_dict)
    connection.close()
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = "/nonexistent-dir/db.sqlite3"
    else:
        connection.settings_dict["PORT"] = 1
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)


def test_stage1_runs_with_the_database_down_and_is_replayed(trading, settings):
    deployment, paper = trading
    snapshot_store(DeploymentSnapshot.of(deployment))
    with database_unreachable():
        first = watchdogs_tick()
        second = watchdogs_tick()
    assert first == {"database": "down", "offline": []}
    assert second == {"database": "down", "offline": [deployment.pk]}
    assert paper.positions() == {} and paper.fetch_open_orders() == []
    assert killswitch.read_state(deployment.pk) == KillSwitch.HALTED
    [journal] = pending_journals(settings.SAFETY_JOURNAL_DIR)
    state = journal.state()
    assert state.stage1_done and set(state.steps) == set(STEPS)
    assert Rollback.objects.count() == 0 and _closing_orders(deployment) == []

    result = watchdogs_tick()
    [rollback] = Rollback.objects.all()
    assert result["replayed"] == [rollback.pk]
    assert rollback.report["journal_key"] == state.key and rollback.trigger == "watchdog"
    assert rollback.cause == "database unreachable"
    assert rollback.state == RollbackState.COMPLETED, rollback.report
    assert rollback.stage1_ended_at is not None
    outcomes = dict(RollbackStep.objects.filter(rollback=rollback).values_list("name", "outcome"))
    assert all(outcomes[s] == "ok" for s in STEPS), outcomes
    assert sorted(o.symbol for o in _closing_orders(deployment)) == sorted(SYMBOLS)
    assert not Position.objects.filter(deployment=deployment, qty__gt=0).exists()
    deployment.refresh_from_db()
    assert deployment.kill_switch == KillSwitch.HALTED and deployment.signals_enabled is False
    assert pending_journals(settings.SAFETY_JOURNAL_DIR) == []
    replays = AuditEvent.objects.filter(
        action="rollback.journal_replayed", target_id=str(rollback.pk)
    )
    assert replays.count() == 1


class TickerFailsOnce(Wrapped):
    """The paper exchange, its first price request failing."""

    failed = False

    def fetch_ticker(self, symbol):
        if not self.failed:
            self.failed = True
            raise TemporaryExchangeError("ticker timed out")
        return self.paper.fetch_ticker(symbol)


def test_an_offline_stage1_that_failed_runs_again_while_the_database_is_down(
    trading, monkeypatch, settings
):
    deployment, paper = trading
    flaky = TickerFailsOnce(paper)
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: flaky)
    snapshot_store(DeploymentSnapshot.of(deployment))
    with database_unreachable():
        watchdogs_tick()
        failed = watchdogs_tick()
        held_after_failure = paper.positions()
        state_after_failure = killswitch.read_state(deployment.pk)
        again = watchdogs_tick()
    assert failed == {"database": "down", "offline": [deployment.pk]}
    assert held_after_failure and state_after_failure == KillSwitch.HALTED
    assert again == {"database": "down", "offline": [deployment.pk]}
    assert paper.positions() == {} and paper.fetch_open_orders() == []
    [journal] = pending_journals(settings.SAFETY_JOURNAL_DIR)
    assert journal.state().stage1_done


def test_an_offline_run_continuing_an_open_rollback_is_replayed_onto_it(
    trading, monkeypatch, settings
):
    deployment, paper = trading
    monkeypatch.setattr("canary.rollback.enqueue_run", lambda pk, queue=None: None)
    rollback = rollback_request(deployment=deployment, trigger="gate", cause="fail", actor="m")
    with database_unreachable():
        watchdogs_tick()
        assert watchdogs_tick() == {"database": "down", "offline": [deployment.pk]}
    assert paper.positions() == {}
    result = watchdogs_tick()
    assert result["replayed"] == [rollback.pk]
    assert list(Rollback.objects.filter(deployment=deployment)) == [rollback]
    rollback.refresh_from_db()
    assert rollback.state == RollbackState.STAGE1_DONE and rollback.stage1_ended_at is not None
    outcomes = dict(RollbackStep.objects.filter(rollback=rollback).values_list("name", "outcome"))
    assert all(outcomes[s] == "ok" for s in STEPS), outcomes


def test_a_step_begun_online_and_ended_offline_keeps_its_start(trading, monkeypatch):
    deployment, paper = trading
    end = Recorder.step_end

    def database_lost_before_the_end(self, name, stage, outcome, detail):
        if name == "verify_flat":
            self.go_offline()
        end(self, name, stage, outcome, detail)

    monkeypatch.setattr(Recorder, "step_end", database_lost_before_the_end)
    monkeypatch.setattr("canary.rollback.enqueue_run", lambda pk, queue=None: None)
    rollback = rollback_request(deployment=deployment, trigger="gate", cause="fail", actor="m")
    rollback_run(rollback.pk)
    began = RollbackStep.objects.get(rollback=rollback, name="verify_flat").started_at
    assert watchdogs_tick()["replayed"] == [rollback.pk]
    step = RollbackStep.objects.get(rollback=rollback, name="verify_flat")
    assert step.outcome == "ok" and step.started_at == began and step.started_at < step.ended_at


def test_replaying_a_journal_twice_changes_nothing(trading, settings):
    deployment, paper = trading
    snapshot_store(DeploymentSnapshot.of(deployment))
    from canary.rollback import journal_replay, rollback_run_offline

    with database_unreachable():
        key = rollback_run_offline(deployment.pk, cause="database unreachable")
    [journal] = pending_journals(settings.SAFETY_JOURNAL_DIR)
    copy = journal.path.read_text()
    journal_replay(journal)
    journal.path.write_text(copy)
    journal_replay(journal)
    assert Rollback.objects.filter(report__journal_key=key).count() == 1
    assert len(_closing_orders(deployment)) == len(SYMBOLS)
    from trading.models import Fill

    assert Fill.objects.filter(order__purpose="flatten").count() == len(SYMBOLS)


def test_stage3_restores_a_backup_and_marks_ready_for_restart(trading, make_user):
    deployment, paper = trading
    before = backup_create(actor="test", note="pre-rollout")
    rollback = rollback_request(
        deployment=deployment, trigger="gate", cause="fail", actor="monitor"
    )
    rollback.refresh_from_db()
    assert rollback.state == RollbackState.COMPLETED
    viewer, ops = make_user("viewer", "Viewer"), make_user("ops", "Ops")
    with pytest.raises(RollbackDenied):
        rollback_restore(rollback=rollback, backup=before, actor=viewer, reason="broken db")
    with pytest.raises(RollbackDenied):
        rollback_restore(rollback=rollback, backup=before, actor=ops, reason=" ")

    restored = rollback_restore(rollback=rollback, backup=before, actor=ops, reason="broken db")
    assert restored.state == RollbackState.RESTORED and restored.report["ready_for_restart"]
    info = restored.report["restore"]
    assert info["integrity"]["ok"] and info["audit_export"]["events"] > 0
    names = set(RollbackStep.objects.filter(rollback=restored).values_list("name", flat=True))
    assert {*STEPS, *STAGE2, "restore"} <= names
    assert len(_closing_orders(deployment)) == len(SYMBOLS)
    deployment.refresh_from_db()
    assert deployment.kill_switch == KillSwitch.HALTED and not deployment.signals_enabled
    assert AuditEvent.objects.filter(action="rollback.restored").count() == 1
    from audit.services import audit_verify

    assert audit_verify() is None


def test_stream_watchdog_rolls_back_an_active_deployment(trading, monkeypatch):
    deployment, _ = trading
    fresh_market(deployment, bars=2)
    monkeypatch.setattr("canary.rollback.enqueue_run", lambda pk, queue=None: None)
    assert watchdogs_tick()["silent"] == []
    MarketStream.objects.filter(symbol="XRP/BTC").update(
        last_received_at=timezone.now() - timedelta(seconds=45)
    )
    [rollback_id] = watchdogs_tick()["silent"]
    rollback = Rollback.objects.get(pk=rollback_id)
    assert rollback.trigger == "watchdog" and "silent for 45 s" in rollback.cause
    assert killswitch.read_state(deployment.pk) == KillSwitch.REDUCING


def test_pnl_impact_counts_slippage_and_fees():
    closes = [
        {"symbol": "A", "filled": 2.0, "average": 9.9, "reference_price": 10.0, "fee": 0.02},
        {"symbol": "B", "filled": 0.0, "average": None, "reference_price": 5.0, "fee": 0.0},
    ]
    t0 = timezone.now()
    pnl = pnl_impact(
        holdings_before={"A": 2.0},
        entries={"A": 9.0},
        closes=closes,
        equity=[(t0, 100.0), (t0 + timedelta(hours=1), 97.0)],
        positions_realised=1.8,
    )
    assert pnl["flatten_slippage_cost"] == pytest.approx(0.2)
    assert pnl["flatten_fees"] == pytest.approx(0.02)
    assert pnl["flatten_cost"] == pytest.approx(0.22)
    assert pnl["flatten_realised_pnl"] == pytest.approx(1.8)
    assert pnl["rollout_pnl"] == pytest.approx(-3.0)
    assert pnl["by_symbol"]["A"] == {"held_before": 2.0, "sold": 2.0, "fees": 0.02}


def test_watchdog_requeues_a_rollback_whose_worker_died(trading, monkeypatch):
    deployment, _ = trading
    queued = []
    monkeypatch.setattr("canary.rollback.enqueue_run", lambda pk, queue=None: queued.append(pk))
    monkeypatch.setattr("canary.watchdogs.enqueue_run", lambda pk, queue=None: queued.append(pk))
    rollback = rollback_request(deployment=deployment, trigger="gate", cause="fail", actor="m")
    Rollback.objects.filter(pk=rollback.pk).update(
        started_at=timezone.now() - timedelta(minutes=1), report={"runs": 1}
    )
    assert watchdogs_tick()["resumed"] == [rollback.pk]
    assert watchdogs_tick()["resumed"] == []  # queued once per lease period
    assert queued == [rollback.pk, rollback.pk]
