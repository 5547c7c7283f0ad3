"""The order router: sizing by canary allocation, the fail-closed gate, refusal of bad
input before the exchange, recording of fills, the UNKNOWN block, flatten, and the paper
adapter's state; against the paper exchange and, through CcxtExchange, the Binance stub."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from django.db import OperationalError
from django.db.models import F

from audit.models import AuditEvent
from canary.killswitch import KillSwitchUnreadable
from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub
from trading import execution, portfolio, strategy
from trading.exchange import client_order_id
from trading.exchange_ccxt import CcxtExchange
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

ETH, LTC = "ETH/BTC", "LTC/BTC"
TF_MS = 300_000
T0 = 1_515_560_100_000  # a 5m open time (2018-01-10)
ORDER = "/api/v3/order"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _fresh_caches():
    execution.reset_exchanges()
    strategy.reset_engines()
    yield
    execution.reset_exchanges()
    strategy.reset_engines()


@pytest.fixture
def switch(monkeypatch):
    """The kill switch, in memory: deployment id -> state (default ACTIVE); None makes it
    unreadable. The real Redis path is covered in test_killswitch_from_redis."""
    states: dict[int, KillSwitch | None] = {}

    def read(deployment_id: int) -> KillSwitch:
        state = states.get(deployment_id, KillSwitch.ACTIVE)
        if state is None:
            raise KillSwitchUnreadable("test: unreadable")
        return state

    monkeypatch.setattr(execution, "read_killswitch", read)
    return states


@pytest.fixture
def nolock(monkeypatch):
    """The strategy's per-deployment decision lock without Redis."""

    @contextmanager
    def lock(deployment_id: int):
        yield True

    monkeypatch.setattr(strategy, "deployment_lock", lock)


def make_deployment(**kw) -> Deployment:
    fields = {
        "name": "d1",
        "exchange": "paper",
        "symbols": [ETH, LTC],
        "timeframe": "5m",
        "full_order_notional": 0.1,
        "allocation": 0.10,
        "starting_cash": 1.0,
        "cash": 1.0,
        "quote_currency": "BTC",
    }
    fields.update(kw)
    return Deployment.objects.create(**fields)


def make_candle(
    symbol: str = ETH,
    open_ms: int = T0,
    close: float = 0.05,
    *,
    exchange: str = "paper",
    source: str = "replay",
    **kw,
) -> Candle:
    fields = {
        "exchange": exchange,
        "symbol": symbol,
        "timeframe": "5m",
        "open_time_ms": open_ms,
        "close_time_ms": open_ms + TF_MS - 1,
        "open": close,
        "high": close * 1.001,
        "low": close * 0.999,
        "close": close,
        "volume": 10.0,
        "source": source,
        "ingested_at": datetime.now(UTC),
    }
    fields.update(kw)
    return Candle.objects.create(**fields)


def candle_clock(candle: Candle) -> datetime:
    return datetime.fromtimestamp((candle.close_time_ms + 1) / 1000, tz=UTC)


def make_signal(deployment: Deployment, candle: Candle, side: str = "buy") -> Signal:
    return Signal.objects.create(
        deployment=deployment,
        candle=candle,
        symbol=candle.symbol,
        side=side,
        entry=candle.close,
        stop=candle.close * 0.98,
        target=candle.close * 1.04,
        reward_risk=2.0,
        score=3,
        factors={"trend": True, "momentum": True, "volume": True, "structure": False},
        ts_ms=candle.open_time_ms,
        created_at=candle_clock(candle),
    )


def paper_for(deployment: Deployment, *candles: Candle):
    adapter = execution.get_exchange(deployment)
    for candle in candles:
        execution.paper_feed(adapter, candle)
    return adapter


def buy(deployment: Deployment, candle: Candle, **kw) -> Order:
    paper_for(deployment, candle)
    signal = make_signal(deployment, candle)
    return execution.order_for_signal(signal=signal, now=candle_clock(candle), **kw)


# --------------------------------------------------------------------------- paper: entries


@pytest.mark.django_db
def test_signal_becomes_a_filled_order_with_its_records(switch):
    dep = make_deployment()
    candle = make_candle(close=0.05)
    order = buy(dep, candle)
    order.refresh_from_db()
    assert order.status == OrderStatus.FILLED
    assert (order.purpose, order.side, order.reduce_only) == ("entry", "buy", False)
    assert order.requested_qty == pytest.approx(0.2)  # 0.1 BTC x 10 % / 0.05
    assert order.filled_qty == pytest.approx(0.2)
    assert order.reference_price == 0.05
    assert order.avg_fill_price == pytest.approx(0.05 * 1.0002)  # paper slippage 2 bps
    assert order.slippage_bps == pytest.approx(2.0)
    assert order.fee == pytest.approx(0.2 * 0.05 * 1.0002 * 0.001)
    assert order.submitted_at == candle_clock(candle)
    assert order.latency_ms is not None and order.latency_ms >= 0
    assert order.acked_at == order.submitted_at + timedelta(milliseconds=order.latency_ms)
    assert order.allocation == 0.10 and order.error == "" and not order.critical
    fill = Fill.objects.get(order=order)
    assert (fill.qty, fill.price, fill.fee) == (
        pytest.approx(0.2),
        pytest.approx(order.avg_fill_price),
        pytest.approx(order.fee),
    )
    position = Position.objects.get(deployment=dep, symbol=ETH)
    assert position.qty == pytest.approx(0.2)
    dep.refresh_from_db()
    assert dep.cash == pytest.approx(1.0 - 0.2 * order.avg_fill_price - order.fee)
    snap = EquitySnapshot.objects.get(deployment=dep)
    assert snap.equity == pytest.approx(dep.cash + 0.2 * order.avg_fill_price)
    assert snap.peak == 1.0 and snap.drawdown_pct < 0
    events = list(
        AuditEvent.objects.filter(target_id=str(order.pk)).values_list("action", flat=True)
    )
    assert events == ["order.filled"]


@pytest.mark.django_db
@pytest.mark.parametrize("allocation", [0.10, 0.50, 1.00])
def test_size_is_full_size_times_the_canary_allocation(switch, allocation):
    dep = make_deployment(allocation=allocation, cash=10.0, starting_cash=10.0)
    order = buy(dep, make_candle(close=0.05))
    assert order.requested_qty == pytest.approx(0.1 * allocation / 0.05)
    assert order.allocation == allocation


@pytest.mark.django_db
def test_size_is_floored_to_the_lot_step(switch):
    dep = make_deployment(full_order_notional=0.123456)
    order = buy(dep, make_candle(close=0.07))
    assert order.requested_qty == pytest.approx(0.1763)  # 0.0123456 / 0.07 = 0.17636...


@pytest.mark.django_db
def test_same_signal_twice_places_one_order(switch):
    dep = make_deployment()
    candle = make_candle()
    paper = paper_for(dep, candle)
    signal = make_signal(dep, candle)
    first = execution.order_for_signal(signal=signal, now=candle_clock(candle))
    again = execution.order_for_signal(signal=signal, now=candle_clock(candle))
    assert first.pk == again.pk
    assert Order.objects.count() == 1 and len(paper.fills) == 1


@pytest.mark.django_db
def test_an_order_recorded_meanwhile_is_recorded_again_under_lock(switch, monkeypatch):
    """A reconciliation settles the PENDING order while it is at the exchange: the
    router's own outcome is then recorded through the locking path, over it."""
    dep = make_deployment()
    candle = make_candle()
    paper = paper_for(dep, candle)
    placed = paper.create_order

    def slow_create(request):
        pending = Order.objects.get(client_order_id=request.client_order_id)
        execution.order_record(
            order_id=pending.pk,
            outcome=execution.Outcome(status=OrderStatus.ERROR, error="reconciled meanwhile"),
            now=candle_clock(candle),
        )
        return placed(request)

    monkeypatch.setattr(paper, "create_order", slow_create)
    order = buy(dep, candle)
    order.refresh_from_db()
    assert order.status == OrderStatus.FILLED and order.error == ""
    assert Fill.objects.filter(order=order).count() == 1
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == pytest.approx(0.2)
    actions = AuditEvent.objects.filter(target_id=str(order.pk)).order_by("seq")
    assert list(actions.values_list("action", flat=True)) == ["order.error", "order.filled"]


@pytest.mark.django_db
def test_a_fill_recorded_by_another_process_meanwhile_is_not_lost(switch, monkeypatch):
    dep = make_deployment()
    candle = make_candle()
    buy(dep, candle)
    paper = execution.get_exchange(dep)
    placed = paper.create_order

    def with_a_concurrent_fill(request):
        Position.objects.filter(deployment=dep, symbol=ETH).update(qty=F("qty") + 1.0)
        return placed(request)

    monkeypatch.setattr(paper, "create_order", with_a_concurrent_fill)
    buy(dep, make_candle(open_ms=T0 + TF_MS))
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == pytest.approx(1.4)


@pytest.mark.django_db
def test_a_fee_in_the_base_asset_over_partial_fills_leaves_no_phantom_cash():
    """Binance charges a buy's fee in the base asset. Over two records at different
    prices, the position holds what was bought less the base fee, and the cash pays
    exactly the quote spent: the second fill's base fee is the order's new one less the
    first's, valued at its own price."""
    from trading.exchange import OrderResult

    dep = make_deployment()
    order = Order.objects.create(
        deployment=dep, client_order_id="entry-base-fee", symbol=ETH, side="buy",
        requested_qty=1.0, reference_price=0.05, created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )  # fmt: skip

    def record(filled: float, average: float, fee: float, status: str) -> None:
        result = OrderResult(
            "x1", order.client_order_id, ETH, "buy", "market", status, 1.0, filled, average,
            fee, "ETH", None,
        )  # fmt: skip
        execution.order_record(order_id=order.pk, outcome=execution.Outcome(result=result))

    record(0.5, 0.05, 0.0005, "open")
    record(1.0, 0.0503, 0.001, "closed")  # the second half at 0.0506
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == pytest.approx(0.999, abs=1e-12)
    dep.refresh_from_db()
    assert dep.cash == pytest.approx(1.0 - 0.0503, abs=1e-12)
    assert [f.price for f in Fill.objects.filter(order=order).order_by("id")] == pytest.approx(
        [0.05, 0.0506]
    )


class BuyEveryCandle:
    """A signal engine that signals a buy on every candle."""

    last_ts: int | None = None

    def update(self, candle):
        from trading.signals import Signal as EngineSignal

        self.last_ts = candle.open_time_ms
        return EngineSignal(
            side="buy", entry=candle.close, stop=candle.close * 0.97, target=candle.close * 1.06,
            reward_risk=2.0, score=3, factors={"structure": True}, index=99,
            ts=candle.open_time_ms,
        )  # fmt: skip


@pytest.mark.django_db
def test_a_candle_redelivered_after_its_exit_opens_no_new_long(switch, nolock, monkeypatch):
    """One decision per candle: a candle that swept below the stop (an exit) and closed
    back up with a buy signal, processed again (a redelivered task, a second worker), finds
    the position flat but must not open a long on it."""
    dep = make_deployment()
    assert buy(dep, make_candle(ETH, T0, close=0.05)).status == OrderStatus.FILLED  # stop 0.049
    sweep = make_candle(ETH, T0 + TF_MS, close=0.0505, low=0.0485, high=0.0506)
    monkeypatch.setattr(strategy, "engine_for", lambda d, p, f: BuyEveryCandle())
    strategy.stream_run(deployment=dep, candles=[sweep])
    first = list(Order.objects.filter(deployment=dep).values_list("purpose", "side", "status"))
    assert first[-1] == ("exit", "sell", OrderStatus.FILLED)
    strategy.reset_engines()
    strategy.stream_run(deployment=dep, candles=[sweep])
    assert (
        list(Order.objects.filter(deployment=dep).values_list("purpose", "side", "status")) == first
    )
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == 0


@pytest.mark.django_db
def test_a_retried_order_is_returned_even_once_the_gate_has_closed(switch):
    dep = make_deployment()
    candle = make_candle()
    signal = make_signal(dep, candle)
    paper_for(dep, candle)
    first = execution.order_for_signal(signal=signal, now=candle_clock(candle))
    switch[dep.pk] = KillSwitch.HALTED
    again = execution.order_for_signal(signal=signal, now=candle_clock(candle))
    assert again.pk == first.pk and again.status == OrderStatus.FILLED
    assert not AuditEvent.objects.filter(action="order.refused").exists()


@pytest.mark.django_db(transaction=True)  # the router's own transactions, not a test's
def test_order_path_queries(switch, django_assert_max_num_queries):
    """Signal to recorded fill on a paper deployment with a position: one read, the order
    committed, then one transaction for outcome, fill, position, cash, audit, equity."""
    dep = make_deployment()
    buy(dep, make_candle())
    candle = make_candle(open_ms=T0 + TF_MS)
    paper_for(dep, candle)
    signal = make_signal(dep, candle)
    from django.db import connection

    # PostgreSQL: the read, the PENDING order committed, then the outcome, fill, position,
    # cash, equity and audit record in one statement of its own.
    most = 3 if connection.vendor == "postgresql" else 15
    with django_assert_max_num_queries(most):
        order = execution.order_for_signal(signal=signal, now=candle_clock(candle))
    assert order.status == OrderStatus.FILLED
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == pytest.approx(0.4)


@pytest.mark.django_db(transaction=True)
def test_the_fill_statement_is_prepared_on_its_connection_after_a_few_orders(switch):
    """PostgreSQL plans the fill's statement once per connection, not for every order."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("prepared statements: PostgreSQL")

    def prepared() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
                ["%WITH chk AS%trading_equitysnapshot%"],
            )
            return cursor.fetchone()[0]

    dep = make_deployment()
    assert prepared() == 0
    for n in range(7):
        buy(dep, make_candle(open_ms=T0 + n * TF_MS))
    assert prepared() == 1
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == pytest.approx(1.4)


# --------------------------------------------------------------------------- gate


def refused(dep: Deployment, candle: Candle, *, reason: str) -> None:
    with pytest.raises(execution.OrderRefused) as err:
        buy(dep, candle)
    assert reason in err.value.reason
    assert not Order.objects.exists()
    event = AuditEvent.objects.filter(action="order.refused").latest("seq")
    assert reason in event.payload["reason"]


@pytest.mark.django_db
def test_halted_kill_switch_refuses(switch):
    dep = make_deployment()
    switch[dep.pk] = KillSwitch.HALTED
    refused(dep, make_candle(), reason="kill switch is HALTED")


@pytest.mark.django_db
def test_unreadable_kill_switch_fails_closed(switch):
    dep = make_deployment()
    switch[dep.pk] = None
    refused(dep, make_candle(), reason="kill switch unreadable")


@pytest.mark.django_db
def test_zero_allocation_refuses_entries(switch):
    dep = make_deployment(allocation=0.0)
    refused(dep, make_candle(), reason="allocation is 0")


@pytest.mark.django_db
def test_stale_signal_is_refused(switch):
    dep = make_deployment()
    candle = make_candle()
    paper_for(dep, candle)
    signal = make_signal(dep, candle)
    later = candle_clock(candle) + timedelta(minutes=10)
    with pytest.raises(execution.OrderRefused, match="stale signal"):
        execution.order_for_signal(signal=signal, now=later)
    assert not Order.objects.exists()


@pytest.mark.django_db
def test_sell_signal_opens_no_short(switch):
    dep = make_deployment()
    candle = make_candle()
    paper_for(dep, candle)
    with pytest.raises(execution.OrderRefused, match="no position"):
        execution.order_for_signal(
            signal=make_signal(dep, candle, "sell"), now=candle_clock(candle)
        )


@pytest.mark.django_db
def test_reducing_allows_closes_but_not_entries(switch):
    dep = make_deployment()
    candle = make_candle()
    buy(dep, candle)
    switch[dep.pk] = KillSwitch.REDUCING
    with pytest.raises(execution.OrderRefused, match="REDUCING"):
        buy(dep, make_candle(open_ms=T0 + TF_MS))
    close = execution.order_close(
        deployment=dep, symbol=ETH, key="test", reference_price=0.05, now=candle_clock(candle)
    )
    assert close.status == OrderStatus.FILLED and close.reduce_only
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == 0


@pytest.mark.django_db
def test_a_pending_entry_blocks_entries_on_its_symbol_only(switch):
    dep = make_deployment()
    first = make_candle(ETH)
    paper_for(dep, first)
    Order.objects.create(
        deployment=dep,
        client_order_id=execution.entry_client_id(make_signal(dep, first)),
        symbol=ETH,
        side="buy",
        requested_qty=1.0,
        reference_price=first.close,
        created_at=candle_clock(first),
    )  # sent by a worker that died before it recorded the outcome
    later = make_candle(ETH, open_ms=T0 + TF_MS)
    with pytest.raises(execution.OrderRefused, match="still PENDING: reconcile first"):
        buy(dep, later)
    assert Order.objects.filter(symbol=ETH).count() == 1
    other = buy(dep, make_candle(LTC, open_ms=T0 + TF_MS))
    assert other.status == OrderStatus.FILLED


@pytest.mark.django_db
def test_killswitch_from_redis(redis_url):
    """The real kill switch in Redis: a deployment with an unused id, key removed after."""
    from canary import killswitch
    from canary.heartbeat import redis_client

    dep = make_deployment(pk=2_000_000_000 + datetime.now().microsecond)
    try:
        with pytest.raises(execution.OrderRefused, match="unreadable"):
            buy(dep, make_candle())
        killswitch.write_redis(dep.pk, KillSwitch.HALTED)
        with pytest.raises(execution.OrderRefused, match="HALTED"):
            buy(dep, make_candle(open_ms=T0 + TF_MS))
        killswitch.write_redis(dep.pk, KillSwitch.ACTIVE)
        assert buy(dep, make_candle(open_ms=T0 + 2 * TF_MS)).status == OrderStatus.FILLED
    finally:
        redis_client().delete(killswitch.key(dep.pk))


# --------------------------------------------------------------------------- bad input


def rejected_before_exchange(order: Order, reason: str, paper) -> None:
    assert order.status == OrderStatus.REJECTED
    assert reason in order.error
    assert order.submitted_at is None and order.filled_qty == 0
    assert paper.fetch_order_by_client_id(order.symbol, order.client_order_id) is None
    assert AuditEvent.objects.filter(action="order.rejected", target_id=str(order.pk)).exists()


@pytest.mark.django_db
def test_non_positive_size_is_refused_before_the_exchange(switch):
    dep = make_deployment(full_order_notional=0.0)
    candle = make_candle()
    paper = paper_for(dep, candle)
    order = buy(dep, candle)
    rejected_before_exchange(order, "amount must be positive", paper)


@pytest.mark.django_db
def test_size_below_the_minimum_is_refused_before_the_exchange(switch):
    dep = make_deployment(full_order_notional=0.00004)  # 10 %: 0.000004 BTC -> 0.00008 ETH
    candle = make_candle()
    paper = paper_for(dep, candle)
    order = buy(dep, candle)
    rejected_before_exchange(order, "below the minimum quantity", paper)


@pytest.mark.django_db
def test_off_step_size_and_unknown_symbol_are_refused_before_the_exchange(switch):
    dep = make_deployment()
    candle = make_candle()
    paper = paper_for(dep, candle)
    common = {
        "deployment": dep,
        "side": "buy",
        "reference_price": 0.05,
        "now": candle_clock(candle),
    }
    off_step = execution.order_place(symbol=ETH, qty=0.12345, client_order_id="off-step", **common)
    rejected_before_exchange(off_step, "not a multiple of the step size", paper)
    unknown = execution.order_place(symbol="DOGE/BTC", qty=1.0, client_order_id="doge", **common)
    rejected_before_exchange(unknown, "unknown symbol", paper)
    assert paper.fills == []


# --------------------------------------------------------------------------- paper state


@pytest.mark.django_db
def test_paper_state_is_rebuilt_from_the_database_after_a_restart(switch):
    dep = make_deployment()
    candle = make_candle()
    entry = buy(dep, candle)
    execution.reset_exchanges()  # a new worker process
    rebuilt = execution.get_exchange(dep)
    dep.refresh_from_db()
    assert rebuilt.fetch_balance()["BTC"].total == pytest.approx(dep.cash)
    assert rebuilt.positions() == {ETH: pytest.approx(entry.filled_qty)}
    close = execution.order_close(
        deployment=dep, symbol=ETH, key="after-restart", now=candle_clock(candle)
    )
    assert close.status == OrderStatus.FILLED
    assert close.reference_price == candle.close  # the latest stored candle
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == 0


@pytest.mark.django_db
def test_paper_follows_trades_made_by_another_process(switch):
    dep = make_deployment()
    candle = make_candle()
    mine = paper_for(dep, candle)
    Position.objects.create(deployment=dep, symbol=LTC, qty=2.0, avg_entry=0.0015)
    Deployment.objects.filter(pk=dep.pk).update(cash=0.997)
    again = execution.get_exchange(dep)
    assert again is not mine
    assert again.positions() == {LTC: 2.0}
    assert again.fetch_balance()["BTC"].total == pytest.approx(0.997)
    assert execution.get_exchange(dep) is again


@pytest.mark.django_db
def test_paper_state_is_used_as_last_known_while_the_database_is_down(switch, monkeypatch):
    dep = make_deployment()
    known = paper_for(dep, make_candle())

    def down(*args, **kwargs):
        raise OperationalError("database is down")

    monkeypatch.setattr(execution, "_db_state", down)
    unsaved = Deployment(pk=dep.pk, exchange="paper", symbols=dep.symbols)  # from a snapshot
    assert execution.get_exchange(unsaved) is known
    execution.reset_exchanges()
    with pytest.raises(OperationalError):
        execution.get_exchange(unsaved)


# --------------------------------------------------------------------------- flatten


@pytest.mark.django_db
def test_flatten_closes_every_position_once(switch):
    dep = make_deployment()
    eth, ltc = make_candle(ETH, close=0.05), make_candle(LTC, close=0.0015)
    buy(dep, eth)
    buy(dep, ltc)
    switch[dep.pk] = KillSwitch.HALTED  # flatten does not need the gate
    closes = execution.flatten(dep, reason="drawdown", key="rollback-1-stage1")
    assert sorted(o.symbol for o in closes) == [ETH, LTC]
    assert all(o.purpose == "flatten" and o.reduce_only for o in closes)
    assert all(o.status == OrderStatus.FILLED for o in closes)
    assert not Position.objects.filter(deployment=dep).exclude(qty=0).exists()
    again = execution.flatten(dep, reason="drawdown", key="rollback-1-stage1")
    assert {o.pk for o in again} == {o.pk for o in closes}
    assert Order.objects.filter(purpose="flatten").count() == 2
    assert AuditEvent.objects.filter(action="trading.flatten").count() == 2


@pytest.mark.django_db
def test_flatten_retries_a_close_that_was_never_placed(switch):
    dep = make_deployment()
    candle = make_candle()
    buy(dep, candle)
    Order.objects.create(
        deployment=dep,
        client_order_id=execution.flatten_client_id(dep, "rb-2", ETH, 0),
        purpose="flatten",
        symbol=ETH,
        side="sell",
        reduce_only=True,
        requested_qty=0.2,
        status=OrderStatus.ERROR,
        error="not placed: exchange down",
        created_at=candle_clock(candle),
    )
    (close,) = execution.flatten(dep, reason="retry", key="rb-2")
    assert close.client_order_id == execution.flatten_client_id(dep, "rb-2", ETH, 1)
    assert close.status == OrderStatus.FILLED


@pytest.mark.django_db
def test_flatten_never_doubles_a_close_whose_outcome_is_unknown(switch):
    dep = make_deployment()
    candle = make_candle()
    buy(dep, candle)
    pending = Order.objects.create(
        deployment=dep,
        client_order_id=execution.flatten_client_id(dep, "rb-3", ETH, 0),
        purpose="flatten",
        symbol=ETH,
        side="sell",
        reduce_only=True,
        requested_qty=0.2,
        status=OrderStatus.UNKNOWN,
        created_at=datetime.now(UTC),
    )
    (close,) = execution.flatten(dep, reason="retry", key="rb-3")
    assert close.pk == pending.pk
    assert Order.objects.filter(purpose="flatten").count() == 1


# --------------------------------------------------------------------------- Binance stub


@pytest.fixture
def stub():
    with BinanceStub(timeout_sleep_s=1.0) as server:
        yield server


@pytest.fixture
def binance(stub):
    exchange = CcxtExchange(
        "binance",
        api_key=API_KEY,
        secret=API_SECRET,
        base_url=stub.base_url,
        timeout_ms=400,
        symbols=[ETH, LTC],
        sleep=lambda s: None,
        not_found_grace_s=0.0,
        lookup_attempts=2,
    )
    exchange.load_markets()
    return exchange


def stub_buy(dep: Deployment, binance, cid: str, qty: float = 1.0) -> Order:
    return execution.order_place(
        deployment=dep,
        symbol=ETH,
        side="buy",
        qty=qty,
        client_order_id=cid,
        reference_price=0.05,
        now=datetime.now(UTC),
        exchange=binance,
    )


@pytest.mark.django_db
def test_stub_market_order_is_recorded_with_its_fill(switch, stub, binance):
    dep = make_deployment(exchange="binance")
    order = stub_buy(dep, binance, "ok-1")
    assert order.status == OrderStatus.FILLED
    assert order.filled_qty == 1.0 and order.avg_fill_price == 0.05
    assert order.exchange_order_id and order.slippage_bps == 0.0
    assert order.fee == pytest.approx(0.05 * 0.001)
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == 1.0
    assert stub.count("POST", ORDER) == 1


@pytest.mark.django_db
def test_stub_lost_reply_is_found_by_client_id_not_duplicated(switch, stub, binance):
    dep = make_deployment(exchange="binance")
    stub.accept_then_timeout()
    order = stub_buy(dep, binance, "lost-reply")
    assert order.status == OrderStatus.FILLED and order.filled_qty == 1.0
    assert stub.count("POST", ORDER) == 1 and len(stub.orders) == 1
    assert Fill.objects.filter(order=order).count() == 1
    # the fee, which the order query does not carry, read from the order's trades
    [placed] = stub.orders.values()
    charged = float(placed.fills[0]["commission"])
    assert charged > 0 and order.fee == pytest.approx(charged)


@pytest.mark.django_db
@pytest.mark.parametrize("status", [500, 502, 429])
def test_stub_down_or_rate_limiting_records_an_unplaced_order(switch, stub, binance, status):
    dep = make_deployment(exchange="binance")
    stub.fail("POST", ORDER, status=status, retry_after=1 if status == 429 else None)
    order = stub_buy(dep, binance, f"bounced-{status}")
    assert order.status == OrderStatus.ERROR and "not placed" in order.error
    assert order.submitted_at is not None and not order.critical
    assert stub.orders == {} and stub.count("POST", ORDER) == 1
    assert not Fill.objects.exists()


@pytest.mark.django_db
def test_stub_refusal_is_rejected_once(switch, stub, binance):
    dep = make_deployment(exchange="binance")
    stub.fail("POST", ORDER, status=400, code=-2010, msg="Account has insufficient balance.")
    order = stub_buy(dep, binance, "poor")
    assert order.status == OrderStatus.REJECTED and "insufficient" in order.error
    assert order.submitted_at is not None
    assert stub.count("POST", ORDER) == 1


@pytest.mark.django_db
def test_stub_bad_input_never_reaches_the_exchange(switch, stub, binance):
    dep = make_deployment(exchange="binance")
    for cid, qty, reason in [
        ("zero", 0.0, "must be positive"),
        ("tiny", 0.00005, "below the minimum quantity"),
        ("off-step", 1.00005, "not a multiple of the step size"),
    ]:
        order = stub_buy(dep, binance, cid, qty)
        assert order.status == OrderStatus.REJECTED and reason in order.error
        assert order.submitted_at is None
    assert stub.count("POST", ORDER) == 0


@pytest.mark.django_db
def test_unknown_outcome_blocks_the_deployment_until_resolved(switch, stub, binance, settings):
    settings.TRADING_UNKNOWN_GRACE_S = 0.0
    dep = make_deployment(exchange="binance")
    stub.accept_then_timeout()
    stub.fail("GET", ORDER, status=503, times=2)  # both lookups fail
    dark = stub_buy(dep, binance, "dark")
    assert dark.status == OrderStatus.UNKNOWN and dark.critical
    assert AuditEvent.objects.filter(action="order.unknown").exists()
    with pytest.raises(execution.OrderRefused, match="UNKNOWN: reconcile first"):
        stub_buy(dep, binance, "next")
    resolved = execution.order_resolve(order=dark, exchange=binance)
    assert resolved.status == OrderStatus.FILLED and resolved.critical
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == 1.0
    assert stub_buy(dep, binance, "next").status == OrderStatus.FILLED
    assert stub.count("POST", ORDER) == 2


@pytest.mark.django_db
def test_pending_order_that_never_reached_the_exchange_resolves_to_error(
    switch, stub, binance, settings
):
    settings.TRADING_UNKNOWN_GRACE_S = 5.0
    dep = make_deployment(exchange="binance")
    crashed = Order.objects.create(
        deployment=dep,
        client_order_id=client_order_id("entry", dep.pk, "crash"),
        symbol=ETH,
        side="buy",
        requested_qty=1.0,
        created_at=datetime.now(UTC) - timedelta(seconds=60),
    )
    young = Order.objects.create(
        deployment=dep,
        client_order_id="young",
        symbol=ETH,
        side="buy",
        requested_qty=1.0,
        created_at=datetime.now(UTC),
    )
    assert execution.order_resolve(order=crashed, exchange=binance).status == OrderStatus.ERROR
    assert execution.order_resolve(order=young, exchange=binance).status == OrderStatus.PENDING


@pytest.mark.django_db
def test_get_exchange_builds_ccxt_from_settings(switch, stub, settings):
    settings.TRADING_EXCHANGE_BASE_URL = stub.base_url
    settings.TRADING_EXCHANGE_API_KEY = API_KEY
    settings.TRADING_EXCHANGE_API_SECRET = API_SECRET
    dep = make_deployment(exchange="binance", symbols=[ETH])
    adapter = execution.get_exchange(dep)
    assert adapter.name == "ccxt:binance" and execution.get_exchange(dep) is adapter
    order = execution.order_place(
        deployment=dep, symbol=ETH, side="buy", qty=0.5, client_order_id="via-settings",
        reference_price=0.05,
    )  # fmt: skip
    assert order.status == OrderStatus.FILLED
    assert portfolio.deployment_equity(dep.pk).positions_value == pytest.approx(0.025)
