"""The per-candle strategy step: signal engine -> Signal rows -> order router.

For each new (not late) candle, in open-time order per stream, every deployment watching
that stream (its symbols and timeframe, on ``execution.market_exchange_of``) with signals
enabled:

1. feeds the candle to its incremental ``SignalEngine`` (parameters: ``Deployment.params``
   validated by ``SignalParams``). Engines live in the process; one that missed candles
   (another worker processed them, or a restart) is rebuilt from the last
   TRADING_ENGINE_LOOKBACK stored candles before the batch;
2. marks its position at the close (the paper exchange gets the price too);
3. persists a Signal (unique per deployment and candle, factors included) when the engine
   emits one;
4. decides, under a per-deployment lock (Redis) so that two workers never both enter: a
   long whose stop or target the candle reached, or a sell signal against a long, is
   closed (``order_close``); a buy signal when flat opens a long (``order_for_signal``:
   full size x canary allocation). Spot: no shorts;
5. writes an equity snapshot when the last one is TRADING_EQUITY_INTERVAL_S old and the
   deployment is trading.

Clock: candles replayed from CSV run on the candle clock (their close time), everything
else on the wall clock, so that a backfilled old candle yields a Signal but no order (the
router refuses stale signals).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max, Min
from django.utils import timezone

from . import execution, portfolio, rows
from .models import Candle, Deployment, EquitySnapshot, Order, OrderStatus, Position, Signal
from .signals import InvalidSignalParams, SignalEngine, SignalParams
from .signals import Signal as EngineSignal

log = logging.getLogger(__name__)

REPLAY_SOURCES = frozenset({"replay"})
LOCK_TIMEOUT_S = 60
LOCK_WAIT_S = 30


# --------------------------------------------------------------------------- engines


_engines: dict[tuple[Any, ...], SignalEngine] = {}


def reset_engines() -> None:
    _engines.clear()


def _stream_qs(candle: Candle):
    return Candle.objects.filter(
        exchange=candle.exchange, symbol=candle.symbol, timeframe=candle.timeframe, late=False
    )


def _rebuilt(params: SignalParams, first: Candle) -> SignalEngine:
    engine = SignalEngine(params)
    lookback = max(settings.TRADING_ENGINE_LOOKBACK, 2 * params.warmup)
    before = _stream_qs(first).filter(open_time_ms__lt=first.open_time_ms)
    for candle in reversed(list(before.order_by("-open_time_ms")[:lookback])):
        engine.update(candle)
    return engine


def engine_for(deployment: Deployment, params: SignalParams, first: Candle) -> SignalEngine:
    """The deployment's engine for ``first``'s stream, continuous up to just before it."""
    key = (deployment.pk, deployment.created_at, first.exchange, first.symbol, first.timeframe)
    engine = _engines.get(key)
    if engine is not None and engine.params == params:
        last = engine.last_ts
        if last is None or last >= first.open_time_ms:
            return engine
        previous = (
            _stream_qs(first)
            .filter(open_time_ms__lt=first.open_time_ms)
            .aggregate(t=Max("open_time_ms"))["t"]
        )
        if previous == last:
            return engine
    engine = _rebuilt(params, first)
    _engines[key] = engine
    return engine


# --------------------------------------------------------------------------- locking


@contextmanager
def deployment_lock(deployment_id: int) -> Iterator[bool]:
    """Serialise the order decisions of one deployment across worker processes. Yields
    False when the lock could not be taken (Redis down or busy): decide nothing then."""
    from canary.heartbeat import redis_client

    name = f"trading:decide:{connection.settings_dict['NAME']}:{deployment_id}"
    try:
        lock = redis_client().lock(name, timeout=LOCK_TIMEOUT_S, blocking_timeout=LOCK_WAIT_S)
        acquired = bool(lock.acquire())
    except redis.RedisError as exc:
        log.warning("deployment %s: decision lock unavailable: %s", deployment_id, exc)
        acquired, lock = False, None
    try:
        yield acquired
    finally:
        if acquired and lock is not None:
            try:
                lock.release()
            except (redis.RedisError, redis.exceptions.LockError):
                log.warning("deployment %s: decision lock expired before release", deployment_id)


# --------------------------------------------------------------------------- helpers


def clock_of(candle: Candle, now: datetime | None) -> datetime:
    if candle.source in REPLAY_SOURCES:
        return datetime.fromtimestamp((candle.close_time_ms + 1) / 1000, tz=UTC)
    return now or timezone.now()


def watchers(exchange: str, symbol: str, timeframe: str) -> list[Deployment]:
    return [
        d
        for d in Deployment.objects.filter(signals_enabled=True, timeframe=timeframe).order_by("pk")
        if symbol in (d.symbols or []) and execution.market_exchange_of(d) == exchange
    ]


def signal_row(deployment: Deployment, candle: Candle, hit: EngineSignal, now: datetime) -> Signal:
    """The (unsaved) Signal of (deployment, candle): the engine's levels and factors."""
    return Signal(
        deployment=deployment,
        candle=candle,
        symbol=candle.symbol,
        side=hit.side,
        entry=hit.entry,
        stop=hit.stop,
        target=hit.target,
        reward_risk=hit.reward_risk,
        score=hit.score,
        factors=dict(hit.factors),
        ts_ms=hit.ts,
        created_at=now,
    )


def levels_of(deployment_id: int, symbol: str) -> tuple[float | None, float | None]:
    """(stop, target) of the signal of the deployment's last filled entry in ``symbol``."""
    levels = (
        Order.objects.filter(
            deployment_id=deployment_id,
            symbol=symbol,
            purpose=execution.ENTRY,
            filled_qty__gt=0,
            signal__isnull=False,
        )
        .order_by("-pk")
        .values_list("signal__stop", "signal__target")
        .first()
    )
    return levels or (None, None)


@dataclass
class Holding:
    """What the decision needs about the deployment's position in one symbol."""

    qty: float = 0.0
    stop: float | None = None
    target: float | None = None

    @property
    def long(self) -> bool:
        return self.qty > 0

    @classmethod
    def load(cls, deployment_id: int, symbol: str) -> Holding:
        """The position's quantity (``Position.objects.filter(...).values_list("qty")
        .first()``) and, for a long, ``levels_of`` its last filled entry: one statement
        written once."""
        connection = transaction.get_connection()
        with connection.cursor() as cursor:
            rows.execute(cursor, _reload_sql(connection, _HOLDING_SQL), [deployment_id, symbol])
            row = cursor.fetchone()
        qty = (row[0] if row is not None else None) or 0.0
        if qty <= 0:
            return cls(qty)
        return cls(qty, row[1], row[2])

    def exit_reason(self, candle: Candle, signal: Signal | None) -> str | None:
        if not self.long:
            return None
        if self.stop is not None and candle.low <= self.stop:
            return "stop"
        if self.target is not None and candle.high >= self.target:
            return "target"
        if signal is not None and signal.side == "sell":
            return "signal"
        return None


# --------------------------------------------------------------------------- decide


def _decide(
    deployment: Deployment,
    candle: Candle,
    signal: Signal | None,
    holding: Holding,
    now: datetime,
) -> Order | None:
    reason = holding.exit_reason(candle, signal)
    wants_entry = signal is not None and signal.side == "buy" and not holding.long
    if reason is None and not wants_entry:
        return None
    if reason is None and _exited_on(deployment, candle):
        return None  # the candle's one decision was an exit (a redelivered task, a second worker)
    adapter = execution.exchange_for(deployment, candle)
    if reason is not None:
        return execution.order_close(
            deployment=deployment,
            symbol=candle.symbol,
            key=_exit_key(reason, candle),
            reference_price=candle.close,
            signal=signal if reason == "signal" else None,
            now=now,
            exchange=adapter,
        )
    assert signal is not None
    return execution.order_for_signal(signal=signal, now=now, exchange=adapter)


EXIT_REASONS = ("stop", "target", "signal")  # Holding.exit_reason's


def _exit_key(reason: str, candle: Candle) -> str:
    """An exit's key (``order_close``): one exit per reason and candle."""
    return f"{reason}:{candle.pk}"


def _exited_on(deployment: Deployment, candle: Candle) -> bool:
    """Whether an exit was placed on this candle: one decision per candle, so a pass that
    finds the position flat after it does not open a new long on the same candle's buy
    signal (a sweep below the stop that closes back up carries one)."""
    ids = [
        execution.exit_client_id(deployment.pk, candle.symbol, _exit_key(reason, candle))
        for reason in EXIT_REASONS
    ]
    return Order.objects.filter(client_order_id__in=ids).exists()


def _wants(holding: Holding, candle: Candle, signal: Signal | None) -> bool:
    if holding.exit_reason(candle, signal) is not None:
        return True
    return signal is not None and signal.side == "buy" and not holding.long


def _act(
    deployment: Deployment,
    candle: Candle,
    signal: Signal | None,
    holding: Holding,
    now: datetime,
) -> bool:
    """Decide and route under the deployment lock. True when an order was sent (the
    caller re-reads the position)."""
    if not _wants(holding, candle, signal):
        return False
    with deployment_lock(deployment.pk) as locked:
        if not locked:
            return False
        holding = Holding.load(deployment.pk, candle.symbol)
        try:
            order = _decide(deployment, candle, signal, holding, now)
        except execution.OrderRefused as refused:
            log.info("deployment %s %s: %s", deployment.pk, candle.symbol, refused.reason)
            return False
        return order is not None and order.status not in (OrderStatus.REJECTED, OrderStatus.ERROR)


# Account.reload's reads: the positions with the levels of each one's last filled entry
# (as ``levels_of``), and the last equity snapshot; SQL written once (``{name}``: a table).
_POSITIONS_SQL = """
SELECT p.symbol, p.qty, p.avg_entry, p.last_price, s.stop, s.target
FROM {position} p
LEFT JOIN {signal} s ON s.id = (
    SELECT o.signal_id FROM {order} o
    WHERE o.deployment_id = p.deployment_id AND o.symbol = p.symbol AND o.purpose = '{entry}'
        AND o.filled_qty > 0 AND o.signal_id IS NOT NULL
    ORDER BY o.id DESC LIMIT 1)
WHERE p.deployment_id = %s
"""
# Holding.load's: the first position row (by id) of one symbol, with the levels of its
# last filled entry (as ``levels_of``) when it is a long.
_HOLDING_SQL = """
SELECT p.qty, s.stop, s.target
FROM {position} p
LEFT JOIN {signal} s ON p.qty > 0 AND s.id = (
    SELECT o.signal_id FROM {order} o
    WHERE o.deployment_id = p.deployment_id AND o.symbol = p.symbol AND o.purpose = '{entry}'
        AND o.filled_qty > 0 AND o.signal_id IS NOT NULL
    ORDER BY o.id DESC LIMIT 1)
WHERE p.deployment_id = %s AND p.symbol = %s
ORDER BY p.id LIMIT 1
"""
_LAST_SNAPSHOT_SQL = """
SELECT ts, peak FROM {snapshot} WHERE deployment_id = %s ORDER BY ts DESC, id DESC LIMIT 1
"""
_SNAPSHOT_TS = EquitySnapshot._meta.get_field("ts")
_RELOAD_SQL: dict[tuple[str, ...], str] = {}


def _reload_sql(connection: Any, template: str) -> str:
    key = (connection.vendor, template)
    sql = _RELOAD_SQL.get(key)
    if sql is None:
        qn = connection.ops.quote_name
        sql = _RELOAD_SQL[key] = template.format(
            position=qn(Position._meta.db_table),
            signal=qn(Signal._meta.db_table),
            order=qn(Order._meta.db_table),
            snapshot=qn(EquitySnapshot._meta.db_table),
            entry=execution.ENTRY,
        )
    return sql


_SIGNAL_FIELDS = Signal._meta.concrete_fields
_SIGNAL_CONVERTERS: dict[tuple[str, str], list[tuple[int, list[Any], Any]]] = {}


def _stored_signal(deployment: Deployment, candle: Candle) -> Signal:
    """``Signal.objects.get(deployment=deployment, candle=candle)`` with its SQL written
    once, the values turned as the ORM turns them (the backend's and fields' converters)."""
    if candle.pk is None:
        return Signal.objects.get(deployment=deployment, candle=candle)
    connection = transaction.get_connection()
    key = (connection.alias, connection.vendor)
    sql = _RELOAD_SQL.get(("signal", *key))
    converters = _SIGNAL_CONVERTERS.get(key)
    if sql is None or converters is None:
        qn = connection.ops.quote_name
        sql = _RELOAD_SQL[("signal", *key)] = "SELECT {} FROM {} WHERE {} = %s AND {} = %s".format(
            ", ".join(qn(f.column) for f in _SIGNAL_FIELDS),
            qn(Signal._meta.db_table),
            qn("deployment_id"),
            qn("candle_id"),
        )
        converters = []
        for i, f in enumerate(_SIGNAL_FIELDS):
            col = f.get_col(Signal._meta.db_table)
            funcs = rows.read_converters(connection, col)
            if funcs:
                converters.append((i, funcs, col))
        _SIGNAL_CONVERTERS[key] = converters
    with connection.cursor() as cursor:
        rows.execute(cursor, sql, [deployment.pk, candle.pk])
        row = cursor.fetchone()
    if row is None:
        raise Signal.DoesNotExist("Signal matching query does not exist.")
    values = list(row)
    for i, funcs, col in converters:
        for func in funcs:
            values[i] = func(values[i], col, connection)
    return Signal.from_db(connection.alias, [f.attname for f in _SIGNAL_FIELDS], values)


_DEPLOYMENT_ROWS = rows.ModelRows(Deployment, "d")


def _deployment(connection: Any, cursor: Any, pk: int) -> Deployment:
    """``Deployment.objects.get(pk=pk)`` with its SQL written once."""

    def build() -> str:
        qn = connection.ops.quote_name
        return (
            f"SELECT {_DEPLOYMENT_ROWS.columns(connection)} FROM {qn(Deployment._meta.db_table)} d"
            f" WHERE d.{qn(Deployment._meta.pk.column)} = %s"
        )

    rows.execute(cursor, rows.sql_once(connection, ("strategy_deployment",), build), [pk])
    row = cursor.fetchone()
    if row is None:
        raise Deployment.DoesNotExist("Deployment matching query does not exist.")
    return _DEPLOYMENT_ROWS.instance(connection, row)


@dataclass
class _Mark:
    qty: float
    avg_entry: float
    last: float | None

    def value(self) -> float:
        return self.qty * (self.last if self.last is not None else self.avg_entry)


class Account:
    """What the strategy knows of one deployment between the router's orders, so that a
    candle without an order decision costs no query: cash, positions (quantity, average
    entry, last mark), the levels of each long, the last equity snapshot's time and peak.

    Signal rows, equity snapshots (equity = cash + this candle's position at its close +
    the other positions as last marked), position marks, and replayed candles handed over
    unsaved (``candles``) are buffered and written in one transaction by ``flush``: before
    every order decision and at the end. ``reload`` re-reads what the router may have
    changed. Several streams of one deployment may share an account: each then sees the
    others' marks as it would have once they were written.
    """

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.cash = 0.0
        self.positions: dict[str, _Mark] = {}
        self.levels: dict[str, tuple[float | None, float | None]] = {}
        self.last_snapshot: datetime | None = None
        self.peak: float | None = None
        self.candles: list[Candle] = []
        self.signals: list[Signal] = []
        self.snapshots: list[EquitySnapshot] = []
        self.marks: dict[str, float] = {}
        self.decisions = 0  # order decisions taken: the router may have written

    def reload(self) -> None:
        """Re-read the deployment, its positions, the levels of its longs, its last
        snapshot (what an order, or a rollout decision, may have changed)."""
        pk = self.deployment.pk
        connection = transaction.get_connection()
        with connection.cursor() as cursor:
            self.deployment = _deployment(connection, cursor, pk)
            self.cash = self.deployment.cash
            rows.execute(cursor, _reload_sql(connection, _POSITIONS_SQL), [pk])
            positions = cursor.fetchall()
            rows.execute(cursor, _reload_sql(connection, _LAST_SNAPSHOT_SQL), [pk])
            last = cursor.fetchone()
        self.positions = {symbol: _Mark(qty, avg, mark) for symbol, qty, avg, mark, *_ in positions}
        self.levels = {
            symbol: (stop, target) for symbol, qty, *_, stop, target in positions if qty > 0
        }
        if last is not None:
            last = (rows.from_db(connection, _SNAPSHOT_TS)(last[0]), last[1])
        self.last_snapshot, self.peak = last if last is not None else (None, None)

    def holding(self, symbol: str) -> Holding:
        mark = self.positions.get(symbol)
        if mark is None or mark.qty <= 0:
            return Holding(mark.qty if mark is not None else 0.0)
        return Holding(mark.qty, *self.levels.get(symbol, (None, None)))

    def step(self, candle: Candle, hit: EngineSignal | None, now: datetime) -> Signal | None:
        """Buffer what a candle without an order decision writes; return its Signal row."""
        symbol = candle.symbol
        mark = self.positions.get(symbol)
        long = mark is not None and mark.qty > 0
        if mark is not None and long:
            mark.last = self.marks[symbol] = candle.close
        signal = signal_row(self.deployment, candle, hit, now) if hit is not None else None
        if signal is not None:
            self.signals.append(signal)
        trading = self.deployment.allocation > 0 or long
        if trading and portfolio.snapshot_due(self.last_snapshot, now):
            self.snapshots.append(self._snapshot(symbol, candle.close, now))
            self.last_snapshot = now
        return signal

    def _snapshot(self, symbol: str, close: float, now: datetime) -> EquitySnapshot:
        value = sum(m.value() for s, m in self.positions.items() if s != symbol)
        mine = self.positions.get(symbol)
        value += mine.qty * close if mine is not None else 0.0
        equity = self.cash + value
        base = self.peak if self.peak is not None else self.deployment.starting_cash
        self.peak = max(base, equity)
        drawdown = (equity / self.peak - 1.0) * 100.0 if self.peak > 0 else 0.0
        return _NEW_SNAPSHOT(
            deployment_id=self.deployment.pk,
            ts=now,
            cash=self.cash,
            positions_value=value,
            equity=equity,
            peak=self.peak,
            drawdown_pct=min(0.0, drawdown),
        )

    def flush(self, also: Callable[[], Any] | None = None, *, savepoint: bool = True) -> None:
        """Write what is buffered in one transaction; ``also``: the caller's own writes, made
        in the same transaction (alone when nothing is buffered). ``savepoint=False``
        inside a caller's transaction: no savepoint of its own (a failure here fails the
        caller's transaction)."""
        if not (self.candles or self.signals or self.snapshots or self.marks):
            if also is not None:
                also()
            return
        with transaction.atomic(savepoint=savepoint):
            if self.candles:
                _CANDLES.insert(self.candles)
            if self.signals:
                _SIGNALS.insert(self.signals)
            if self.snapshots:
                _SNAPSHOTS.insert(self.snapshots)
            for symbol, price in self.marks.items():
                portfolio.positions_mark(
                    deployment_id=self.deployment.pk, symbol=symbol, price=price
                )
            if also is not None:
                also()
        self.candles, self.signals, self.snapshots, self.marks = [], [], [], {}


_NEW_SNAPSHOT = rows.NewRows(EquitySnapshot)
_CANDLES = rows.BulkInsert(Candle)
_SIGNALS = rows.BulkInsert(Signal, ignore_conflicts=True)
_SNAPSHOTS = rows.BulkInsert(EquitySnapshot)


class StreamRunner:
    """One stream of one deployment, candle by candle: its signal engine, an order
    decision when the candle asks for one (under the deployment lock, after a flush of
    the account), the rest buffered in the (possibly shared) ``account``."""

    def __init__(self, account: Account, engine: SignalEngine) -> None:
        self.account = account
        self.engine = engine

    @classmethod
    def build(cls, account: Account, first: Candle) -> StreamRunner | None:
        """The runner of ``first``'s stream (None when the deployment's signal parameters
        are invalid: logged)."""
        deployment = account.deployment
        try:
            params = SignalParams.from_dict(deployment.params or {})
        except (InvalidSignalParams, TypeError) as exc:
            log.error("deployment %s: invalid signal parameters: %s", deployment.pk, exc)
            return None
        return cls(account, engine_for(deployment, params, first))

    def feed(self, candle: Candle, now: datetime) -> Signal | None:
        """Process one candle (skipped when the engine has seen it); return its Signal."""
        engine = self.engine
        if engine.last_ts is not None and candle.open_time_ms <= engine.last_ts:
            return None
        hit = engine.update(candle)
        account = self.account
        signal = account.step(candle, hit, now)
        holding = account.holding(candle.symbol)
        if not _wants(holding, candle, signal):
            return signal
        account.flush()
        deployment = account.deployment
        stored = _stored_signal(deployment, candle) if signal else None
        if stored is not None:
            stored.candle = candle
        account.decisions += 1
        if _act(deployment, candle, stored, holding, now):
            account.reload()
        return signal


# --------------------------------------------------------------------------- entry points


def stream_run(
    *, deployment: Deployment, candles: list[Candle], now: datetime | None = None
) -> int:
    """Run one deployment over consecutive candles of one stream. Returns signals made."""
    if not candles:
        return 0
    runner = StreamRunner.build(Account(deployment), candles[0])
    if runner is None:
        return 0
    runner.account.reload()
    made = 0
    for candle in candles:
        made += runner.feed(candle, clock_of(candle, now)) is not None
    runner.account.flush()
    return made


def candles_strategy(*, candle_ids: Iterable[int], now: datetime | None = None) -> int:
    """The pipeline step queued after ingestion: run every watching deployment over the
    new candles of each stream, in open-time order. A failing deployment is logged and
    does not stop the others. Returns the number of signals made."""
    streams = (
        Candle.objects.filter(pk__in=list(candle_ids), late=False)
        .values("exchange", "symbol", "timeframe")
        .annotate(lo=Min("open_time_ms"), hi=Max("open_time_ms"))
        .order_by("exchange", "symbol", "timeframe")
    )
    made = 0
    for s in streams:
        deployments = watchers(s["exchange"], s["symbol"], s["timeframe"])
        if not deployments:
            continue
        candles = list(
            Candle.objects.filter(
                exchange=s["exchange"],
                symbol=s["symbol"],
                timeframe=s["timeframe"],
                late=False,
                open_time_ms__gte=s["lo"],
                open_time_ms__lte=s["hi"],
            ).order_by("open_time_ms")
        )
        for deployment in deployments:
            try:
                made += stream_run(deployment=deployment, candles=candles, now=now)
            except Exception:
                log.exception("deployment %s: strategy step failed", deployment.pk)
    return made
