"""Rehearsal: a complete rollout on history, on the candle clock, in a throwaway database.

``rehearse(options)`` runs inside the throwaway process started by ``manage.py rehearse``
(which owns the temporary SQLite database and a private Redis). Everything goes through
the production code paths with ``now`` = the candle clock (a candle's close time):

1. rehearsal users (``rehearsal-alpha``, ``rehearsal-planner``, ``rehearsal-ops``, first
   name "Rehearsal") and a paper deployment trading the files' symbols;
2. warm-up candles (the signal engine's warm-up) through the strategy (``Feed``);
3. pre-flight against the paper exchange (``canary.preflight.preflight_run``) with the
   checks that do not judge freshness against the wall clock, after a verified backup;
   the stored run is stamped onto the candle clock (the gate measures its age in
   candle time);
4. the rollout (rehearsal=True), an Alpha and a Planner approval by the rehearsal users,
   start;
5. candles, one candle time at a time, through the strategy (signals, paper orders
   through the order router, equity; ``trading.strategy.StreamRunner``, writes buffered
   until something reads them), stream freshness on the candle clock, and the canary
   monitor step (evaluations, promotions, extensions, the breaker, a rollback through
   ``rollback_request`` run to completion in-process) whenever its verdict may have
   changed, at each phase end, and at least every ``monitor_every_s`` of candle time
   (``Cadence``): it acts at the same candle time as a step after every candle would;
6. the end: the rollout LIVE or ROLLED_BACK, or the data exhausted.

The report is read back from the database it wrote (so it reconciles with it): per phase
its verdicts, last metrics, orders, P&L (equity change), and the moment and cause of any
rollback.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.db.models import Count, Max, Min

from audit.roles import ensure_roles
from trading.models import Candle, Deployment, EquitySnapshot, MarketStream, Order
from trading.rows import NewRows, adapt_datetime, execute, fetch_one, from_db, sql_once
from trading.timeframes import timeframe_ms

from . import services
from .models import Phase, PreflightRun, Rollback, Rollout, RolloutState
from .monitor import StepResult, monitor_step

if TYPE_CHECKING:
    from trading.strategy import StreamRunner

DB_ENV = "CANARY_REHEARSAL_DB"
USERS = {
    "alpha": ("rehearsal-alpha", "Alpha"),
    "planner": ("rehearsal-planner", "Planner"),
    "ops": ("rehearsal-ops", "Ops"),
}
EVIDENCE = {
    "smc_alignment_pct": 80.0,
    "reward_risk": 3.01,
    "liquidation_sweep_errors": 0,
    "rehearsal": True,
}
PREFLIGHT_CHECKS = ("env", "exchange_rest", "database", "order_test", "backup")
PREFLIGHT_SKIPPED = {
    "exchange_websocket": "judges stream freshness against the wall clock; candles are history",
    "signals": "judges candle freshness against the wall clock; candles are history",
    "monitoring": "no Celery worker or beat in a rehearsal: tasks run in-process",
}
FINAL_STATES = (RolloutState.LIVE, RolloutState.ROLLED_BACK)
# A rehearsal stops where a person would have to decide: a pause, or a rollback to finish.
STOP_STATES = (*FINAL_STATES, RolloutState.PAUSED, RolloutState.ROLLING_BACK)
MAX_BATCH = 1000


class RehearsalError(Exception):
    pass


@dataclass(frozen=True)
class Series:
    path: str
    symbol: str
    timeframe: str
    items: list[dict[str, Any]]


@dataclass
class Options:
    paths: list[str]
    speed: float | None = None  # candle seconds per wall second; None: as fast as possible
    plan: list[dict[str, Any]] | None = None
    thresholds: dict[str, Any] | None = None
    cash: float = 1.0
    notional: float = 0.1
    monitor_every_s: float = 3600.0  # candle time between monitor steps at most; 0: every candle
    limit: int | None = None  # candle times after the warm-up, at most


@dataclass
class Progress:
    candles: int = 0
    steps: int = 0
    loop_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time in the loop (the wall time waits on others)
    feed_s: float = 0.0
    monitor_s: float = 0.0
    clock: datetime | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


# --- data ---------------------------------------------------------------------------------


def parse_name(path: Path) -> tuple[str, str]:
    """'ETH_BTC-5m.csv' -> ('ETH/BTC', '5m')."""
    stem, _, timeframe = path.stem.rpartition("-")
    if not stem or not timeframe:
        raise RehearsalError(f"{path.name}: expected a name like ETH_BTC-5m.csv")
    return stem.replace("_", "/"), timeframe


def load_series(paths: Iterable[str], exchange: str) -> list[Series]:
    series = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise RehearsalError(f"{path}: no such file")
        symbol, timeframe = parse_name(path)
        if timeframe not in settings.MARKET_TIMEFRAMES:
            raise RehearsalError(f"{path.name}: unknown timeframe {timeframe!r}")
        with path.open(newline="") as handle:
            items = [_item(exchange, symbol, timeframe, row) for row in csv.DictReader(handle)]
        if not items:
            raise RehearsalError(f"{path.name}: no candles")
        series.append(Series(str(path), symbol, timeframe, items))
    if not series:
        raise RehearsalError("no data files")
    if len({s.timeframe for s in series}) != 1 or len({s.symbol for s in series}) != len(series):
        raise RehearsalError("the files must be distinct symbols of one timeframe")
    return series


def _item(exchange: str, symbol: str, timeframe: str, row: dict[str, str]) -> dict[str, Any]:
    try:
        return {
            "exchange": exchange,
            "symbol": symbol,
            "timeframe": timeframe,
            "open_time_ms": int(row["timestamp_ms"]),
            **{k: float(row[k]) for k in ("open", "high", "low", "close", "volume")},
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise RehearsalError(f"{symbol}: bad CSV row {row!r}: {exc}") from exc


def ticks(series: list[Series]) -> list[list[dict[str, Any]]]:
    """Candles grouped by open time (one per symbol at most), in time order."""
    by_time: dict[int, list[dict[str, Any]]] = {}
    for s in series:
        for item in s.items:
            by_time.setdefault(item["open_time_ms"], []).append(item)
    return [by_time[t] for t in sorted(by_time)]


def clock_of(tick: list[dict[str, Any]]) -> datetime:
    """The candle clock after a tick: its close time (as the strategy's replay clock)."""
    item = tick[0]
    close_ms = item["open_time_ms"] + timeframe_ms(item["timeframe"])
    return datetime.fromtimestamp(close_ms / 1000, tz=UTC)


# --- setup --------------------------------------------------------------------------------


def rehearsal_users() -> dict[str, Any]:
    ensure_roles()
    users = {}
    for key, (username, role) in USERS.items():
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"first_name": "Rehearsal", "last_name": role}
        )
        if created:
            user.set_unusable_password()
            user.save()
        user.groups.add(Group.objects.get(name=role))
        users[key] = get_user_model().objects.get(pk=user.pk)  # fresh permission cache
    return users


def rehearsal_deployment(series: list[Series], options: Options) -> Deployment:
    return Deployment.objects.create(
        name="rehearsal",
        exchange="paper",
        symbols=[s.symbol for s in series],
        timeframe=series[0].timeframe,
        params={},
        full_order_notional=options.notional,
        starting_cash=options.cash,
        cash=options.cash,
        quote_currency=series[0].symbol.split("/")[-1],
    )


class Feed:
    """The files' candles, one candle time at a time, through the deployment's strategy:
    each candle becomes a replayed Candle and goes to its stream's ``StreamRunner``; all
    streams share one ``Account``, so a candle without an order decision costs no query.
    What they write (candles, signals, equity snapshots, position marks) is buffered and
    written before every order decision (by the runner) and before every monitor step
    (``flush``, with the streams' freshness on the candle clock), so that each of those
    reads the database as it would after every candle. The market alert detectors are
    not part of a rehearsal."""

    def __init__(self, deployment: Deployment, series: list[Series]) -> None:
        from trading.strategy import Account

        self.account = Account(deployment)
        self.series = series
        self.runners: dict[str, StreamRunner | None] = {}
        self.heard: dict[str, tuple[int, datetime]] = {}  # symbol -> last candle, to write
        self.written: set[str] = set()

    def tick(self, tick: list[dict[str, Any]], clock: datetime) -> bool:
        """Feed one candle time; True when an order decision was taken (the router may
        have written)."""
        from trading.strategy import StreamRunner, clock_of

        account = self.account
        decisions = account.decisions
        candles = [_candle(item, clock) for item in tick]
        account.candles.extend(candles)
        for candle in candles:
            self.heard[candle.symbol] = (candle.open_time_ms, clock)
            if candle.symbol not in self.runners:
                self.runners[candle.symbol] = StreamRunner.build(account, candle)
            runner = self.runners[candle.symbol]
            if runner is not None:
                runner.feed(candle, clock_of(candle, clock))
        return account.decisions != decisions

    def silent(self, tick: list[dict[str, Any]]) -> bool:
        """Some stream has no candle at this candle time."""
        return len(tick) < len(self.series)

    def flush(self, *, savepoint: bool = True) -> None:
        """The account's buffered rows and the streams' freshness, in one transaction
        (``savepoint=False``: in the caller's, without a savepoint)."""
        self.account.flush(also=self._streams_heard, savepoint=savepoint)
        self.heard = {}

    def _streams_heard(self) -> None:
        timeframe = self.series[0].timeframe
        exchange = self.series[0].items[0]["exchange"]
        for symbol, (open_ms, clock) in self.heard.items():
            fields = {"last_open_time_ms": open_ms, "last_received_at": clock}
            if symbol in self.written and _stream_heard(exchange, symbol, timeframe, **fields):
                continue
            MarketStream.objects.update_or_create(
                exchange=exchange, symbol=symbol, timeframe=timeframe, defaults=fields
            )
            self.written.add(symbol)


_STREAM_SQL = (
    f"UPDATE {MarketStream._meta.db_table} SET last_open_time_ms = %s, last_received_at = %s"
    " WHERE exchange = %s AND symbol = %s AND timeframe = %s"
)


def _stream_heard(
    exchange: str,
    symbol: str,
    timeframe: str,
    *,
    last_open_time_ms: int,
    last_received_at: datetime,
) -> int:
    """``MarketStream.objects.filter(...).update(...)`` with its SQL written once."""
    connection = transaction.get_connection()
    received = adapt_datetime(connection, last_received_at)
    with connection.cursor() as cursor:
        execute(cursor, _STREAM_SQL, [last_open_time_ms, received, exchange, symbol, timeframe])
        return cursor.rowcount


def _candle(item: dict[str, Any], clock: datetime) -> Candle:
    close_ms = item["open_time_ms"] + timeframe_ms(item["timeframe"]) - 1
    return _NEW_CANDLE(**item, close_time_ms=close_ms, source="replay", ingested_at=clock)


_NEW_CANDLE = NewRows(Candle)


def preflight(deployment: Deployment, actor: Any, clock: datetime) -> PreflightRun:
    """A verified backup, then the pre-flight checks that hold on history; the stored run
    is stamped onto the candle clock."""
    from .backup import backup_create
    from .preflight import preflight_run

    backup_create(actor=actor, note="rehearsal")
    run = preflight_run(actor=actor, deployment=deployment, names=PREFLIGHT_CHECKS)
    if run.pk is None:
        raise RehearsalError("the pre-flight run could not be stored")
    wall = {"started_at": run.started_at.isoformat(), "ended_at": run.ended_at.isoformat()}
    duration = run.ended_at - run.started_at
    PreflightRun.objects.filter(pk=run.pk).update(started_at=clock - duration, ended_at=clock)
    run.refresh_from_db()
    run.wall_clock = wall  # type: ignore[attr-defined]
    return run


def open_rollout(
    deployment: Deployment, users: dict[str, Any], options: Options, clock: datetime
) -> Rollout:
    rollout = services.rollout_create(
        deployment=deployment,
        name=f"rehearsal of {', '.join(deployment.symbols)} {deployment.timeframe}",
        plan=options.plan,
        thresholds=options.thresholds,
        rehearsal=True,
        actor="rehearsal",
        now=clock,
    )
    services.approval_record(
        rollout=rollout,
        role="alpha",
        actor=users["alpha"],
        evidence=EVIDENCE,
        comment="rehearsal approval",
        now=clock,
    )
    services.approval_record(
        rollout=rollout,
        role="planner",
        actor=users["planner"],
        evidence={"rehearsal": True},
        comment="rehearsal approval",
        now=clock,
    )
    return services.rollout_start(rollout=rollout, actor=users["ops"], now=clock)


# --- the run ------------------------------------------------------------------------------


class Cadence:
    """When the monitor steps: after a candle time at which its verdict may have changed,
    at the current phase's end, and at least every ``every_s`` of candle time (0: after
    every candle time), so that it acts at the very candle time a step after every one
    would. A step's inputs (the phase window's orders, equity marks and stream freshness;
    ``canary.metrics``) change only when

    - an order decision was taken (orders, fills, the router's equity marks),
    - a stream had no candle (its silence grows),
    - an equity mark deepened the window's drawdown; judged conservatively, without the
      order of the marks: the window's lowest mark at or below its highest by the phase's
      drawdown target (the target lies above the fail bound),

    and, mid-phase, only a FAIL acts (``canary.engine.decide``); at the phase's end a step
    always runs. Between those moments a step after every candle would find the same
    verdict and do nothing."""

    MARGIN = 1e-6  # the metric is rounded to 1e-6 %: stay on the safe side of it

    def __init__(self, rollout: Rollout, every_s: float) -> None:
        from .engine import Thresholds

        self.rollout = rollout
        self.every_s = every_s
        self.thresholds = Thresholds.from_dict(rollout.thresholds or {})
        self.last_step: datetime | None = None
        self.phase: tuple[int, datetime | None] | None = None
        self.ends_at: datetime | None = None
        self.ratio = 0.0
        self.low: float | None = None  # the drawdown window's lowest and highest marks
        self.high: float | None = None
        self.last_id = 0
        self.later: list[datetime] = []  # marks written, stamped after the last candle time
        self.armed = False

    def phase_changed(
        self, times: tuple[int, datetime | None, datetime | None] | None = None
    ) -> bool:
        """Re-read the current phase (after a step that acted; ``times``: its index, start
        and end as the step reported them, when it did). True when it is a new one: a new
        drawdown window, its marks from the last one at or before the phase start."""
        index, started, self.ends_at = times or _current_phase_times(self.rollout.pk)
        if (index, started) == self.phase:
            return False
        self.phase = (index, started)
        target = self.thresholds.target("drawdown_pct", max(index, 1))
        self.ratio = max(float(target), float(self.thresholds.drawdown_pct_fail)) / 100.0
        self.low = self.high = None
        self.last_id = 0
        self.armed = False
        if started is not None:
            self._marks_since(started)
        return True

    def _marks_since(self, started: datetime) -> None:
        marks = EquitySnapshot.objects.filter(deployment_id=self.rollout.deployment_id)
        base = marks.filter(ts__lte=started).aggregate(t=Max("ts"))["t"] or started
        window = marks.filter(ts__gte=base).aggregate(lo=Min("equity"), hi=Max("equity"))
        self._see(window["lo"], window["hi"])
        self.last_id = marks.aggregate(n=Max("id"))["n"] or 0

    def _see(self, low: float | None, high: float | None) -> None:
        if low is not None:
            self.low = low if self.low is None else min(self.low, low)
        if high is not None:
            self.high = high if self.high is None else max(self.high, high)
        if self.low is not None and self.high is not None and self.high > 0:
            self.armed = self.armed or self.low <= self.high * (1.0 + self.ratio + self.MARGIN)

    def marks(self, buffered: list[EquitySnapshot], written: bool, clock: datetime) -> bool:
        """Take in the equity marks of a candle time: the strategy's still buffered, and
        (``written``: the router may have written some) those written since the last.
        True when a mark entered the window at this candle time (a mark stamped after it,
        a fill's acknowledgement, enters at the next)."""
        entered = False
        for snap in buffered:
            self._see(snap.equity, snap.equity)
            entered = entered or snap.ts == clock
        if written:
            for pk, ts, equity in _marks_after(self.rollout.deployment_id, self.last_id):
                self._see(equity, equity)
                self.last_id = max(self.last_id, pk)
                self.later.append(ts)
        if any(ts <= clock for ts in self.later):
            entered = True
            self.later = [ts for ts in self.later if ts > clock]
        return entered

    def due(self, clock: datetime, *, decided: bool, silent: bool, marked: bool) -> bool:
        if decided or silent or (marked and self.armed):
            return True
        if self.ends_at is not None and clock >= self.ends_at:
            return True
        return self.last_step is None or (clock - self.last_step).total_seconds() >= self.every_s


def _marks_after(deployment_id: int, last_id: int) -> list[tuple[int, datetime, float]]:
    """``EquitySnapshot.objects.filter(deployment_id=..., pk__gt=last_id).values_list("pk",
    "ts", "equity")`` with its SQL written once, the times turned as the ORM turns them."""
    connection = transaction.get_connection()
    table = EquitySnapshot._meta.db_table

    def build() -> str:
        qn = connection.ops.quote_name
        return (
            f"SELECT {qn('id')}, {qn('ts')}, {qn('equity')} FROM {qn(table)}"
            f" WHERE {qn('deployment_id')} = %s AND {qn('id')} > %s"
        )

    with connection.cursor() as cursor:
        execute(
            cursor,
            sql_once(connection, ("cadence_marks",), build),
            [deployment_id, last_id],
        )
        rows = cursor.fetchall()
    ts_of = from_db(connection, EquitySnapshot._meta.get_field("ts"))
    return [(pk, ts_of(ts), equity) for pk, ts, equity in rows]


def _current_phase_times(rollout_id: int) -> tuple[int, datetime | None, datetime | None]:
    """(index, started_at, ends_at) of the rollout's current phase; (0, None, None) without
    one. SQL written once, the times turned as the ORM turns them."""
    connection = transaction.get_connection()

    def build() -> str:
        qn = connection.ops.quote_name
        return (
            f"SELECT p.{qn('index')}, p.started_at, p.ends_at"
            f" FROM {qn(Phase._meta.db_table)} p INNER JOIN {qn(Rollout._meta.db_table)} r"
            f" ON r.id = p.rollout_id AND r.current_phase = p.{qn('index')}"
            " WHERE p.rollout_id = %s"
        )

    row = fetch_one(connection, ("cadence_phase",), build, [rollout_id])
    if row is None:
        return 0, None, None
    started, ends = (
        from_db(connection, Phase._meta.get_field(name))(value)
        for name, value in (("started_at", row[1]), ("ends_at", row[2]))
    )
    return row[0], started, ends


def run_rollout(
    rollout: Rollout, all_ticks: list[list[dict[str, Any]]], feed: Feed, options: Options
) -> Progress:
    progress = Progress()
    cadence = Cadence(rollout, options.monitor_every_s)
    cadence.phase_changed()
    cadence.last_step = rollout.started_at
    wall0, cpu0 = time.perf_counter(), time.process_time()
    clock0: datetime | None = None
    stepped = True
    for tick in all_ticks:
        clock = clock_of(tick)
        clock0 = clock0 or clock
        t0 = time.perf_counter()
        decided = feed.tick(tick, clock)
        progress.candles += len(tick)
        marked = cadence.marks(feed.account.snapshots, decided, clock)
        stepped = cadence.due(clock, decided=decided, silent=feed.silent(tick), marked=marked)
        progress.feed_s += time.perf_counter() - t0
        if stepped and _step(rollout, feed, cadence, progress, clock):
            break
        _pace(options.speed, wall0, clock0, clock)
    else:
        if not stepped:  # the data ran out between two steps: judge its last candle time
            _step(rollout, feed, cadence, progress, clock_of(all_ticks[-1]))
    progress.loop_s = time.perf_counter() - wall0
    progress.cpu_s = time.process_time() - cpu0
    return progress


def _step(
    rollout: Rollout, feed: Feed, cadence: Cadence, progress: Progress, clock: datetime
) -> bool:
    """The feed's buffered rows written, then one monitor step (two when it started a
    rollback, which runs in-process), in the step's transaction; True when the rehearsal
    stops there. The write counts as strategy time."""
    t0 = time.perf_counter()
    flushed = 0.0

    def flush() -> None:
        nonlocal flushed
        f0 = time.perf_counter()
        feed.flush(savepoint=False)
        flushed = time.perf_counter() - f0

    result = monitor_step(rollout_id=rollout.pk, now=clock, before=flush)
    _note(progress, result, clock)
    if result.state == RolloutState.ROLLING_BACK:
        result = monitor_step(rollout_id=rollout.pk, now=clock)  # the rollback ran in-process
        _note(progress, result, clock)
    progress.steps += 1
    progress.clock = clock
    cadence.last_step = clock
    acted = result.state not in STOP_STATES and result.action not in ("NONE", "")
    if acted and cadence.phase_changed(result.phase_times):
        feed.account.reload()  # a new allocation
    progress.feed_s += flushed
    progress.monitor_s += time.perf_counter() - t0 - flushed
    return result.state in STOP_STATES


def _note(progress: Progress, result: StepResult, clock: datetime) -> None:
    if result.action not in ("NONE", "") or result.error:
        progress.events.append({"at": clock.isoformat(), **result.to_dict()})


def _pace(speed: float | None, wall0: float, clock0: datetime | None, clock: datetime) -> None:
    if not speed or clock0 is None:
        return
    ahead = (clock - clock0).total_seconds() / speed - (time.perf_counter() - wall0)
    if ahead > 0:
        time.sleep(ahead)


def rehearse(options: Options, *, out: TextIO | None = None) -> dict[str, Any]:
    """Run a whole rehearsal in the current (throwaway) database; return the report."""
    from trading.signals import SignalParams

    exchange = getattr(settings, "TRADING_PAPER_MARKET_EXCHANGE", "paper")
    series = load_series(options.paths, exchange)
    users = rehearsal_users()
    deployment = rehearsal_deployment(series, options)
    all_ticks = ticks(series)
    warm = SignalParams().warmup + 1
    if len(all_ticks) <= warm:
        raise RehearsalError(f"{len(all_ticks)} candle times: more than {warm} needed")
    feed = Feed(deployment, series)
    feed.account.reload()
    for tick in all_ticks[:warm]:
        feed.tick(tick, clock_of(tick))
    feed.flush()
    clock = clock_of(all_ticks[warm - 1])
    _say(out, f"warm-up: {warm} candle times to {clock.isoformat()}")
    run = preflight(deployment, users["ops"], clock)
    _say(out, f"pre-flight: {run.decision}")
    if run.decision != "GO":
        return build_report(None, series, run, Progress(clock=clock), options)
    rollout = open_rollout(deployment, users, options, clock)
    _say(out, f"rollout {rollout.pk} started at {clock.isoformat()}")
    feed.account.reload()
    rest = all_ticks[warm:] if options.limit is None else all_ticks[warm : warm + options.limit]
    progress = run_rollout(rollout, rest, feed, options)
    rollout.refresh_from_db()
    _say(out, f"rollout {rollout.pk}: {rollout.state} at {progress.clock}")
    return build_report(rollout, series, run, progress, options)


def _say(out: TextIO | None, text: str) -> None:
    if out is not None:
        out.write(text + "\n")


# --- report -------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def equity_at(deployment: Deployment, when: datetime) -> float:
    """Equity as last marked at or before ``when`` (starting cash before any mark)."""
    value = (
        EquitySnapshot.objects.filter(deployment=deployment, ts__lte=when)
        .order_by("-ts", "-id")
        .values_list("equity", flat=True)
        .first()
    )
    return float(value) if value is not None else float(deployment.starting_cash)


def phase_orders(deployment: Deployment, start: datetime, end: datetime) -> int:
    """Orders submitted in the phase, (start, end] as the monitor's window, the rollback's
    flatten orders excluded."""
    return (
        Order.objects.filter(deployment=deployment, submitted_at__gt=start, submitted_at__lte=end)
        .exclude(purpose="flatten")
        .count()
    )


def phase_report(phase: Phase, deployment: Deployment, end_clock: datetime) -> dict:
    start = phase.started_at or end_clock
    end = phase.ended_at or end_clock
    evaluations = phase.evaluations.order_by("evaluated_at", "id")
    counts = dict(evaluations.values_list("verdict").annotate(n=Count("id")).order_by())
    final = evaluations.last()
    equity_start, equity_end = equity_at(deployment, start), equity_at(deployment, end)
    return {
        "index": phase.index,
        "allocation": phase.allocation,
        "started_at": _iso(start),
        "ended_at": _iso(phase.ended_at),
        "duration_s": (end - start).total_seconds(),
        "extensions": phase.extensions,
        "outcome": phase.outcome,
        "evaluations": sum(counts.values()),
        "verdicts": counts,
        "last_verdict": final.verdict if final else None,
        "last_reasons": final.reasons if final else [],
        "metrics": final.metrics if final else None,
        "orders": phase_orders(deployment, start, end),
        "equity_start": equity_start,
        "equity_end": equity_end,
        "pnl": equity_end - equity_start,
    }


def rollback_report(rollout: Rollout) -> dict[str, Any] | None:
    rollback = Rollback.objects.filter(rollout=rollout).order_by("started_at", "id").first()
    if rollback is None:
        return None
    phase = rollout.phases.filter(outcome="ROLLED_BACK").first()
    return {
        "id": rollback.pk,
        "at": _iso(phase.ended_at if phase else None),
        "phase": phase.index if phase else None,
        "trigger": rollback.trigger,
        "cause": rollback.cause,
        "reasons": rollback.reasons,
        "state": rollback.state,
        "flatten_orders": Order.objects.filter(
            deployment_id=rollout.deployment_id, purpose="flatten"
        ).count(),
        "pnl_impact": (rollback.report or {}).get("pnl"),
    }


def build_report(
    rollout: Rollout | None,
    series: list[Series],
    run: PreflightRun,
    progress: Progress,
    options: Options,
) -> dict[str, Any]:
    end_clock = progress.clock or run.ended_at
    report: dict[str, Any] = {
        "data": [
            {
                "file": Path(s.path).name,
                "symbol": s.symbol,
                "timeframe": s.timeframe,
                "candles": len(s.items),
            }
            for s in series
        ],
        "database": str(settings.DATABASES["default"]["NAME"]),
        "preflight": {
            "id": run.pk,
            "decision": run.decision,
            "at": _iso(run.ended_at),
            "wall_clock": getattr(run, "wall_clock", None),
            "checks": [{"name": c.get("name"), "status": c.get("status")} for c in run.checks],
            "skipped": PREFLIGHT_SKIPPED,
        },
        "rollout": None,
        "phases": [],
        "rollback": None,
        "events": progress.events,
        "speed": {
            "candles": progress.candles,
            "monitor_steps": progress.steps,
            "seconds": round(progress.loop_s, 3),
            "cpu_s": round(progress.cpu_s, 3),
            "strategy_s": round(progress.feed_s, 3),
            "monitor_s": round(progress.monitor_s, 3),
            "candles_per_s": round(progress.candles / progress.loop_s, 1)
            if progress.loop_s
            else None,
            "pace": options.speed or "max",
        },
    }
    if rollout is None:
        return report
    phases = list(rollout.phases.order_by("index"))
    report["rollout"] = {
        **services.rollout_summary(rollout),
        "clock_end": _iso(end_clock),
        "approvals": [
            {
                "role": a.role,
                "user": a.user.get_username(),
                "rehearsal": a.user.first_name == "Rehearsal",
            }
            for a in rollout.approvals.select_related("user").order_by("id")
        ],
    }
    report["phases"] = [phase_report(p, rollout.deployment, end_clock) for p in phases]
    report["rollback"] = rollback_report(rollout)
    return report


def report_table(report: dict[str, Any]) -> str:
    """The report's human table."""
    lines = []
    rollout = report.get("rollout")
    pre = report["preflight"]
    lines.append(
        f"pre-flight {pre['decision']} at {pre['at']} ({', '.join(c['name'] for c in pre['checks'])})"
    )
    if rollout:
        lines.append(
            f"rollout {rollout['id']} {rollout['name']}: {rollout['state']} at {rollout['clock_end']}"
        )
    header = f"{'phase':>5} {'alloc':>6} {'started (candle clock)':<26} {'hours':>6} {'ext':>4} {'orders':>7} {'pnl':>11} {'verdicts':<44} outcome"
    lines.append(header)
    lines.append("-" * len(header))
    for p in report["phases"]:
        verdicts = " ".join(f"{k}:{v}" for k, v in sorted(p["verdicts"].items()))
        lines.append(
            f"{p['index']:>5} {p['allocation']:>6.0%} {p['started_at']:<26} {p['duration_s'] / 3600:>6.2f} "
            f"{p['extensions']:>4} {p['orders']:>7} {p['pnl']:>+11.6f} {verdicts:<44} {p['outcome'] or '-'}"
        )
        metrics = p["metrics"] or {}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in metrics.items() if v is not None)
        lines.append(f"{'':>5} last {p['last_verdict']}: {shown}")
        for reason in p["last_reasons"]:
            lines.append(f"{'':>7}- {reason}")
    rb = report.get("rollback")
    if rb:
        lines.append(
            f"ROLLBACK at {rb['at']} in phase {rb['phase']} ({rb['trigger']}): {rb['cause']} [{rb['state']}]"
        )
    speed = report["speed"]
    lines.append(
        f"{speed['candles']} candles, {speed['monitor_steps']} monitor steps in {speed['seconds']} s "
        f"({speed['candles_per_s']} candles/s; CPU {speed['cpu_s']} s)"
    )
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
