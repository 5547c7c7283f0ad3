"""The issue's done-when: a replay of data/market/ETH_BTC-5m.csv through ingestion, the
signal engine and the paper exchange produces orders, fills, positions and equity
snapshots whose totals reconcile. Runs the real pipeline in-process: `replay_csv` ingests,
the trading Celery task runs eagerly on commit (the alert detectors are skipped here: they
have their own tests)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
from django.core.management import call_command
from django.db.models import Sum

from tests.trading.test_execution import (  # noqa: F401 - fixtures
    ETH,
    LTC,
    T0,
    TF_MS,
    _fresh_caches,
    candle_clock,
    make_candle,
    make_deployment,
    nolock,
    switch,
)
from trading import portfolio, reconcile, strategy
from trading.models import (
    Candle,
    Deployment,
    EquitySnapshot,
    Fill,
    KillSwitch,
    Order,
    OrderStatus,
    Position,
    Signal,
)
from trading.signals import SignalParams, compute_signals, load_csv

DATA = Path(__file__).resolve().parents[2] / "data" / "market"
ETH_CSV = DATA / "ETH_BTC-5m.csv"
TOL = 1e-9


@contextmanager
def _yes_lock(deployment_id: int):
    yield True


def _no_alert_processing():
    """The alert detectors skipped: nothing queued for them (patching the task's delay
    instead would leave the run's flag taken in Redis, holding off the next tests' runs
    until it expires)."""
    return mock.patch("alerts.services.candles_queue")


def replay(*files: Path, **options) -> None:
    with _no_alert_processing():
        call_command("replay_csv", *map(str, files), batch=1000, pace=0, **options)


def signed_fills(deployment: Deployment, symbol: str) -> float:
    fills = Fill.objects.filter(order__deployment=deployment, order__symbol=symbol)
    bought = fills.filter(order__side="buy").aggregate(q=Sum("qty"))["q"] or 0.0
    sold = fills.filter(order__side="sell").aggregate(q=Sum("qty"))["q"] or 0.0
    return bought - sold


def cash_from_fills(deployment: Deployment) -> float:
    cash = deployment.starting_cash
    for side, qty, price, fee in Fill.objects.filter(order__deployment=deployment).values_list(
        "order__side", "qty", "price", "fee"
    ):
        cash += (-qty if side == "buy" else qty) * price - fee
    return cash


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("switch", "nolock")
def test_replay_of_eth_btc_reconciles_orders_fills_positions_and_equity():
    dep = make_deployment(name="replay", symbols=[ETH], params={})
    replay(ETH_CSV)

    assert Candle.objects.filter(symbol=ETH).count() == 5760
    # Signals: the persisted rows are exactly the vectorised replay's (live/replay identity).
    expected = compute_signals(load_csv(ETH_CSV), SignalParams())
    stored = list(dep.signals.order_by("ts_ms").values_list("ts_ms", "side", "score"))
    assert stored == [(s.ts, s.side, s.score) for s in expected]

    orders = Order.objects.filter(deployment=dep)
    assert orders.filter(purpose="entry").count() > 10
    assert orders.filter(purpose="exit").count() > 10
    not_filled = list(
        orders.exclude(status=OrderStatus.FILLED).values_list("purpose", "status", "error")
    )
    assert not_filled == []
    for order in orders:
        fills = order.fills.aggregate(q=Sum("qty"))["q"]
        assert fills == pytest.approx(order.filled_qty, abs=TOL)
        assert order.signal_id is None or order.signal.side == order.side
        assert order.slippage_bps == pytest.approx(2.0)  # paper: 2 bps against us

    position = Position.objects.get(deployment=dep, symbol=ETH)
    assert signed_fills(dep, ETH) == pytest.approx(position.qty, abs=TOL)
    dep.refresh_from_db()
    assert dep.cash == pytest.approx(cash_from_fills(dep), abs=TOL)

    totals = portfolio.totals(dep.pk)
    last_close = Candle.objects.filter(symbol=ETH).latest("open_time_ms").close
    assert totals["equity"] == pytest.approx(dep.cash + position.qty * last_close, abs=TOL)
    assert totals["equity"] == pytest.approx(totals["starting_plus_pnl"], abs=TOL)

    snapshots = EquitySnapshot.objects.filter(deployment=dep).order_by("ts", "id")
    assert snapshots.count() >= 5760  # one per 5m candle while trading, plus one per fill
    for snap in snapshots.iterator():
        assert snap.equity == pytest.approx(snap.cash + snap.positions_value, abs=TOL)
        assert snap.drawdown_pct <= 0 and snap.peak >= snap.equity - TOL
    assert snapshots.last().equity == pytest.approx(totals["equity"], abs=TOL)

    assert reconcile.reconcile_deployment(deployment=dep).ok


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("nolock")
def test_replaying_again_adds_nothing_and_a_halt_stops_orders(request):
    states = request.getfixturevalue("switch")
    dep = make_deployment(name="again", symbols=[ETH])
    replay(ETH_CSV, limit=600)
    counts = (Signal.objects.count(), Order.objects.count(), Fill.objects.count())
    assert counts[1] > 0
    replay(ETH_CSV, limit=600)
    assert (Signal.objects.count(), Order.objects.count(), Fill.objects.count()) == counts

    states[dep.pk] = KillSwitch.HALTED
    halted_at = Order.objects.latest("created_at").created_at
    replay(ETH_CSV, limit=1200)
    assert Signal.objects.count() > counts[0]
    assert not Order.objects.filter(created_at__gt=halted_at).exists()


@pytest.mark.django_db(transaction=True)
def test_demo_replay_creates_the_demo_deployment_and_trades(monkeypatch):
    from canary import killswitch

    flags: dict[int, KillSwitch] = {}
    monkeypatch.setattr(killswitch, "write_redis", lambda pk, state: flags.__setitem__(pk, state))
    monkeypatch.setattr("trading.execution.read_killswitch", lambda pk: flags[pk])
    monkeypatch.setattr("trading.strategy.deployment_lock", _yes_lock)
    with _no_alert_processing():
        call_command("replay_csv", demo=True, pace=0, limit=400)
    demo = Deployment.objects.get()
    assert (demo.exchange, demo.allocation, demo.kill_switch) == ("paper", 0.10, "ACTIVE")
    assert flags == {demo.pk: KillSwitch.ACTIVE}
    assert Candle.objects.values("symbol").distinct().count() == 2
    assert demo.signals.exists() and demo.orders.exists() and demo.equity.exists()
    call_command("trading_demo_setup")
    assert Deployment.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.usefixtures("switch", "nolock")
def test_candles_without_an_order_decision_cost_no_query(django_assert_num_queries):
    """The strategy buffers a quiet candle's writes (equity mark, position mark) in memory;
    one flush writes them."""
    dep = make_deployment(name="quiet", symbols=[ETH, LTC])
    Position.objects.create(deployment=dep, symbol=LTC, qty=10.0, avg_entry=0.0015)
    account = strategy.Account(dep)
    account.reload()
    eth = [make_candle(ETH, T0 + i * TF_MS, close=0.05) for i in range(3)]
    ltc = make_candle(LTC, T0 + TF_MS, close=0.0016)
    runners = {c.symbol: strategy.StreamRunner.build(account, c) for c in (eth[0], ltc)}
    with django_assert_num_queries(0):
        for candle in (eth[0], ltc, eth[1], eth[2]):
            runners[candle.symbol].feed(candle, candle_clock(candle))
    snaps = account.snapshots  # one per minute: eth[1]'s candle time already has LTC's
    assert [s.ts for s in snaps] == [candle_clock(c) for c in (eth[0], ltc, eth[2])]
    assert snaps[0].positions_value == pytest.approx(10 * 0.0015)  # LTC at its entry
    assert snaps[2].positions_value == pytest.approx(10 * 0.0016)  # as its stream marked it
    account.flush()
    assert EquitySnapshot.objects.filter(deployment=dep).count() == 3
    assert Position.objects.get(deployment=dep, symbol=LTC).last_price == 0.0016
