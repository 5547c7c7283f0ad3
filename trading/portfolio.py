"""Positions, cash, P&L and equity snapshots of a deployment.

Accounting (spot, quote currency):

- a buy of q at p with fee f: cash -= q*p + f; the position's ``avg_entry`` includes the
  fee, so ``unrealised = (last - avg_entry) * qty`` is net of the entry fee;
- a sell of q at p with fee f: cash += q*p - f; ``realised += (p - avg_entry) * q - f``.

Hence, at every moment: ``equity = cash + sum(qty * last_price)
= starting_cash + realised + unrealised`` (the totals the replay test checks).

The writes here join the caller's transaction (the order router records a fill, its
position, the cash and the equity snapshot atomically). Snapshots are bookkeeping and are
not audited: the fills that move them are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Max
from django.utils import timezone

from .models import Candle, Deployment, EquitySnapshot, Fill, Order, Position
from .rows import fetchall_prepared, insert_row, update_rows

QTY_DECIMALS = 12


def clean_qty(qty: float) -> float:
    """Drop float noise from base quantities (exchange steps are far coarser)."""
    return round(qty, QTY_DECIMALS) + 0.0


@dataclass(frozen=True)
class Book:
    """A position's numbers before or after a trade."""

    qty: float
    avg_entry: float
    realised: float


def apply_trade(book: Book, signed_qty: float, price: float, fee: float) -> Book:
    """The position after trading ``signed_qty`` (+ buy, - sell) at ``price`` with ``fee``
    (quote currency). Pure. Spot: a sell larger than the holding closes it and the rest is
    treated as a new short at ``price`` (never expected; reconciliation would flag it)."""
    qty, avg = book.qty, book.avg_entry
    if signed_qty == 0:
        return book
    same_way = qty == 0 or (qty > 0) == (signed_qty > 0)
    if same_way:
        new_qty = qty + signed_qty
        cost = abs(qty) * avg + abs(signed_qty) * price + fee * (1 if signed_qty > 0 else -1)
        return Book(clean_qty(new_qty), cost / abs(new_qty), book.realised)
    closed = min(abs(signed_qty), abs(qty))
    direction = 1 if qty > 0 else -1
    realised = book.realised + (price - avg) * closed * direction - fee
    new_qty = clean_qty(qty + signed_qty)
    if new_qty == 0:
        return Book(0.0, 0.0, realised)
    if (new_qty > 0) == (qty > 0):
        return Book(new_qty, avg, realised)
    return Book(new_qty, price, realised)


def _effective_trade(
    side: str, qty: float, price: float, fee_quote: float, base_fee: float
) -> tuple[float, float, float]:
    """(signed base qty, price, quote fee) as the position sees the trade. A fee paid in the
    base asset on a buy means fewer units received for the same quote spent."""
    if side == "buy" and base_fee > 0:
        received = qty - base_fee
        return received, qty * price / received, fee_quote - base_fee * price
    return (qty if side == "buy" else -qty), price, fee_quote


def fill_record(
    *,
    order: Order,
    qty: float,
    price: float,
    fee_quote: float,
    base_fee: float,
    ts: datetime,
    known: Book | None = None,
) -> Fill:
    """Record one fill of ``order``: the Fill row, the position and the cash.

    ``qty`` is the traded base quantity (> 0), ``fee_quote`` the fee valued in the quote
    currency, ``base_fee`` the part of it charged in the base asset (Binance's default on
    buys), which reduces the base received. ``known``: the position as the caller read it
    before its transaction; while the row still holds exactly that, the new numbers are
    written by one conditional update instead of a locking read and a write. Call inside
    the caller's transaction.
    """
    fill = insert_row(Fill(order=order, qty=qty, price=price, fee=fee_quote, ts=ts))
    signed, trade_price, trade_fee = _effective_trade(order.side, qty, price, fee_quote, base_fee)
    if known is None or not _position_swap(order, known, signed, trade_price, trade_fee, price):
        position, _ = Position.objects.select_for_update().get_or_create(
            deployment_id=order.deployment_id, symbol=order.symbol
        )
        book = apply_trade(
            Book(position.qty, position.avg_entry, position.realised_pnl),
            signed,
            trade_price,
            trade_fee,
        )
        position.qty = book.qty
        position.avg_entry = book.avg_entry
        position.realised_pnl = book.realised
        position.last_price = price
        position.save(
            update_fields=["qty", "avg_entry", "realised_pnl", "last_price", "updated_at"]
        )
    quote_fee = fee_quote - base_fee * price
    cash_delta = (-qty if order.side == "buy" else qty) * price - quote_fee
    _add_cash(order.deployment_id, cash_delta)
    return fill


def _add_cash(deployment_id: int, delta: float) -> None:
    table = connection.ops.quote_name(Deployment._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET cash = cash + %s WHERE id = %s", [delta, deployment_id])


def _position_swap(
    order: Order, known: Book, signed: float, trade_price: float, trade_fee: float, last: float
) -> bool:
    """Compare-and-set: the position after the trade, if its row still holds ``known``."""
    book = apply_trade(known, signed, trade_price, trade_fee)
    where = {"deployment": order.deployment_id, "symbol": order.symbol, "qty": known.qty,
             "avg_entry": known.avg_entry, "realised_pnl": known.realised}  # fmt: skip
    values = {"qty": book.qty, "avg_entry": book.avg_entry, "realised_pnl": book.realised,
              "last_price": last, "updated_at": timezone.now()}  # fmt: skip
    return bool(update_rows(Position, where, values))


# PostgreSQL, the order router's common case (a fill of an order it persisted PENDING just
# before sending, on a symbol whose position row it read before): in one statement, claim
# the order (still PENDING, never recorded) and the position (still holding what was
# read), both locked; only when both hold (and the audit chain has its head row), record
# the order's outcome, the Fill, the position, the cash, the equity snapshot (cash and
# the other positions as the statement's snapshot shows them, with this trade applied;
# the peak from the last snapshot, else the starting cash) and the audit record (``audit.services.audit_append_ctes``). Nothing is
# written when a claim fails: the caller then takes the general path. Run outside a
# transaction, the statement is its own: one round trip, the audit head locked only
# while it runs.
_FILL_RECORD_PG_SQL = """
WITH chk AS (
    SELECT (SELECT id FROM {order} WHERE id = %s AND status = %s AND submitted_at IS NULL
            FOR UPDATE) AS oid,
           (SELECT id FROM {position} WHERE deployment_id = %s AND symbol = %s AND qty = %s
            AND avg_entry = %s AND realised_pnl = %s FOR UPDATE) AS pid
), ok AS (
    SELECT oid, pid FROM chk WHERE oid IS NOT NULL AND pid IS NOT NULL AND {head_exists}
), o AS (
    UPDATE {order} SET {order_set} WHERE id = (SELECT oid FROM ok) RETURNING id
), f AS (
    INSERT INTO {fill} (order_id, qty, price, fee, ts) SELECT id, %s, %s, %s, %s FROM o
    RETURNING id
), p AS (
    UPDATE {position} SET qty = %s, avg_entry = %s, realised_pnl = %s, last_price = %s,
        updated_at = %s
    WHERE id = (SELECT pid FROM ok)
    RETURNING id, qty * COALESCE(last_price, avg_entry) AS value
), d AS (
    UPDATE {deployment} SET cash = cash + %s WHERE id = %s AND EXISTS (SELECT 1 FROM ok)
    RETURNING id, cash, starting_cash
), x AS (
    -- One view for the mark: the statement snapshot plus this trade. (The cash that d
    -- returns is the latest, which may include a fill committed since the snapshot was
    -- taken whose position the snapshot does not show: a false drawdown.)
    SELECT d.id, (SELECT c.cash FROM {deployment} c WHERE c.id = d.id) + %s AS cash,
           (SELECT value FROM p) + COALESCE((SELECT SUM(q.qty * COALESCE(q.last_price, q.avg_entry))
               FROM {position} q WHERE q.deployment_id = d.id AND q.id <> (SELECT pid FROM ok)), 0.0)
               AS value,
           COALESCE((SELECT s.peak FROM {snapshot} s WHERE s.deployment_id = d.id
                     ORDER BY s.ts DESC, s.id DESC LIMIT 1), d.starting_cash) AS last_peak
    FROM d
), y AS (
    SELECT id, cash, value, cash + value AS equity, GREATEST(last_peak, cash + value) AS top
    FROM x
), s AS (
    INSERT INTO {snapshot} (deployment_id, ts, cash, positions_value, equity, peak, drawdown_pct)
    SELECT id, %s, cash, value, equity, top,
           CASE WHEN top > 0 THEN LEAST(0.0, (equity / top - 1.0) * 100.0) ELSE 0.0 END
    FROM y
    RETURNING id
), {audit}
SELECT (SELECT oid FROM chk), (SELECT pid FROM chk), (SELECT id FROM f), (SELECT id FROM s),
       e.id, e.seq, e.prev_hash, e.hash
FROM (SELECT 1) one LEFT JOIN audit_event e ON TRUE
"""


@dataclass(frozen=True)
class FillClaim:
    """What ``fill_record_claimed`` found: the order and the position still as read
    (``order_free``, ``position_same``), and the rows written when both held."""

    order_free: bool
    position_same: bool
    fill_id: int | None
    snapshot_id: int | None
    audit: Any = None  # the AuditEvent appended

    @property
    def written(self) -> bool:
        return self.fill_id is not None


def fill_record_claimed(
    *,
    order: Order,
    pending: str,
    recorded: dict[str, Any],
    qty: float,
    price: float,
    fee_quote: float,
    base_fee: float,
    ts: datetime,
    known: Book,
    audit: Any,
) -> FillClaim:
    """PostgreSQL only (``_FILL_RECORD_PG_SQL``): the order's ``recorded`` fields (column ->
    value), its fill, position, cash, an equity snapshot and the ``audit`` event (from
    ``audit.services.audit_event``) in one statement, if the order is still ``pending``
    and never submitted and its position row still holds ``known``."""
    from audit.services import AUDIT_HEAD_EXISTS, audit_append_ctes, audit_appended

    signed, trade_price, trade_fee = _effective_trade(order.side, qty, price, fee_quote, base_fee)
    book = apply_trade(known, signed, trade_price, trade_fee)
    quote_fee = fee_quote - base_fee * price
    cash_delta = (-qty if order.side == "buy" else qty) * price - quote_fee
    columns = list(recorded)
    audit_sql, audit_params = audit_append_ctes(audit, when="EXISTS (SELECT 1 FROM f)")
    sql = _FILL_RECORD_PG_SQL.format(
        order=Order._meta.db_table,
        position=Position._meta.db_table,
        fill=Fill._meta.db_table,
        deployment=Deployment._meta.db_table,
        snapshot=EquitySnapshot._meta.db_table,
        order_set=", ".join(f"{connection.ops.quote_name(c)} = %s" for c in columns),
        head_exists=AUDIT_HEAD_EXISTS,
        audit=audit_sql,
    )
    params = [
        order.pk, pending,
        order.deployment_id, order.symbol, known.qty, known.avg_entry, known.realised,
        *(recorded[c] for c in columns),
        qty, price, fee_quote, ts,
        book.qty, book.avg_entry, book.realised, price, timezone.now(),
        cash_delta, order.deployment_id,
        cash_delta,
        ts,
        *audit_params,
    ]  # fmt: skip
    oid, pid, fill_id, snapshot_id, *event = fetchall_prepared(sql, params)[0]
    if fill_id is None:
        return FillClaim(oid is not None, pid is not None, None, None)
    appended = audit_appended(audit, event, connection.alias)
    return FillClaim(True, True, fill_id, snapshot_id, appended)


def positions_mark(*, deployment_id: int, symbol: str, price: float) -> int:
    """Mark the deployment's position in ``symbol`` at ``price`` (no-op when flat)."""
    table = connection.ops.quote_name(Position._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET last_price = %s"
            " WHERE deployment_id = %s AND symbol = %s AND NOT (qty = 0)",
            [price, deployment_id, symbol],
        )
        return cursor.rowcount


@dataclass(frozen=True)
class Equity:
    cash: float
    positions_value: float
    realised: float
    unrealised: float

    @property
    def equity(self) -> float:
        return self.cash + self.positions_value


def deployment_equity(deployment_id: int) -> Equity:
    """Cash plus positions marked at their last price (entry price when never marked)."""
    cash = Deployment.objects.filter(pk=deployment_id).values_list("cash", flat=True).get()
    value = realised = unrealised = 0.0
    rows = Position.objects.filter(deployment_id=deployment_id).values_list(
        "qty", "avg_entry", "last_price", "realised_pnl"
    )
    for qty, avg_entry, last_price, realised_pnl in rows:
        mark = last_price if last_price is not None else avg_entry
        value += qty * mark
        realised += realised_pnl
        unrealised += (mark - avg_entry) * qty
    return Equity(cash, value, realised, unrealised)


# What a snapshot needs, computed and inserted by the database in one fixed statement:
# one round trip per fill on the order path, no ORM compilation.
_SNAPSHOT_INSERT_SQL = """
INSERT INTO {snapshot} (deployment_id, ts, cash, positions_value, equity, peak, drawdown_pct)
SELECT y.id, %s, y.cash, y.value, y.equity, y.top,
       CASE WHEN y.top > 0 THEN {least}(0.0, (y.equity / y.top - 1.0) * 100.0) ELSE 0.0 END
FROM (
    SELECT x.id, x.cash, x.value, x.cash + x.value AS equity,
           {greatest}(COALESCE(%s, x.last_peak, x.starting_cash), x.cash + x.value) AS top
    FROM (
        SELECT d.id, d.cash, d.starting_cash,
               COALESCE((SELECT SUM(p.qty * COALESCE(p.last_price, p.avg_entry))
                         FROM {position} p WHERE p.deployment_id = d.id), 0.0) AS value,
               (SELECT s.peak FROM {snapshot} s WHERE s.deployment_id = d.id
                ORDER BY s.ts DESC, s.id DESC LIMIT 1) AS last_peak
        FROM {deployment} d WHERE d.id = %s
    ) x
) y
RETURNING id, cash, positions_value, equity, peak, drawdown_pct
"""


def equity_snapshot_write(
    *, deployment: Deployment, ts: datetime, peak: float | None = None
) -> EquitySnapshot:
    """Append a snapshot: equity (cash + positions marked at their last price, entry price
    when never marked), running peak (``peak`` when the caller tracks it, else the previous
    snapshot's, else the starting cash) and drawdown from it in % (<= 0)."""
    postgres = connection.vendor == "postgresql"
    sql = _SNAPSHOT_INSERT_SQL.format(
        position=Position._meta.db_table,
        snapshot=EquitySnapshot._meta.db_table,
        deployment=Deployment._meta.db_table,
        greatest="GREATEST" if postgres else "MAX",
        least="LEAST" if postgres else "MIN",
    )
    ts_param = ts if postgres else connection.ops.adapt_datetimefield_value(ts)
    with connection.cursor() as cursor:
        cursor.execute(sql, [ts_param, peak, deployment.pk])
        row = cursor.fetchone()
    if row is None:
        raise Deployment.DoesNotExist(f"deployment {deployment.pk} does not exist")
    snapshot_id, cash, value, equity, top, drawdown = row
    snapshot = EquitySnapshot(
        id=snapshot_id,
        deployment_id=deployment.pk,
        ts=ts,
        cash=cash,
        positions_value=value,
        equity=equity,
        peak=top,
        drawdown_pct=drawdown,
    )
    snapshot._state.adding = False
    snapshot._state.db = connection.alias
    return snapshot


def last_snapshot_ts(deployment_id: int) -> datetime | None:
    return EquitySnapshot.objects.filter(deployment_id=deployment_id).aggregate(t=Max("ts"))["t"]


def snapshot_due(last: datetime | None, now: datetime) -> bool:
    interval = timedelta(seconds=settings.TRADING_EQUITY_INTERVAL_S)
    return last is None or now - last >= interval


def is_trading(deployment: Deployment) -> bool:
    """Allocated, or holding something: its equity moves and must be snapshotted."""
    if deployment.allocation > 0:
        return True
    return Position.objects.filter(deployment=deployment).exclude(qty=0).exists()


def latest_closes(deployment: Deployment, exchange: str) -> dict[str, tuple[float, int]]:
    """symbol -> (close, close time ms) of the latest stored candle of each of the
    deployment's streams on ``exchange``."""
    out: dict[str, tuple[float, int]] = {}
    for symbol in deployment.symbols or []:
        row = (
            Candle.objects.filter(exchange=exchange, symbol=symbol, timeframe=deployment.timeframe)
            .order_by("-open_time_ms")
            .values_list("close", "close_time_ms")
            .first()
        )
        if row is not None:
            out[symbol] = (row[0], row[1])
    return out


def equity_snapshots_tick(*, now: datetime, market_exchange: str | None = None) -> int:
    """Beat task body: every trading deployment gets its positions marked at the latest
    candle close and a snapshot if the last one is older than TRADING_EQUITY_INTERVAL_S."""
    from .execution import market_exchange_of

    written = 0
    for deployment in Deployment.objects.all():
        if not is_trading(deployment) or not snapshot_due(last_snapshot_ts(deployment.pk), now):
            continue
        source = market_exchange or market_exchange_of(deployment)
        for symbol, (close, _) in latest_closes(deployment, source).items():
            positions_mark(deployment_id=deployment.pk, symbol=symbol, price=close)
        equity_snapshot_write(deployment=deployment, ts=now)
        written += 1
    return written


def totals(deployment_id: int) -> dict[str, float]:
    """Reconciliation figures of a deployment (used by tests and the admin)."""
    eq = deployment_equity(deployment_id)
    starting = (
        Deployment.objects.filter(pk=deployment_id).values_list("starting_cash", flat=True).get()
    )
    return {
        "cash": eq.cash,
        "positions_value": eq.positions_value,
        "equity": eq.equity,
        "realised": eq.realised,
        "unrealised": eq.unrealised,
        "starting_plus_pnl": starting + eq.realised + eq.unrealised,
    }


def isclose(a: float, b: float, tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
