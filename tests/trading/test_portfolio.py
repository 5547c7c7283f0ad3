"""Positions, cash, P&L and equity snapshots: the pure trade arithmetic, fills recorded
against the database, and the minute snapshots of the beat task."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from audit.models import AuditEvent
from audit.services import audit_verify
from tests.trading.test_execution import ETH, LTC, T0, TF_MS, make_candle, make_deployment
from trading import portfolio
from trading.models import Deployment, EquitySnapshot, Order, Position
from trading.portfolio import Book, apply_trade

NOW = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- pure


def test_buys_average_their_cost_including_fees():
    book = apply_trade(Book(0.0, 0.0, 0.0), 2.0, 10.0, 0.02)
    assert book == Book(2.0, pytest.approx(10.01), 0.0)
    book = apply_trade(book, 2.0, 12.0, 0.024)
    assert book.qty == 4.0
    assert book.avg_entry == pytest.approx((20.02 + 24.024) / 4)


def test_sells_realise_against_the_average_entry_net_of_the_fee():
    book = apply_trade(Book(4.0, 11.0, 0.0), -1.0, 13.0, 0.013)
    assert book == Book(3.0, 11.0, pytest.approx(2.0 - 0.013))
    book = apply_trade(book, -3.0, 10.0, 0.03)
    assert book == Book(0.0, 0.0, pytest.approx(1.987 - 3.0 - 0.03))


def test_an_oversold_position_flips_at_the_trade_price():
    book = apply_trade(Book(1.0, 10.0, 0.0), -1.5, 12.0, 0.0)
    assert book == Book(-0.5, 12.0, pytest.approx(2.0))


def test_equity_identity_holds_through_a_round_trip():
    """cash + qty * mark == starting cash + realised + unrealised, at every step."""
    cash, book = 1.0, Book(0.0, 0.0, 0.0)
    for signed, price, mark in [(0.3, 0.05, 0.051), (0.2, 0.052, 0.049), (-0.5, 0.055, 0.055)]:
        fee = abs(signed) * price * 0.001
        cash += -signed * price - fee
        book = apply_trade(book, signed, price, fee)
        unrealised = (mark - book.avg_entry) * book.qty
        assert cash + book.qty * mark == pytest.approx(1.0 + book.realised + unrealised)


# --------------------------------------------------------------------------- database


def filled_order(dep: Deployment, side: str, qty: float, symbol: str = ETH) -> Order:
    return Order.objects.create(
        deployment=dep,
        client_order_id=f"{side}-{qty}-{Order.objects.count()}",
        symbol=symbol,
        side=side,
        requested_qty=qty,
        created_at=NOW,
    )


@pytest.mark.django_db
def test_fills_move_position_and_cash_and_totals_reconcile():
    dep = make_deployment()
    portfolio.fill_record(
        order=filled_order(dep, "buy", 0.4),
        qty=0.4,
        price=0.05,
        fee_quote=0.00002,
        base_fee=0.0,
        ts=NOW,
    )
    portfolio.fill_record(
        order=filled_order(dep, "sell", 0.1),
        qty=0.1,
        price=0.06,
        fee_quote=0.000006,
        base_fee=0.0,
        ts=NOW,
    )
    position = Position.objects.get(deployment=dep, symbol=ETH)
    assert position.qty == pytest.approx(0.3)
    assert position.realised_pnl == pytest.approx((0.06 - 0.05005) * 0.1 - 0.000006)
    dep.refresh_from_db()
    assert dep.cash == pytest.approx(1.0 - 0.02002 + 0.006 - 0.000006)
    totals = portfolio.totals(dep.pk)
    assert totals["equity"] == pytest.approx(dep.cash + 0.3 * 0.06)
    assert totals["equity"] == pytest.approx(totals["starting_plus_pnl"])


@pytest.mark.django_db
def test_a_fee_paid_in_the_base_asset_reduces_the_holding_not_the_cash():
    dep = make_deployment()
    portfolio.fill_record(
        order=filled_order(dep, "buy", 1.0),
        qty=1.0,
        price=0.05,
        fee_quote=0.00005,
        base_fee=0.001,
        ts=NOW,
    )
    position = Position.objects.get(deployment=dep, symbol=ETH)
    assert position.qty == pytest.approx(0.999)
    assert position.avg_entry == pytest.approx(0.05 / 0.999)
    dep.refresh_from_db()
    assert dep.cash == pytest.approx(0.95)
    totals = portfolio.totals(dep.pk)
    assert totals["equity"] == pytest.approx(totals["starting_plus_pnl"])


@pytest.mark.django_db
def test_snapshot_tracks_peak_and_drawdown():
    dep = make_deployment()
    first = portfolio.equity_snapshot_write(deployment=dep, ts=NOW)
    assert (first.equity, first.peak, first.drawdown_pct) == (1.0, 1.0, 0.0)
    Deployment.objects.filter(pk=dep.pk).update(cash=1.2)
    high = portfolio.equity_snapshot_write(deployment=dep, ts=NOW + timedelta(minutes=1))
    assert (high.peak, high.drawdown_pct) == (1.2, 0.0)
    Deployment.objects.filter(pk=dep.pk).update(cash=1.14)
    low = portfolio.equity_snapshot_write(deployment=dep, ts=NOW + timedelta(minutes=2))
    assert low.peak == 1.2
    assert low.drawdown_pct == pytest.approx(-5.0)


@pytest.mark.django_db
def test_first_snapshot_after_a_loss_measures_from_the_starting_cash():
    dep = make_deployment(cash=0.97)
    snap = portfolio.equity_snapshot_write(deployment=dep, ts=NOW)
    assert snap.peak == 1.0 and snap.drawdown_pct == pytest.approx(-3.0)


@pytest.mark.django_db
def test_beat_snapshots_trading_deployments_each_minute_marked_at_the_latest_candle():
    trading = make_deployment(name="trading")
    idle = make_deployment(name="idle", allocation=0.0)
    Position.objects.create(deployment=trading, symbol=LTC, qty=10.0, avg_entry=0.0015)
    make_candle(LTC, T0, close=0.0015)
    make_candle(LTC, T0 + TF_MS, close=0.0016)
    assert portfolio.equity_snapshots_tick(now=NOW) == 1
    snap = EquitySnapshot.objects.get()
    assert snap.deployment_id == trading.pk
    assert snap.positions_value == pytest.approx(0.016)
    assert Position.objects.get(symbol=LTC).last_price == 0.0016
    assert portfolio.equity_snapshots_tick(now=NOW + timedelta(seconds=30)) == 0
    assert portfolio.equity_snapshots_tick(now=NOW + timedelta(seconds=60)) == 1
    assert not EquitySnapshot.objects.filter(deployment=idle).exists()


@pytest.mark.django_db
def test_a_flat_deployment_with_no_allocation_is_not_trading():
    dep = make_deployment(allocation=0.0)
    assert not portfolio.is_trading(dep)
    Position.objects.create(deployment=dep, symbol=ETH, qty=0.1, avg_entry=0.05)
    assert portfolio.is_trading(dep)


@pytest.mark.django_db
def test_a_known_position_is_written_by_one_conditional_update(django_assert_num_queries):
    dep = make_deployment()
    Position.objects.create(deployment=dep, symbol=ETH, qty=0.4, avg_entry=0.05)
    order = filled_order(dep, "sell", 0.1)
    with django_assert_num_queries(3):  # fill, position (compare-and-set), cash
        portfolio.fill_record(
            order=order, qty=0.1, price=0.06, fee_quote=0.0, base_fee=0.0, ts=NOW,
            known=Book(0.4, 0.05, 0.0),
        )  # fmt: skip
    position = Position.objects.get(deployment=dep, symbol=ETH)
    assert (position.qty, position.last_price) == (pytest.approx(0.3), 0.06)
    assert position.realised_pnl == pytest.approx(0.001)


@pytest.mark.django_db
def test_a_position_that_moved_since_it_was_read_is_read_again_under_lock():
    """Another process's fill landed after the caller read the position: nothing is lost."""
    dep = make_deployment()
    Position.objects.create(deployment=dep, symbol=ETH, qty=0.4, avg_entry=0.05)
    Position.objects.filter(deployment=dep, symbol=ETH).update(qty=0.5)
    portfolio.fill_record(
        order=filled_order(dep, "buy", 0.1), qty=0.1, price=0.05, fee_quote=0.0, base_fee=0.0,
        ts=NOW, known=Book(0.4, 0.05, 0.0),
    )  # fmt: skip
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == pytest.approx(0.6)


@pytest.mark.django_db
def test_snapshot_peak_follows_the_latest_snapshot_not_the_highest():
    dep = make_deployment()
    portfolio.equity_snapshot_write(deployment=dep, ts=NOW, peak=1.5)
    Deployment.objects.filter(pk=dep.pk).update(cash=0.9)
    later = portfolio.equity_snapshot_write(deployment=dep, ts=NOW + timedelta(minutes=1))
    assert later.peak == 1.5 and later.drawdown_pct == pytest.approx(-40.0)
    same_time = portfolio.equity_snapshot_write(deployment=dep, ts=NOW + timedelta(minutes=1))
    assert same_time.peak == 1.5


# --------------------------------------------------------------------------- one statement


def _claim(order: Order, known: Book, **kw):
    from trading.models import OrderStatus

    fields = {"qty": 0.1, "price": 0.06, "fee_quote": 0.00001, "base_fee": 0.0, "ts": NOW}
    fields.update(kw)
    from audit.services import audit_event

    return portfolio.fill_record_claimed(
        order=order,
        pending=OrderStatus.PENDING,
        recorded={"status": "FILLED", "submitted_at": NOW, "filled_qty": fields["qty"]},
        known=known,
        audit=audit_event(action="order.filled", actor="tester", target=order, payload={"q": 1}),
        **fields,
    )


def _world_after_fill(dep: Deployment) -> tuple:
    position = Position.objects.get(deployment=dep, symbol=ETH)
    snap = EquitySnapshot.objects.filter(deployment=dep).latest("id")
    return (
        round(position.qty, 12),
        round(position.avg_entry, 12),
        round(position.realised_pnl, 12),
        position.last_price,
        round(Deployment.objects.get(pk=dep.pk).cash, 12),
        round(snap.positions_value, 12),
        round(snap.equity, 12),
        round(snap.peak, 12),
        round(snap.drawdown_pct, 9),
    )


@pytest.mark.django_db
@pytest.mark.parametrize(("side", "qty"), [("buy", 0.2), ("sell", 0.1)])
def test_the_one_statement_fill_writes_what_the_general_path_writes(side, qty):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the one-statement fill record is PostgreSQL's")
    worlds = []
    for one_statement in (True, False):
        dep = make_deployment(name=f"one-statement-{one_statement}")
        Position.objects.create(deployment=dep, symbol=ETH, qty=0.4, avg_entry=0.05)
        Position.objects.create(
            deployment=dep, symbol=LTC, qty=2.0, avg_entry=0.003, last_price=0.0031
        )
        portfolio.equity_snapshot_write(deployment=dep, ts=NOW - timedelta(minutes=1), peak=1.2)
        order = filled_order(dep, side, qty)
        known = Book(0.4, 0.05, 0.0)
        if one_statement:
            claim = _claim(order, known, qty=qty)
            assert claim.written and claim.snapshot_id is not None
            stored_event = AuditEvent.objects.get(target_id=str(order.pk))
            assert (stored_event.pk, stored_event.hash) == (claim.audit.pk, claim.audit.hash)
            assert stored_event.action == "order.filled" and audit_verify() is None
            stored = Order.objects.get(pk=order.pk)
            assert (stored.status, stored.submitted_at, stored.filled_qty) == ("FILLED", NOW, qty)
            assert list(stored.fills.values_list("qty", "price", "fee", "ts")) == [
                (qty, 0.06, 0.00001, NOW)
            ]
        else:
            portfolio.fill_record(
                order=order, qty=qty, price=0.06, fee_quote=0.00001, base_fee=0.0, ts=NOW,
                known=known,
            )  # fmt: skip
            portfolio.equity_snapshot_write(deployment=dep, ts=NOW)
        worlds.append(_world_after_fill(dep))
    assert worlds[0] == worlds[1]


@pytest.mark.django_db
def test_the_one_statement_fill_writes_nothing_when_the_position_moved_or_the_order_was_recorded():
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the one-statement fill record is PostgreSQL's")
    dep = make_deployment()
    Position.objects.create(deployment=dep, symbol=ETH, qty=0.5, avg_entry=0.05)
    order = filled_order(dep, "buy", 0.1)

    moved = _claim(order, Book(0.4, 0.05, 0.0))
    assert (moved.order_free, moved.position_same, moved.written) == (True, False, False)

    Order.objects.filter(pk=order.pk).update(status="FILLED", submitted_at=NOW)
    recorded = _claim(order, Book(0.5, 0.05, 0.0))
    assert (recorded.order_free, recorded.position_same, recorded.written) == (False, True, False)

    assert not order.fills.exists()
    assert not AuditEvent.objects.filter(target_id=str(order.pk)).exists()
    assert not EquitySnapshot.objects.filter(deployment=dep).exists()
    assert Position.objects.get(deployment=dep, symbol=ETH).qty == 0.5
    assert Deployment.objects.get(pk=dep.pk).cash == 1.0
    assert Order.objects.get(pk=order.pk).filled_qty == 0.0


@pytest.mark.django_db(transaction=True)
def test_the_one_statement_equity_mark_is_one_view_when_another_fill_commits_meanwhile():
    """Another process's LTC fill holds the deployment row while this ETH fill's statement
    runs, and commits: the mark shows it entirely or not at all, never its cash without its
    position (a false drawdown that could trip the breaker)."""
    import threading
    import time

    import psycopg
    from django.db import connection, connections

    if connection.vendor != "postgresql":
        pytest.skip("the one-statement fill record is PostgreSQL's")
    from audit.models import AuditChainHead

    AuditChainHead.objects.get_or_create(id=1)  # a flushed database has none yet
    dep = make_deployment(name="one-view")
    Position.objects.create(deployment=dep, symbol=ETH, qty=0.4, avg_entry=0.05)
    Position.objects.create(deployment=dep, symbol=LTC, qty=2.0, avg_entry=0.003, last_price=0.003)
    order = filled_order(dep, "buy", 0.1)
    settings = connection.settings_dict
    other = psycopg.connect(
        dbname=settings["NAME"], user=settings["USER"], host=settings["HOST"],
        port=settings["PORT"] or 5432, password=settings["PASSWORD"] or None,
    )  # fmt: skip
    done: dict = {}

    def fill() -> None:
        try:
            done["claim"] = _claim(order, Book(0.4, 0.05, 0.0))
        except Exception as exc:  # reported by the assertions below
            done["error"] = exc
        finally:
            connections.close_all()

    try:
        other.execute(  # bought 10 LTC for 0.03: equity unchanged
            "UPDATE trading_position SET qty = qty + 10 WHERE deployment_id = %s AND symbol = %s",
            [dep.pk, LTC],
        )
        other.execute("UPDATE trading_deployment SET cash = cash - 0.03 WHERE id = %s", [dep.pk])
        worker = threading.Thread(target=fill)
        worker.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the fill's statement waits for the row
            other.execute("SELECT pg_stat_clear_snapshot()")  # a fresh view of the sessions
            waiting = other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                [other.info.backend_pid],
            ).fetchone()[0]
            if waiting:
                break
            time.sleep(0.02)
        assert waiting, f"the fill's statement never waited for the other fill: {done}"
        other.commit()
        worker.join(10)
    finally:
        other.close()
    assert done["claim"].written
    mark = EquitySnapshot.objects.get(pk=done["claim"].snapshot_id)
    now = portfolio.deployment_equity(dep.pk)
    assert mark.equity == pytest.approx(now.equity)  # 1.0 - 0.00601 + 0.5 * 0.06 + 0.006
    assert mark.equity == pytest.approx(1.02999)
