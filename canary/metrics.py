"""Metrics of a canary phase window, computed in SQL from the trading records.

The window is ``(since, now]`` (after the phase's start, up to the evaluation time, both
passed in) for one deployment: an order stamped with the very instant of a promotion was
placed under the phase that ended then. Orders are the deployment's orders submitted in
the window, flatten orders (the rollback's own) excluded. Definitions:

- ``orders``: submitted orders.
- ``latency_p95_ms``: 95th percentile (linear interpolation, as PostgreSQL's
  ``percentile_cont``) of submit-to-acknowledgement latency: ``latency_ms`` when the router
  stored it, else ``acked_at - submitted_at``.
- ``fill_rate``: filled / requested quantity over the orders with a known outcome (not
  PENDING and not errored: errors are counted by ``error_rate``, not twice).
- ``slippage_bps``: mean signed slippage (positive = against us).
- ``confluence_avg``: mean score of the distinct signals that produced the orders.
- ``drawdown_pct``: worst peak-to-trough fall of equity (snapshots are marked to market) in
  the window, starting from the last snapshot at or before ``since``; <= 0 (on SQLite the
  running peak is taken over the window's marks fetched in order, as the SQL window does).
- ``error_rate``: errored (ERROR, REJECTED, UNKNOWN) / submitted.
- ``critical_errors``: orders flagged critical.
- ``stream_gap_s``: longest current silence among the deployment's market streams (its
  symbols on its timeframe, any exchange): ``now`` minus the last candle received; a
  stream never heard of counts from ``since``.
- ``db_ok``: true: the queries above ran.

A metric without data is ``None`` (the engine skips it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from django.db import connections, transaction
from django.db.models import QuerySet

from trading.models import Deployment, EquitySnapshot, MarketStream, Order, OrderStatus, Signal
from trading.rows import adapt_datetime, execute, from_db

from .engine import Metrics

P95 = 0.95
ERRORED = (OrderStatus.ERROR, OrderStatus.REJECTED, OrderStatus.UNKNOWN)
FLATTEN = "flatten"


@dataclass(frozen=True, slots=True)
class Window:
    deployment_id: int
    since: datetime
    now: datetime


def window_orders(window: Window, using: str = "default") -> QuerySet[Order]:
    return (
        Order.objects.using(using)
        .filter(
            deployment_id=window.deployment_id,
            submitted_at__gt=window.since,
            submitted_at__lte=window.now,
        )
        .exclude(purpose=FLATTEN)
    )


def phase_metrics(
    *, deployment: Deployment, since: datetime, now: datetime, using: str = "default"
) -> Metrics:
    window = Window(deployment.pk, since, now)
    connection = connections[using]
    symbols = list(dict.fromkeys(s for s in (deployment.symbols or []) if isinstance(s, str)))
    with connection.cursor() as cursor:
        counts = _aggregates(cursor, connection, window, symbols, deployment.timeframe)
        latency, above = counts.pop("latency_p95"), counts.pop("latency_above")
        if connection.vendor != "postgresql":
            latency = _interpolated_p95(counts["latency_n"], latency, above)
        if connection.vendor in _DRAWDOWN_IN_PYTHON:
            counts["drawdown"] = _drawdown_of_marks(cursor, connection, window)
    submitted = counts["orders"] or 0
    requested = counts["requested"] or 0.0
    return Metrics(
        orders=submitted,
        latency_p95_ms=_nonneg(latency),
        fill_rate=_clamp01((counts["filled"] or 0.0) / requested) if requested > 0 else None,
        slippage_bps=_finite(counts["slippage"]),
        confluence_avg=_confluence(counts["confluence"]),
        drawdown_pct=_drawdown_pct(counts["drawdown"]),
        error_rate=(counts["errored"] / submitted) if submitted else None,
        critical_errors=int(counts["critical"] or 0),
        stream_gap_s=_stream_gap_s(connection, window, counts["heard"]) if symbols else None,
        db_ok=True,
    )


# One statement for the order aggregates (and, on PostgreSQL, the percentile), the
# drawdown and the streams' silence; raw SQL keeps an evaluation to a round trip or two
# without ORM compilation on every step.
_WHERE = "o.deployment_id = %s AND o.submitted_at > %s AND o.submitted_at <= %s AND o.purpose <> %s"
_ERRORED_SQL = "o.status IN ({})".format(", ".join(f"'{s.value}'" for s in ERRORED))
_KNOWN_SQL = "o.status NOT IN ({})".format(
    ", ".join(f"'{s.value}'" for s in (*ERRORED, OrderStatus.PENDING))
)
_LATENCY_EXPR = {
    "postgresql": (
        "COALESCE(o.latency_ms, EXTRACT(EPOCH FROM (o.acked_at - o.submitted_at)) * 1000.0)"
    ),
    "sqlite": (
        "COALESCE(o.latency_ms, (julianday(o.acked_at) - julianday(o.submitted_at)) * 86400000.0)"
    ),
}
_HAS_LATENCY = "(o.latency_ms IS NOT NULL OR o.acked_at IS NOT NULL)"


def _params(connection: Any, window: Window) -> list[Any]:
    return [
        window.deployment_id,
        adapt_datetime(connection, window.since),
        adapt_datetime(connection, window.now),
        FLATTEN,
    ]


_AGGREGATE_KEYS = (
    "orders",
    "errored",
    "critical",
    "requested",
    "filled",
    "slippage",
    "latency_n",
    "latency_p95",
    "latency_above",
    "confluence",
    "drawdown",
    "heard",
)
_SQL: dict[tuple[str, int], str] = {}


def _aggregates_sql(vendor: str, n_symbols: int) -> str:
    latency = _LATENCY_EXPR.get(vendor, _LATENCY_EXPR["sqlite"])
    if vendor == "postgresql":
        p95 = (
            f"percentile_cont({P95}) WITHIN GROUP (ORDER BY {latency})"
            f" FILTER (WHERE {_HAS_LATENCY}), NULL"
        )
    else:
        p95 = _NEIGHBOURS_SQL.format(orders=Order._meta.db_table, latency=latency)
    orders, signals = Order._meta.db_table, Signal._meta.db_table
    if vendor in _DRAWDOWN_IN_PYTHON:
        drawdown = "SELECT NULL"
    else:
        drawdown = _DRAWDOWN_SQL.format(table=EquitySnapshot._meta.db_table)
    # The earliest of the streams' last candles: a stream never heard of counts from
    # ``since`` (NULL when the deployment trades no symbol).
    if n_symbols:
        names = " UNION ALL ".join(["SELECT %s AS symbol"] * n_symbols)
        heard = f"""(SELECT MIN(COALESCE((
                    SELECT MAX(ms.last_received_at) FROM {MarketStream._meta.db_table} ms
                    WHERE ms.symbol = names.symbol AND ms.timeframe = %s), %s))
                FROM ({names}) names)"""
    else:
        heard = "NULL"
    with_ = ""
    if vendor != "postgresql":
        with_ = _NEIGHBOURS_WITH.format(
            latency=latency, orders=orders, where=_WHERE, has=_HAS_LATENCY
        )
    return f"""{with_}
        SELECT COUNT(*),
               SUM(CASE WHEN {_ERRORED_SQL} THEN 1 ELSE 0 END),
               SUM(CASE WHEN o.critical THEN 1 ELSE 0 END),
               SUM(CASE WHEN {_KNOWN_SQL} THEN o.requested_qty END),
               SUM(CASE WHEN {_KNOWN_SQL} THEN o.filled_qty END),
               AVG(o.slippage_bps),
               SUM(CASE WHEN {_HAS_LATENCY} THEN 1 ELSE 0 END),
               {p95},
               (SELECT AVG(s.score) FROM {signals} s WHERE s.id IN (
                    SELECT o.signal_id FROM {orders} o WHERE {_WHERE})),
               ({drawdown}),
               {heard}
        FROM {orders} o WHERE {_WHERE}
    """


def _aggregates(
    cursor: Any, connection: Any, window: Window, symbols: list[str], timeframe: str
) -> dict[str, Any]:
    key = (connection.vendor, len(symbols))
    sql = _SQL.get(key)
    if sql is None:
        sql = _SQL[key] = _aggregates_sql(connection.vendor, len(symbols))
    params = _params(connection, window)
    since, now = params[1], params[2]
    drawdown = _drawdown_params(window, since, now)
    if connection.vendor in _DRAWDOWN_IN_PYTHON:
        drawdown = []
    heard = [timeframe, since, *symbols] if symbols else []
    p95 = [] if connection.vendor == "postgresql" else [*params, P95]
    execute(cursor, sql, p95 + params + drawdown + heard + params)
    row = cursor.fetchone()
    return dict(zip(_AGGREGATE_KEYS, row, strict=True))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _clamp01(value: float) -> float:
    return min(1.0, max(0.0, value))


def _confluence(value: Any) -> float | None:
    return None if value is None else min(4.0, max(0.0, float(value)))


# --- latency percentile on SQLite ---------------------------------------------------------

# percentile_cont without the function: the two neighbouring values of the rank
# ``0.95 * (n - 1)`` (``ORDER BY ... LIMIT 1 OFFSET k`` and ``k + 1``, k its floor: the
# count's CAST, never negative there), read by the aggregates' statement and interpolated
# by ``_interpolated_p95``. The fraction is a parameter, bound as the double Python uses.
_NEIGHBOURS_SQL = """(SELECT v FROM lat ORDER BY v LIMIT 1 OFFSET (SELECT k FROM lat_rank)),
               (SELECT v FROM lat ORDER BY v LIMIT 1 OFFSET (SELECT k FROM lat_rank) + 1)"""
_NEIGHBOURS_WITH = (
    "WITH lat AS (SELECT {latency} AS v FROM {orders} o WHERE {where} AND {has}),"
    " lat_rank AS (SELECT CAST(%s * (COUNT(*) - 1) AS INTEGER) AS k FROM lat)"
)


def _interpolated_p95(n: int | None, low: float | None, high: float | None) -> float | None:
    """The percentile from the neighbours of its rank among ``n`` latencies (``high`` None:
    ``low`` is the last)."""
    if not n or low is None:
        return None
    if high is None:
        return low
    rank = P95 * (n - 1)
    return low + (high - low) * (rank - math.floor(rank))


def _nonneg(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return max(0.0, value) if math.isfinite(value) else None


# --- drawdown -----------------------------------------------------------------------------

_DRAWDOWN_SQL = """
SELECT MIN(equity / peak - 1.0) FROM (
    SELECT equity,
           MAX(equity) OVER (ORDER BY ts, id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
               AS peak
    FROM {table}
    WHERE deployment_id = %s AND ts <= %s AND ts >= COALESCE(
        (SELECT MAX(ts) FROM {table} WHERE deployment_id = %s AND ts <= %s), %s)
) marks
WHERE peak > 0
"""


# SQLite: its window functions copy the window's rows into a temporary table (about 1 us a
# mark); the running peak over the marks fetched in the same order costs a fifth of that.
_DRAWDOWN_IN_PYTHON = ("sqlite",)
_DRAWDOWN_MARKS_SQL = """
SELECT equity FROM {table}
WHERE deployment_id = %s AND ts <= %s AND ts >= COALESCE(
    (SELECT MAX(ts) FROM {table} WHERE deployment_id = %s AND ts <= %s), %s)
ORDER BY ts, id
"""


def _drawdown_params(window: Window, since: Any, now: Any) -> list[Any]:
    return [window.deployment_id, now, window.deployment_id, since, since]


# SQLite, step after step of one phase: the window's marks read once. What a committed
# step read of them (up to its last mark in (ts, id) order: the running peak, the worst
# ratio, how many marks, the sum of their ids) is kept per database, deployment and window
# start; the next step reads only the marks after that last one, with the window's base
# and the count, id sum and last equity of the marks up to it, in one statement. Marks are
# only ever appended (never updated; removed only with their deployment) and committed
# ones keep their ids: the same base, count, sum and last equity mean the same marks up to
# it, and what was kept holds; otherwise (a mark stamped before it, another base) the
# window is read whole again. What a step read is kept once its transaction commits, so
# that nothing a rolled back transaction saw is kept.
_BASE = "COALESCE((SELECT MAX(ts) FROM {table} WHERE deployment_id = %s AND ts <= %s), %s)"
# Both parts read the index on (deployment_id, ts) over a range of it: the marks up to the
# last one read (its id and ts only), then those after it.
_DRAWDOWN_AFTER_SQL = """
SELECT 0 AS part, {base} AS ts, COUNT(*) AS id, SUM(m.id) AS equity,
    (SELECT equity FROM {table} WHERE id = %s) AS last
FROM {table} m
WHERE m.deployment_id = %s AND m.ts >= {base} AND m.ts <= %s AND NOT (m.ts = %s AND m.id > %s)
UNION ALL
SELECT 1, m.ts || '', m.id, m.equity, NULL
FROM {table} m
WHERE m.deployment_id = %s AND m.ts <= %s AND m.ts >= MAX({base}, %s) AND (m.ts > %s OR m.id > %s)
ORDER BY 1, 2, 3
"""
_DRAWDOWN_AFTER = _DRAWDOWN_AFTER_SQL.format(
    table=EquitySnapshot._meta.db_table,
    base=_BASE.format(table=EquitySnapshot._meta.db_table),
)


@dataclass(frozen=True, slots=True)
class _Marks:
    """The window's marks read up to ``last`` (ts text, id, equity): their base, count and
    id sum, running peak and worst ratio."""

    base: str
    last: tuple[str, int, float]
    count: int
    ids: int
    peak: float | None
    worst: float | None


_KEPT: dict[tuple[str, int, str], _Marks] = {}
_NOTHING = ("", 0, None)  # before every mark: the whole window is after it


def _drawdown_of_marks(cursor: Any, connection: Any, window: Window) -> float | None:
    """``_DRAWDOWN_SQL``'s value from the window's marks in (ts, id) order."""
    since = adapt_datetime(connection, window.since)
    now = adapt_datetime(connection, window.now)
    key = (connection.alias, window.deployment_id, since)
    kept = _KEPT.get(key)
    if kept is not None and now < kept.last[0]:
        kept = None  # an earlier evaluation than the one kept
    marks = _marks_after(cursor, window.deployment_id, since, now, kept)
    if marks is None:  # what was kept no longer holds
        kept = None
        marks = _marks_after(cursor, window.deployment_id, since, now, None)
        assert marks is not None
    base, rows = marks
    peak, worst = (kept.peak, kept.worst) if kept is not None else (None, None)
    peak, worst = drawdown_state(map(itemgetter(3), rows), peak, worst)
    if rows:
        count = (kept.count if kept else 0) + len(rows)
        ids = (kept.ids if kept else 0) + sum(map(itemgetter(2), rows))
        last = rows[-1][1:4]
        read = _Marks(base, last, count, ids, peak, worst)
        transaction.on_commit(lambda: _keep(key, read), using=connection.alias)
    return worst


def _marks_after(
    cursor: Any, deployment_id: int, since: str, now: str, kept: _Marks | None
) -> tuple[str, list[tuple[int, str, int, float, None]]] | None:
    """(the window's base, its marks after ``kept``'s last: (1, ts text, id, equity, None)
    in order); None when the marks up to it are no longer those kept."""
    last_ts, last_id, last_equity = kept.last if kept is not None else _NOTHING
    base = [deployment_id, since, since]
    execute(
        cursor,
        _DRAWDOWN_AFTER,
        [*base, last_id, deployment_id, *base, last_ts, last_ts, last_id]
        + [deployment_id, now, *base, last_ts, last_ts, last_id],
    )
    (_, window_base, count, ids, equity), *rows = cursor.fetchall()
    if kept is not None and (window_base, count, ids or 0, equity) != (
        kept.base,
        kept.count,
        kept.ids,
        last_equity,
    ):
        return None
    return window_base, rows


def _keep(key: tuple[str, int, str], marks: _Marks) -> None:
    if len(_KEPT) > 1024:
        _KEPT.clear()
    _KEPT[key] = marks


def drawdown_ratio(marks: Any) -> float | None:
    """MIN(equity / running peak - 1.0) over the marks with a positive running peak, as
    ``_DRAWDOWN_SQL`` computes it (a ratio that is not a number is NULL there: skipped)."""
    return drawdown_state(marks, None, None)[1]


def drawdown_state(
    marks: Any, peak: float | None, worst: float | None
) -> tuple[float | None, float | None]:
    """(running peak, worst ratio) after ``marks``, from those before them."""
    for equity in marks:
        if peak is None or equity > peak:
            peak = equity
        if peak > 0:
            ratio = equity / peak - 1.0
            if ratio == ratio and (worst is None or ratio < worst):
                worst = ratio
    return peak, worst


def _drawdown_pct(value: Any) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return min(0.0, round(float(value) * 100.0, 6))


# --- market streams -----------------------------------------------------------------------

_LAST_RECEIVED = MarketStream._meta.get_field("last_received_at")


def _stream_gap_s(connection: Any, window: Window, earliest: Any) -> float | None:
    """``now`` minus the earliest of the streams' last candles (read by the statement)."""
    earliest = from_db(connection, _LAST_RECEIVED)(earliest)
    return round(max(0.0, (window.now - earliest).total_seconds()), 3)
