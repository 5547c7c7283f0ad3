"""Writes of the alerts app: candle processing, raised alerts, deliveries, operator actions.

Each service is one transaction that writes its audit record; network I/O (WebSocket
push, email, webhook) happens after commit, in the worker, one Celery task per queued
delivery.
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import (
    DatabaseError,
    IntegrityError,
    close_old_connections,
    connection,
    transaction,
)
from django.db.models import Count, Exists, OuterRef, Q
from django.utils import timezone

from audit.services import audit_record
from trading.models import Candle
from trading.rows import insert_rows

from . import presence, selectors
from .detectors import Candle as PureCandle
from .detectors import Detection, Detector, LiveRunner
from .models import (
    Alert,
    AlertComment,
    AlertRule,
    AlertSubscription,
    Channel,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Severity,
    Silence,
)
from .rules import (
    SEVERITIES,
    Decision,
    RateLimiter,
    RuleSpec,
    SilenceSpec,
    candle_dedupe_key,
    decide,
    queue_has_room,
    rate_key,
    rate_limit_for,
)
from .transports import Outgoing, TransportError, get_transport
from .transports.webhook import recipient_label
from .transports.websocket import WebSocketTransport

log = logging.getLogger(__name__)

__all__ = ["alert_raise", "candles_process", "deliveries_sweep", "delivery_send"]

QUEUED_CHANNELS = (Channel.EMAIL, Channel.WEBHOOK)
WAITING = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING, DeliveryStatus.SENDING)
_WAITING_COUNTS = selectors.Prepared(
    lambda: (
        Delivery.objects.filter(channel__in=QUEUED_CHANNELS, status__in=WAITING)
        .order_by()
        .values("channel")
        .annotate(n=Count("pk"))
        .values_list("n")
    )
)
HANDLE = "audit.handle_alerts"
MANAGE_RULES = "audit.manage_rules"


def _ms_to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _now_ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


# --------------------------------------------------------------------------- fan-out context


@dataclass
class _Fanout:
    """Who gets what, loaded once per transaction, and what was queued or overflowed."""

    now: datetime
    silences: list[SilenceSpec]
    recipients: list[selectors.Recipient]
    webhooks: list[str]
    pending: int
    limit: int
    connections: list[presence.Connection]
    """Open WebSocket connections, from which the WebSocket rows are made."""
    queued: list[int] = field(default_factory=list)
    overflowed: int = 0
    limiter: RateLimiter = field(default_factory=RateLimiter)
    """Last passed event per rate key, read once from the database then kept here."""
    audits: list[dict[str, Any]] = field(default_factory=list)
    delivered: list[Alert] = field(default_factory=list)
    websocket_rows: int = 0

    @classmethod
    def load(cls) -> _Fanout:
        now = timezone.now()
        silences, recipients, waiting = selectors.rows_together(
            (selectors.SILENCES, {"now": now}),
            (selectors.RECIPIENTS, {}),
            (_WAITING_COUNTS, {}),
        )
        return cls(
            now=now,
            silences=selectors.silence_specs(silences),
            recipients=selectors.recipients_of(recipients),
            webhooks=[recipient_label(i) for i in range(len(settings.ALERTS_WEBHOOK_URLS))],
            pending=sum(n for (n,) in waiting),
            limit=settings.ALERTS_PENDING_LIMIT,
            connections=presence.live_connections(),
        )

    def admit(self) -> bool:
        if queue_has_room(self.pending, self.limit):
            self.pending += 1
            return True
        self.overflowed += 1
        return False


def _delivery_rows(alert: Alert, fan: _Fanout) -> list[Delivery]:
    """One email per address whose filters match (two accounts may share an address: the
    first one's row; a delivery is unique per alert, channel and recipient), then the
    webhooks."""
    rows, addresses = [], set()
    for r in fan.recipients:
        if r.email.lower() in addresses or not r.filters.matches(
            symbol=alert.symbol, detector=alert.detector, severity=alert.severity
        ):
            continue
        addresses.add(r.email.lower())
        rows.append(
            Delivery(alert=alert, channel=Channel.EMAIL, recipient=r.email, user_id=r.user_id)
        )
    rows += [Delivery(alert=alert, channel=Channel.WEBHOOK, recipient=w) for w in fan.webhooks]
    for row in rows:
        row.created_at = fan.now
        if not fan.admit():
            row.status = DeliveryStatus.OVERFLOW
            row.error = f"pending queue full ({fan.limit} undelivered)"
    return rows


def _queue_deliveries(alerts: list[Alert], fan: _Fanout) -> None:
    """The delivered alerts' rows, in the alerts' transaction: queued ones (email,
    webhook) in one INSERT, WebSocket ones (pending until the broadcast) in another."""
    if not alerts:
        return
    rows = insert_rows([row for a in alerts for row in _delivery_rows(a, fan)])
    fan.queued += [r.pk for r in rows if r.status == DeliveryStatus.PENDING]
    fan.websocket_rows += _websocket_rows(alerts, fan)
    fan.delivered += alerts


def _websocket_rows(alerts: list[Alert], fan: _Fanout) -> int:
    """One row per alert and connected, active user whose filters match."""
    by_users: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for alert in alerts:
        users = {
            c.user_id
            for c in fan.connections
            if c.filters.matches(
                symbol=alert.symbol, detector=alert.detector, severity=alert.severity
            )
        }
        if users:
            by_users[tuple(sorted(users))].append(alert.pk)
    return sum(_insert_websocket_rows(ids, users, fan.now) for users, ids in by_users.items())


def _insert_websocket_rows(alert_ids: list[int], user_ids: tuple[int, ...], now: datetime) -> int:
    """One INSERT ... SELECT for these alerts and users (those still active): the ORM's
    bulk_create costs about 0.1 ms of CPU per row, and there is a row per subscriber."""
    quote = connection.ops.quote_name
    alerts_where, alerts_params = _ids_sql("id", alert_ids, table="a")
    users_where, users_params = _ids_sql("id", list(user_ids), table="u")
    sql = (
        f"INSERT INTO {quote(Delivery._meta.db_table)}"
        " (alert_id, channel, recipient, user_id, status, attempts, error, created_at)"
        " SELECT a.id, %s, 'user:' || CAST(u.id AS VARCHAR(20)), u.id, %s, 0, '', %s"
        f" FROM {quote(Alert._meta.db_table)} a CROSS JOIN {quote(User._meta.db_table)} u"
        f" WHERE {alerts_where} AND {users_where} AND u.is_active"
    )
    created = connection.ops.adapt_datetimefield_value(now)
    params = [str(Channel.WEBSOCKET), str(DeliveryStatus.PENDING), created]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *alerts_params, *users_params])
        return max(cursor.rowcount, 0)


def _finish(fan: _Fanout, *, warn_overflow: bool = True) -> None:
    """Audit records last (the audit chain's lock is then held only until the commit
    that follows), side effects after commit: the WebSocket broadcast first, then the
    queued deliveries; an overflow raises its own warning alert."""
    for record in fan.audits:
        audit_record(**record)
    fan.audits.clear()
    if fan.overflowed and warn_overflow:
        _raise_overflow_warning(fan)
    delivered, queued, rows = list(fan.delivered), list(fan.queued), fan.websocket_rows
    if delivered:
        transaction.on_commit(lambda: _push(delivered, rows), robust=True)
    if queued:
        transaction.on_commit(lambda: _queue_after_commit(queued), robust=True)


def _queue_after_commit(delivery_ids: list[int]) -> None:
    from .tasks import deliver

    for pk in delivery_ids:
        deliver.delay(pk)


def _raise_overflow_warning(fan: _Fanout) -> None:
    minute = fan.now.strftime("%Y%m%dT%H%M")
    _raise(
        source="alerts",
        key=f"queue-overflow:{minute}",
        severity=Severity.WARNING,
        message=f"{fan.overflowed} deliveries overflowed the pending queue (limit {fan.limit})",
        payload={"overflowed": fan.overflowed, "limit": fan.limit},
        symbol="",
        warn_overflow=False,
    )


# --------------------------------------------------------------------------- recording alerts


@dataclass(frozen=True)
class _Event:
    fields: dict[str, Any]
    limit_s: float


def _last_passed(fan: _Fanout, key: str, event_ms: int) -> int | None:
    last = fan.limiter.last(key)
    if last is None or last >= event_ms:
        last = selectors.last_passed_event_ms(key, event_ms)
        if last is not None:
            fan.limiter.passed(key, last)
    return last


def _decide(event: _Event, fan: _Fanout) -> Decision:
    f = event.fields
    decision = decide(
        symbol=f["symbol"],
        detector=f["detector"],
        event_ms=f["event_ms"],
        last_passed_ms=_last_passed(fan, f["rate_key"], f["event_ms"]),
        limit_s=event.limit_s,
        silences=fan.silences,
        now_ms=_now_ms(fan.now),
    )
    if not decision.suppressed:
        fan.limiter.passed(f["rate_key"], f["event_ms"])
    return decision


def _new_alert(event: _Event, fan: _Fanout) -> Alert:
    decision = _decide(event, fan)
    return Alert(
        **event.fields,
        suppressed=decision.suppressed,
        decision=decision.code,
        suppressed_reason=decision.reason,
        silence_id=decision.silence_id,
    )


def _audit_alert(alert: Alert, fan: _Fanout) -> None:
    fan.audits.append(
        dict(
            action="alert.create",
            actor=alert.source,
            target=alert,
            payload={
                "detector": alert.detector,
                "symbol": alert.symbol,
                "direction": alert.direction,
                "value": alert.value,
                "candle_id": alert.candle_id,
                "decision": alert.decision,
                "reason": alert.suppressed_reason,
            },
        )
    )


def _record_alert(event: _Event, fan: _Fanout) -> Alert | None:
    """Create the alert with its rule decision; None when its dedupe key exists."""
    alert = _new_alert(event, fan)
    try:
        with transaction.atomic():
            alert.save(force_insert=True)
    except IntegrityError:
        return None
    _audit_alert(alert, fan)
    _queue_deliveries([] if alert.suppressed else [alert], fan)
    return alert


def _record_candle_alerts(events: list[_Event], fan: _Fanout, *, rerun: bool) -> list[Alert]:
    """Under the stream's lock nobody else records these candles' alerts, so unless the
    candles have alerts already (``rerun``: an earlier run's, their processing undone),
    no dedupe key can clash: the alerts are written in one INSERT and their deliveries in
    two, instead of a savepoint per alert."""
    if rerun:
        return [a for a in (_record_alert(e, fan) for e in events) if a is not None]
    alerts = insert_rows([_new_alert(e, fan) for e in events])
    for alert in alerts:
        _audit_alert(alert, fan)
    _queue_deliveries([a for a in alerts if not a.suppressed], fan)
    return alerts


def _message(det: Detection) -> str:
    if det.detector == "volatility" and det.value is not None:
        return f"log return {det.value:+.2f} sigma from the mean"
    if det.detector == "engulfing":
        return f"{'bullish' if det.direction == 'up' else 'bearish'} engulfing"
    value = "" if det.value is None else f" ({det.value:.6g})"
    return f"{det.detector} {det.direction}{value}"


def _candle_event(
    stream: dict[str, str], candle: _Pending, det: Detection, spec: RuleSpec, detected: datetime
) -> _Event:
    symbol, timeframe = stream["symbol"], stream["timeframe"]
    return _Event(
        fields={
            "candle_id": candle.pk,
            "source": "detector",
            "exchange": stream["exchange"],
            "symbol": symbol,
            "timeframe": timeframe,
            "detector": det.detector,
            "direction": det.direction,
            "value": det.value,
            "severity": spec.severity,
            "message": _message(det),
            "dedupe_key": candle_dedupe_key(candle.pk, det.detector),
            "rate_key": rate_key(symbol, timeframe, det.detector, det.direction),
            "event_ms": candle.open_time_ms,
            "candle_close_at": _ms_to_dt(candle.close_time_ms + 1),
            "ingested_at": candle.ingested_at,
            "detected_at": detected,
        },
        limit_s=rate_limit_for(spec, settings.ALERTS_RATE_LIMIT_S),
    )


# --------------------------------------------------------------------------- candle processing


PURE_FIELDS = ("open_time_ms", "open", "high", "low", "close", "volume")
STREAM_FIELDS = ("exchange", "symbol", "timeframe")
Stream = tuple[str, str, str]
"""(exchange, symbol, timeframe)"""
_STREAM_SAMPLES = {"exchange": ("x1", "x2"), "symbol": ("s1", "s2"), "timeframe": ("t1", "t2")}


@dataclass(frozen=True, slots=True)
class _Pending:
    """An unprocessed candle of the stream being processed, read as a row."""

    pk: int
    candle: PureCandle
    close_time_ms: int
    ingested_at: datetime
    alerted: bool
    """An earlier run recorded alerts for it (then undone): dedupe keys may clash."""

    @property
    def open_time_ms(self) -> int:
        return self.candle.open_time_ms


_PENDING = selectors.Prepared(
    lambda exchange, symbol, timeframe, limit: (
        Candle.objects.filter(
            exchange=exchange,
            symbol=symbol,
            timeframe=timeframe,
            processed_at__isnull=True,
            late=False,
        )
        .annotate(alerted=Exists(Alert.objects.filter(candle=OuterRef("pk"))))
        .order_by("open_time_ms")
        .values_list("pk", *PURE_FIELDS, "close_time_ms", "ingested_at", "alerted")[:limit]
    ),
    **_STREAM_SAMPLES,
)
_BEFORE = selectors.Prepared(
    lambda exchange, symbol, timeframe, first_ms, lookback: (
        Candle.objects.filter(
            exchange=exchange, symbol=symbol, timeframe=timeframe, open_time_ms__lt=first_ms
        )
        .order_by("-open_time_ms")
        .values_list("pk", *PURE_FIELDS)[:lookback]
    ),
    first_ms=(1, 2),
    **_STREAM_SAMPLES,
)
_BETWEEN = selectors.Prepared(
    lambda exchange, symbol, timeframe, first_ms, upto_ms: (
        Candle.objects.filter(
            exchange=exchange,
            symbol=symbol,
            timeframe=timeframe,
            open_time_ms__gte=first_ms,
            open_time_ms__lte=upto_ms,
        )
        .order_by("open_time_ms")
        .values_list("pk", *PURE_FIELDS)
    ),
    first_ms=(1, 2),
    upto_ms=(3, 4),
    **_STREAM_SAMPLES,
)


def _pending(stream: dict[str, str]) -> list[_Pending]:
    """The stream's unprocessed in-order candles, oldest first, ALERTS_PROCESS_BATCH at most."""
    return [
        _Pending(pk, PureCandle(*values), close_ms, ingested_at, bool(alerted))
        for pk, *values, close_ms, ingested_at, alerted in _PENDING.rows(
            **stream, limit=settings.ALERTS_PROCESS_BATCH
        )
    ]


def _ids_sql(column: str, ids: list[int], table: str = "") -> tuple[str, list[Any]]:
    """SQL for "column is one of these ids" (at least one): a single array parameter on
    PostgreSQL (one statement text whatever their number), one parameter per id elsewhere."""
    column = connection.ops.quote_name(column)
    if table:
        column = f"{table}.{column}"
    if connection.vendor == "postgresql":
        return f"{column} = ANY(%s)", [list(ids)]
    return f"{column} IN ({', '.join(['%s'] * len(ids))})", list(ids)


def _stream_candles(
    stream: dict[str, str], pending: list[_Pending], lookback: int
) -> list[tuple[int, PureCandle]]:
    """(id, candle) of the ``lookback`` stored candles before the first pending one and of
    every stored candle from it to the last pending one (late ones included), in
    open-time order; the history is read as tuples, not model instances."""
    first_ms, upto_ms = pending[0].open_time_ms, pending[-1].open_time_ms
    before = _BEFORE.rows(**stream, first_ms=first_ms, lookback=lookback)
    history = [(pk, PureCandle(*values)) for pk, *values in before[::-1]]
    if len(pending) == 1:
        return [*history, (pending[0].pk, pending[0].candle)]
    rest = _BETWEEN.rows(**stream, first_ms=first_ms, upto_ms=upto_ms)
    return history + [(pk, PureCandle(*values)) for pk, *values in rest]


def _detect(
    history: list[tuple[int, PureCandle]],
    pending: list[_Pending],
    detectors: list[Detector[Any, Any]],
) -> list[tuple[_Pending, Detection]]:
    runner = LiveRunner(detectors)
    wanted = {c.pk: c for c in pending}
    found = []
    for pk, candle in history:
        detections = runner.feed(candle)
        if pk in wanted:
            found += [(wanted[pk], d) for d in detections]
    return found


def _unprocessed_streams(candle_ids: list[int]) -> list[tuple[str, str, str]]:
    """(exchange, symbol, timeframe) of these candles' streams, those of late or processed
    candles left out, in order."""
    if not candle_ids:
        return []
    quote = connection.ops.quote_name
    where, params = _ids_sql("id", candle_ids)
    columns = ", ".join(map(quote, ("exchange", "symbol", "timeframe")))
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT DISTINCT {columns} FROM {quote(Candle._meta.db_table)} WHERE {where}"
            f" AND NOT {quote('late')} AND {quote('processed_at')} IS NULL ORDER BY {columns}",
            params,
        )
        return cursor.fetchall()


def _mark_processed(candle_ids: list[int], now: datetime) -> None:
    where, params = _ids_sql("id", candle_ids)
    table = connection.ops.quote_name(Candle._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET processed_at = %s WHERE {where}",
            [connection.ops.adapt_datetimefield_value(now), *params],
        )


def _lock_streams(streams: list[Stream]) -> None:
    """Serialise the processing of these streams: a PostgreSQL advisory lock each, for the
    transaction, taken in one statement in the order of their keys (so that two runs
    locking overlapping streams cannot wait on each other); SQLite's immediate
    transactions already serialise writers."""
    if connection.vendor != "postgresql" or not streams:
        return
    keys = sorted({zlib.crc32("alerts:{}:{}:{}".format(*s).encode()) for s in streams})
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_advisory_xact_lock(k))"
            " FROM (SELECT k FROM unnest(%s::bigint[]) AS u(k) ORDER BY k) AS ordered",
            [keys],
        )


def _stream_dict(stream: Stream) -> dict[str, str]:
    return dict(zip(STREAM_FIELDS, stream, strict=True))


def _stream_arrays(streams: list[Stream]) -> list[list[str]]:
    """The streams as three arrays (exchanges, symbols, timeframes) for unnest()."""
    return [[s[i] for s in streams] for i in range(3)]


_CANDLE_TABLE = Candle._meta.db_table
_SAME_STREAM = "c.exchange = s.exchange AND c.symbol = s.symbol AND c.timeframe = s.timeframe"
_PENDING_MANY_SQL = (
    f"SELECT p.exchange, p.symbol, p.timeframe, p.id, {', '.join(f'p.{f}' for f in PURE_FIELDS)},"
    " p.close_time_ms, p.ingested_at,"
    f" EXISTS (SELECT 1 FROM {Alert._meta.db_table} a WHERE a.candle_id = p.id)"
    " FROM (SELECT c.*, row_number() OVER ("
    "  PARTITION BY c.exchange, c.symbol, c.timeframe ORDER BY c.open_time_ms) AS n"
    f"  FROM {_CANDLE_TABLE} c"
    "  JOIN unnest(%s::varchar[], %s::varchar[], %s::varchar[]) AS s(exchange, symbol, timeframe)"
    f"  ON {_SAME_STREAM}"
    "  WHERE c.processed_at IS NULL AND NOT c.late) AS p"
    " WHERE p.n <= %s ORDER BY p.exchange, p.symbol, p.timeframe, p.open_time_ms"
)


def _pending_many(streams: list[Stream]) -> dict[Stream, list[_Pending]]:
    """Each stream's pending candles (as _pending): on PostgreSQL in one statement."""
    if not streams:
        return {}
    if connection.vendor != "postgresql":
        found = {s: _pending(_stream_dict(s)) for s in streams}
        return {s: rows for s, rows in found.items() if rows}
    by_stream: dict[Stream, list[_Pending]] = defaultdict(list)
    with connection.cursor() as cursor:
        cursor.execute(_PENDING_MANY_SQL, [*_stream_arrays(streams), settings.ALERTS_PROCESS_BATCH])
        for *stream, pk, t, o, h, lo, c, v, close_ms, ingested, alerted in cursor.fetchall():
            candle = PureCandle(t, o, h, lo, c, v)
            by_stream[tuple(stream)].append(_Pending(pk, candle, close_ms, ingested, bool(alerted)))
    return dict(by_stream)


_HISTORY_COLUMNS = f"c.id, {', '.join(f'c.{f}' for f in PURE_FIELDS)}"
_HISTORY_MANY_SQL = (
    f"SELECT s.i, {', '.join(f'h.{f}' for f in ('id', *PURE_FIELDS))}"
    " FROM unnest(%s::varchar[], %s::varchar[], %s::varchar[], %s::bigint[], %s::bigint[],"
    "  %s::int[]) WITH ORDINALITY AS s(exchange, symbol, timeframe, first_ms, upto_ms, lookback, i)"
    " CROSS JOIN LATERAL ("
    f"  (SELECT {_HISTORY_COLUMNS} FROM {_CANDLE_TABLE} c"
    f"   WHERE {_SAME_STREAM} AND c.open_time_ms < s.first_ms"
    "   ORDER BY c.open_time_ms DESC LIMIT s.lookback)"
    "  UNION ALL"
    f"  (SELECT {_HISTORY_COLUMNS} FROM {_CANDLE_TABLE} c"
    f"   WHERE {_SAME_STREAM} AND c.open_time_ms BETWEEN s.first_ms AND s.upto_ms)"
    " ) AS h"
)


def _histories(
    work: list[tuple[Stream, list[_Pending], int]],
) -> dict[Stream, list[tuple[int, PureCandle]]]:
    """Each stream's candles for its detectors (as _stream_candles, given its pending
    candles and lookback): on PostgreSQL in one statement."""
    if not work:
        return {}
    if connection.vendor != "postgresql":
        return {
            stream: _stream_candles(_stream_dict(stream), pending, back)
            for stream, pending, back in work
        }
    arrays = _stream_arrays([stream for stream, _, _ in work])
    arrays += [
        [pending[0].open_time_ms for _, pending, _ in work],
        [pending[-1].open_time_ms for _, pending, _ in work],
        [back for _, _, back in work],
    ]
    found: dict[int, list[tuple[int, PureCandle]]] = defaultdict(list)
    with connection.cursor() as cursor:
        cursor.execute(_HISTORY_MANY_SQL, arrays)
        for i, pk, *values in cursor.fetchall():
            found[i].append((pk, PureCandle(*values)))
    return {
        stream: sorted(found[i], key=lambda row: row[1].open_time_ms)
        for i, (stream, _, _) in enumerate(work, start=1)
    }


def _stream_alerts(
    stream: Stream,
    pending: list[_Pending],
    history: list[tuple[int, PureCandle]],
    specs: list[selectors.RuleSpec],
    detectors: list[Detector[Any, Any]],
) -> tuple[list[Alert], list[dict[str, Any]]]:
    """The stream's detections on its pending candles, recorded as alerts, and their audit
    records, left for the caller to write last (the audit chain's lock is then held only
    until the pass's commit, not while the pass's other streams are processed). Who gets
    what (silences, recipients, presence) is read only when there are detections: most
    candles have none. The writes are made in a savepoint, so that a failure undoes this
    stream's alone."""
    if not detectors:
        return [], []
    by_name = {spec.detector: spec for spec in specs}
    fields = _stream_dict(stream)
    hits = _detect(history, pending, detectors)
    events = [
        _candle_event(fields, c, det, by_name[det.detector], timezone.now()) for c, det in hits
    ]
    if not events:
        return [], []
    with transaction.atomic():
        fan = _Fanout.load()
        alerts = _record_candle_alerts(events, fan, rerun=any(c.alerted for c in pending))
        audits, fan.audits = fan.audits, []
        if alerts:
            _finish(fan)
    return alerts, audits


def streams_process(
    streams: list[Stream], rules: list[selectors.RuleSpec] | None = None
) -> tuple[list[Alert], Exception | None]:
    """Run each stream's detectors on all its unprocessed in-order candles, in open-time
    order, and record the alerts, for all these streams in one transaction: their locks,
    their pending candles and their history are each read in one statement on PostgreSQL
    and the processed candles marked in one, so that a pass over several streams costs
    about what one stream costs. Late candles are never processed. A backlog is taken in
    one go (ALERTS_PROCESS_BATCH candles a stream at most), so a busy worker catches up.

    A stream whose detection or recording fails is logged and left pending (its writes
    undone) without holding up the others; the first such error is returned with the
    alerts. A database error is raised at once. ``rules``: the usable rules, read once for
    several passes (default: read now)."""
    if not streams:
        return [], None
    if rules is None:
        rules = selectors.usable_rules()
    specs = {s: selectors.rules_for_stream(s[1], s[2], rules) for s in streams}
    alerts: list[Alert] = []
    failed: Exception | None = None
    with transaction.atomic():
        _lock_streams(streams)
        pending = _pending_many(streams)
        detectors = {s: [spec.build() for spec in specs[s]] for s in pending}
        histories = _histories(
            [
                (s, pending[s], max(d.lookback for d in detectors[s]))
                for s in pending
                if detectors[s]
            ]
        )
        done: list[int] = []
        audits: list[dict[str, Any]] = []
        for stream, candles in pending.items():
            try:
                found, records = _stream_alerts(
                    stream, candles, histories.get(stream, []), specs[stream], detectors[stream]
                )
            except DatabaseError:
                raise
            except Exception as exc:
                log.exception("stream %s:%s:%s not processed", *stream)
                failed = failed or exc
                continue
            alerts += found
            audits += records
            done += [c.pk for c in candles]
        if done:
            _mark_processed(done, timezone.now())
        for record in audits:
            audit_record(**record)
    return alerts, failed


def candles_process(*, candle_ids: Iterable[int]) -> list[Alert]:
    """Process the streams of these candles (streams_process), each in open-time order (a
    stream whose candles an earlier run took with its backlog is skipped); the first
    stream's failure is raised once the others are processed."""
    alerts, failed = streams_process(_unprocessed_streams(list(candle_ids)))
    if failed is not None:
        raise failed
    return alerts


# --------------------------------------------------------------------------- queueing

QUEUED_KEY = "alerts:candles:queued"
POKE_KEY = "alerts:candles:more"
# The flag's value while the run it stands for is queued and has not started: the first run
# to start takes it (writing its task id in its place); a run started later finds another
# run's id there and ends at once.
QUEUED = "1"
_queue_client: redis.Redis | None = None

# One round trip for a stored batch: take the flag (the caller then sends the run), or, if
# a run holds it already, leave that run a word that more candles are stored.
_FLAG_OR_POKE = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[1]) then return 1 end
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, 0)
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 0
"""
# A run's hold on the flag, taken or renewed before each pass: free, queued (QUEUED) or its
# own (its task id: a task redelivered after its worker died takes its flag back), it
# becomes the run's and the word of more candles is cleared; held by another run, it is
# left to that run (0).
_HOLD = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] and held ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""
# Let the flag go if it holds this value (a run lets go of its own hold, never another's).
_LET_GO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_scripts: dict[str, Any] = {}


def _queue_flags() -> redis.Redis:
    """The broker's Redis (the flag goes with the queue it stands for)."""
    global _queue_client
    if _queue_client is None:
        _queue_client = redis.Redis.from_url(
            settings.CELERY_BROKER_URL, socket_timeout=2, socket_connect_timeout=2
        )
    return _queue_client


def _script(source: str) -> Any:
    """A Lua script on the broker's Redis, registered once (run by its SHA)."""
    if source not in _scripts:
        _scripts[source] = _queue_flags().register_script(source)
    return _scripts[source]


def _take_flag_or_poke() -> bool:
    """True: the flag was free and is now taken (send a run)."""
    keys, ttl = [QUEUED_KEY, POKE_KEY], settings.ALERTS_QUEUED_FLAG_TTL_S
    return bool(_script(_FLAG_OR_POKE)(keys=keys, args=[ttl, QUEUED], client=_queue_flags()))


def _hold_flag(run_id: str) -> bool:
    """Take or renew the run's hold on the flag (_HOLD); False: another run holds it."""
    keys, ttl = [QUEUED_KEY, POKE_KEY], settings.ALERTS_QUEUED_FLAG_TTL_S
    return bool(_script(_HOLD)(keys=keys, args=[run_id, ttl, QUEUED], client=_queue_flags()))


def queue_run_anyway() -> None:
    """Send a processing run whatever holds the flag, which then stands for that run: a
    run handing over at its time limit, and a worker's start (a run killed with its flag
    held would otherwise hold off the next until the flag expires; a run still alive
    holding the flag takes it back before its next pass, and the run sent here then ends
    at once: one run goes on)."""
    from .tasks import process_candles

    _queue_flags().set(QUEUED_KEY, QUEUED, ex=settings.ALERTS_QUEUED_FLAG_TTL_S)
    try:
        process_candles.delay([], pending=True)
    except Exception:
        _clear_queued_flag()  # not left standing for a run that was not sent
        raise


def candles_queue(candle_ids: list[int]) -> None:
    """Queue the processing of newly stored candles (after their transaction commits).

    One processing run at a time: a Redis flag is set when a run is sent and held by that
    run while it works, and a batch stored meanwhile only tells it so (a list it waits on)
    instead of sending another. The run processes every stream with pending candles,
    again and again while candles keep coming, and lets the flag go once none came for
    ALERTS_RUN_LINGER_S (candles_process_pending). A feed posting hundreds of candles a
    second then costs one task, not one per request, and each stream's backlog is taken in
    one transaction. The flag expires after ALERTS_QUEUED_FLAG_TTL_S in case its run is
    lost; when Redis cannot be read the task is sent anyway, and when sending fails the
    flag is cleared so that the next candles send theirs."""
    from .tasks import process_candles

    try:
        first = _take_flag_or_poke()
    except redis.RedisError as err:
        log.warning("candle processing flag unreadable, queuing anyway: %s", err)
        first = True
    if not first:
        return
    try:
        process_candles.delay(candle_ids, pending=True)
    except Exception:
        _clear_queued_flag()
        raise


def _clear_queued_flag(holder: str = QUEUED) -> None:
    """Let the flag go if ``holder`` holds it (QUEUED: the run it was taken for was not
    sent)."""
    try:
        _script(_LET_GO)(keys=[QUEUED_KEY], args=[holder], client=_queue_flags())
    except redis.RedisError as err:
        log.warning("candle processing flag not cleared: %s", err)


_PENDING_STREAMS = selectors.Prepared(
    lambda: (
        Candle.objects.filter(processed_at__isnull=True, late=False)
        .order_by("exchange", "symbol", "timeframe")
        .values_list("exchange", "symbol", "timeframe")
        .distinct()
    )
)


def pending_streams() -> list[Stream]:
    """(exchange, symbol, timeframe) of every stream with unprocessed in-order candles, in
    order (a partial index holds just those candles)."""
    return [tuple(row) for row in _PENDING_STREAMS.rows()]


def _wait_for_more(flags: redis.Redis, linger_s: float) -> bool:
    """Up to ``linger_s`` for word of more candles; True when it came. Then what the worker
    does before each task (config.celery), since a run lasts as long as several: a
    connection the database dropped during the wait is replaced before the next read
    instead of failing it (not inside a transaction: a run made in one keeps its own)."""
    if linger_s <= 0:
        return False
    woken = bool(flags.blpop([POKE_KEY], timeout=linger_s))
    if not connection.in_atomic_block:
        close_old_connections()
    return woken


def _another_pass(flags: redis.Redis, found: bool, not_before: float, linger_s: float) -> bool:
    """Whether the run makes another pass: after one that ``found`` candles, yes, once the
    monotonic clock reaches ``not_before`` (at once when run eagerly, ``linger_s`` 0);
    otherwise when word of more came while it waited (_wait_for_more)."""
    if found:
        if linger_s > 0:
            time.sleep(max(0.0, not_before - time.monotonic()))
        return True
    return _wait_for_more(flags, linger_s)


def candles_process_pending(
    linger_s: float | None = None,
    max_s: float | None = None,
    pass_s: float | None = None,
    run_id: str | None = None,
) -> list[Alert]:
    """The run queued by candles_queue, holding its flag (under ``run_id``, its task's id):
    process every stream with pending candles, then wait up to ``linger_s``
    (ALERTS_RUN_LINGER_S) for word of more and process again, for as long as they keep
    coming. Once none came for that long, it lets the flag go and looks once more: candles
    whose batch saw the flag held before it was let go are visible to that look, and are
    taken (with the flag taken back) unless a new run was sent for them meanwhile. After
    ``max_s`` (ALERTS_RUN_MAX_S) of candles it sends a new run to carry on, so that no task
    outlives its time limit. While candles keep coming it starts a pass at most every
    ``pass_s`` (ALERTS_RUN_PASS_S), so that a pass takes the candles of several streams
    together (streams_process); the first candles after a quiet spell are taken at once.
    Run eagerly (``linger_s`` 0) it neither waits nor paces.

    One run at a time: a run that finds the flag held by another (a run sent at a worker's
    start while one was still going, queue_run_anyway) ends at once, leaving the candles to
    that one, which would otherwise find them too, both going on, each handing over to a
    new run, for as long as candles keep coming.

    A stream whose processing fails is logged and left pending (the next run takes it
    again) without holding up the other streams; the run then ends, failing with the first
    such error. A database error ends it at once, letting the flag go. Without Redis the
    run processes what is pending once and ends."""
    linger_s = settings.ALERTS_RUN_LINGER_S if linger_s is None else linger_s
    max_s = settings.ALERTS_RUN_MAX_S if max_s is None else max_s
    pass_s = settings.ALERTS_RUN_PASS_S if pass_s is None else pass_s
    run_id = run_id or uuid.uuid4().hex
    ttl = settings.ALERTS_QUEUED_FLAG_TTL_S
    flags = _queue_flags()
    deadline = time.monotonic() + max_s
    alerts: list[Alert] = []
    failed: Exception | None = None
    hand_over = False
    try:
        while True:
            started = time.monotonic()
            try:
                held = _hold_flag(run_id)
            except redis.RedisError as err:
                log.warning("candle processing flag unreachable: %s", err)
                held = None
            if held is False:
                return alerts  # another run holds the flag and takes these candles
            streams = pending_streams()
            done, failed = streams_process(streams)
            alerts += done
            if failed is not None:
                break
            if not held:
                return alerts
            if time.monotonic() >= deadline and streams:
                hand_over = True
                break
            if _another_pass(flags, bool(streams), started + pass_s, linger_s):
                continue
            _clear_queued_flag(run_id)
            if not pending_streams() or not flags.set(QUEUED_KEY, run_id, nx=True, ex=ttl):
                return alerts
    except redis.RedisError as err:
        log.warning("candle processing flag unreachable, run ends: %s", err)
        _clear_queued_flag(run_id)
        return alerts
    except DatabaseError:
        _clear_queued_flag(run_id)
        raise
    if hand_over:  # a new run carries on, the flag held for it, queued
        queue_run_anyway()
        return alerts
    _clear_queued_flag(run_id)
    raise failed


# --------------------------------------------------------------------------- raised alerts


def _raise(
    *,
    source: str,
    key: str,
    severity: str,
    message: str,
    payload: dict | None,
    symbol: str,
    warn_overflow: bool = True,
) -> Alert:
    dedupe_key = f"{source}:{key}"[:200]
    existing = Alert.objects.filter(dedupe_key=dedupe_key).first()
    if existing is not None:
        return existing
    now = timezone.now()
    limit_s = 0.0 if severity == Severity.CRITICAL else settings.ALERTS_RATE_LIMIT_S
    event = _Event(
        fields={
            "source": source[:40],
            "symbol": symbol[:40],
            "detector": source[:40],
            "severity": severity,
            "message": message[:300],
            "payload": dict(payload or {}, key=key),
            "dedupe_key": dedupe_key,
            "rate_key": rate_key(symbol, "", source, ""),
            "event_ms": _now_ms(now),
            "detected_at": now,
        },
        limit_s=limit_s,
    )
    with transaction.atomic():
        fan = _Fanout.load()
        alert = _record_alert(event, fan)
        if alert is None:
            return Alert.objects.get(dedupe_key=dedupe_key)
        _finish(fan, warn_overflow=warn_overflow)
    return alert


def alert_raise(
    *,
    source: str,
    key: str,
    severity: str = "",
    message: str,
    payload: dict | None = None,
    symbol: str = "",
) -> Alert:
    """Raise a non-candle alert (canary verdicts, watchdogs, queue overflow).

    Deduplicated by (source, key): raising the same key again returns the first alert and
    delivers nothing. Goes through the same silences, rate limit (critical alerts are never
    rate limited) and deliveries as detector alerts. ``severity`` defaults to critical for
    source "canary" and warning otherwise. Joins the caller's transaction; deliveries start
    after it commits.
    """
    if not severity:
        severity = Severity.CRITICAL if source == "canary" else Severity.WARNING
    if severity not in SEVERITIES:
        raise ValueError(f"severity: must be one of {list(SEVERITIES)}")
    if not source or not key:
        raise ValueError("source and key are required")
    return _raise(
        source=source, key=key, severity=severity, message=message, payload=payload, symbol=symbol
    )


# --------------------------------------------------------------------------- delivery


def _push(alerts: list[Alert], expected_rows: int) -> int:
    """Broadcast alerts committed with their pending WebSocket rows, then mark those rows
    sent (or failed) in one statement, with one audit record for the broadcast. A worker
    lost in between leaves them pending: never recorded as received."""
    t0 = time.perf_counter()
    error: TransportError | None = None
    try:
        listeners = WebSocketTransport().broadcast([a.as_message() for a in alerts])
        if expected_rows and not listeners:
            error = TransportError("no web process is subscribed to the alert broadcast")
    except TransportError as err:
        error = err
    latency_ms = (time.perf_counter() - t0) * 1000
    alert_ids = [a.pk for a in alerts]
    with transaction.atomic():
        count = _mark_websocket_rows(alert_ids, error, timezone.now())
        _record_websocket(count, latency_ms, error, alert_ids)
    return count


def _mark_websocket_rows(alert_ids: list[int], error: TransportError | None, now: datetime) -> int:
    """The alerts' pending WebSocket rows marked sent (or failed), in one UPDATE."""
    quote = connection.ops.quote_name
    where, ids = _ids_sql("alert_id", alert_ids)
    stamp = connection.ops.adapt_datetimefield_value(now)
    values = [
        str(DeliveryStatus.FAILED if error else DeliveryStatus.SENT),
        error.message[:500] if error else "",
        stamp,
        None if error else stamp,
    ]
    sql = (
        f"UPDATE {quote(Delivery._meta.db_table)} SET {quote('status')} = %s,"
        f" {quote('error')} = %s, {quote('attempts')} = 1, {quote('claimed_at')} = %s,"
        f" {quote('sent_at')} = %s WHERE {where} AND {quote('channel')} = %s"
        f" AND {quote('status')} = %s"
    )
    params = [*values, *ids, str(Channel.WEBSOCKET), str(DeliveryStatus.PENDING)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return max(cursor.rowcount, 0)


def _record_websocket(
    count: int, latency_ms: float, error: TransportError | None, alert_ids: list[int]
) -> None:
    """The broadcast is one try for all its rows: its outcome and latency are recorded on
    the rows and in one audit record, not as one DeliveryAttempt per row."""
    status = DeliveryStatus.FAILED if error else DeliveryStatus.SENT
    audit_record(
        action=f"alerts.websocket_{status}",
        actor="alerts",
        target_type="alerts.Alert",
        target_id=",".join(map(str, alert_ids))[:100],
        payload={
            "alerts": alert_ids,
            "deliveries": count,
            "latency_ms": round(latency_ms, 2),
            "error": error.message if error else "",
        },
    )


@dataclass(frozen=True)
class SendOutcome:
    status: str
    retry_in: float | None = None


RETRY_DUE_SLACK_S = 1.0
"""A retry may be claimed this early: its countdown task fires at or after next_attempt_at,
read on another worker's clock."""


_DELIVERY_FIELDS = Delivery._meta.concrete_fields
_ALERT_FIELDS = Alert._meta.concrete_fields
_DELIVERY_WITH_ALERT = selectors.Prepared(
    lambda pk: Delivery.objects.filter(pk=pk).values_list(
        *(f.name for f in _DELIVERY_FIELDS), *(f"alert__{f.name}" for f in _ALERT_FIELDS)
    ),
    pk=(1, 2),
)


def _delivery_with_alert(delivery_id: int) -> Delivery:
    """The delivery with its alert, as select_related would read them."""
    [row] = _DELIVERY_WITH_ALERT.rows(pk=delivery_id)
    split = len(_DELIVERY_FIELDS)
    delivery = Delivery.from_db("default", [f.attname for f in _DELIVERY_FIELDS], row[:split])
    delivery.alert = Alert.from_db("default", [f.attname for f in _ALERT_FIELDS], row[split:])
    return delivery


def _claim(delivery_id: int) -> Delivery | None:
    """The one place that decides whether a delivery is sent now: pending, a retry that is
    due, or sending but claimed longer than ALERTS_CLAIM_STALE_S ago (its worker died).
    Its task may run more than once (the sweeper re-queues lost ones): only one claims."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.ALERTS_CLAIM_STALE_S)
    due = now + timedelta(seconds=RETRY_DUE_SLACK_S)
    stamp = connection.ops.adapt_datetimefield_value
    sql = (
        f"UPDATE {connection.ops.quote_name(Delivery._meta.db_table)}"
        " SET status = %s, claimed_at = %s, attempts = attempts + 1"
        " WHERE id = %s AND NOT (channel = %s) AND (status = %s"
        " OR (status = %s AND (next_attempt_at IS NULL OR next_attempt_at <= %s))"
        " OR (status = %s AND claimed_at < %s))"
    )
    params = [
        str(DeliveryStatus.SENDING),
        stamp(now),
        delivery_id,
        str(Channel.WEBSOCKET),
        str(DeliveryStatus.PENDING),
        str(DeliveryStatus.RETRYING),
        stamp(due),
        str(DeliveryStatus.SENDING),
        stamp(stale),
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        claimed = cursor.rowcount
    if not claimed:
        return None
    return _delivery_with_alert(delivery_id)


def backoff_s(attempt: int) -> float:
    base, cap = settings.ALERTS_RETRY_BASE_S, settings.ALERTS_RETRY_MAX_S
    return float(min(cap, base * 2 ** (attempt - 1)))


def delivery_send(*, delivery_id: int) -> SendOutcome:
    """Claim one queued delivery, send it (outside any transaction), record the attempt.
    Transient failures come back with ``retry_in`` until ALERTS_MAX_ATTEMPTS."""
    delivery = _claim(delivery_id)
    if delivery is None:
        return SendOutcome("skipped")
    outgoing = Outgoing(delivery.pk, delivery.recipient, delivery.alert.as_message())
    started = timezone.now()
    t0 = time.perf_counter()
    error: TransportError | None = None
    try:
        get_transport(delivery.channel).send(outgoing)
    except TransportError as err:
        error = err
    return _record_attempt(delivery, started, (time.perf_counter() - t0) * 1000, error)


def _record_attempt(
    delivery: Delivery, started: datetime, latency_ms: float, error: TransportError | None
) -> SendOutcome:
    finished = timezone.now()
    retry_in = None
    if error is None:
        status = DeliveryStatus.SENT
    elif error.permanent or delivery.attempts >= settings.ALERTS_MAX_ATTEMPTS:
        status = DeliveryStatus.FAILED
    else:
        status, retry_in = DeliveryStatus.RETRYING, backoff_s(delivery.attempts)
    message = error.message[:500] if error else ""
    with transaction.atomic():
        insert_rows(
            [
                DeliveryAttempt(
                    delivery=delivery,
                    number=delivery.attempts,
                    started_at=started,
                    finished_at=finished,
                    ok=error is None,
                    permanent=bool(error and error.permanent),
                    error=message,
                    latency_ms=latency_ms,
                )
            ]
        )
        _mark_attempted(
            delivery.pk,
            status=status,
            error=message,
            sent_at=finished if error is None else None,
            next_attempt_at=None if retry_in is None else finished + timedelta(seconds=retry_in),
        )
        if status != DeliveryStatus.RETRYING:
            audit_record(
                action=f"delivery.{status}",
                actor="alerts",
                target=delivery,
                payload={
                    "alert_id": delivery.alert_id,
                    "channel": delivery.channel,
                    "attempts": delivery.attempts,
                    "error": message,
                },
            )
    return SendOutcome(status, retry_in)


def _mark_attempted(
    delivery_id: int,
    *,
    status: str,
    error: str,
    sent_at: datetime | None,
    next_attempt_at: datetime | None,
) -> None:
    stamp = connection.ops.adapt_datetimefield_value
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {connection.ops.quote_name(Delivery._meta.db_table)} SET status = %s,"
            " error = %s, sent_at = %s, next_attempt_at = %s WHERE id = %s",
            [str(status), error, stamp(sent_at), stamp(next_attempt_at), delivery_id],
        )


def _lost(now: datetime) -> Q:
    """Deliveries whose alerts.deliver message may be lost (Redis restarted without
    persistence, or the worker holding it died: an acks_late message comes back only after
    the broker's visibility timeout), not re-queued in the last ALERTS_SWEEP_AFTER_S."""
    after = now - timedelta(seconds=settings.ALERTS_SWEEP_AFTER_S)
    stale = now - timedelta(seconds=settings.ALERTS_CLAIM_STALE_S)
    lost = (
        Q(status=DeliveryStatus.PENDING, created_at__lte=after)
        | Q(status=DeliveryStatus.RETRYING, next_attempt_at__lte=after)
        | Q(status=DeliveryStatus.RETRYING, next_attempt_at__isnull=True, claimed_at__lte=after)
        | Q(status=DeliveryStatus.SENDING, claimed_at__lt=stale)
    )
    return lost & (Q(requeued_at__isnull=True) | Q(requeued_at__lte=after))


def deliveries_sweep(*, now: datetime | None = None, limit: int | None = None) -> list[int]:
    """Queue again (after commit) the oldest ``limit`` (ALERTS_SWEEP_BATCH) email and webhook
    deliveries that are pending for ALERTS_SWEEP_AFTER_S, retrying and as long overdue, or
    sending and stale; each at most once per ALERTS_SWEEP_AFTER_S. It only queues: a task
    whose delivery is no longer claimable (sent, or claimed meanwhile) skips it, so a
    re-queued delivery whose first message was not lost after all is still sent once.
    Rows another sweep holds are skipped, not waited for. Returns the ids queued."""
    now = now or timezone.now()
    limit = limit or settings.ALERTS_SWEEP_BATCH
    with transaction.atomic():
        rows = (
            Delivery.objects.select_for_update(skip_locked=True)
            .filter(channel__in=QUEUED_CHANNELS, status__in=WAITING)
            .filter(_lost(now))
            .order_by("created_at", "pk")
        )
        found = list(rows.values_list("pk", "status")[:limit])
        if not found:
            return []
        ids = [pk for pk, _ in found]
        Delivery.objects.filter(pk__in=ids).update(requeued_at=now)
        audit_record(
            action="delivery.requeue",
            actor="alerts",
            target_type="alerts.Delivery",
            target_id=",".join(map(str, ids))[:100],
            payload={"deliveries": ids, "statuses": [status for _, status in found]},
        )
        transaction.on_commit(lambda: _queue_after_commit(ids), robust=True)
    log.warning("re-queued %d deliveries whose task was lost: %s", len(ids), ids[:20])
    return ids


# --------------------------------------------------------------------------- operator actions


class AlertActionDenied(PermissionDenied):
    pass


def require_permission(
    actor: Any, perm: str, op: str, request: Any = None, target: Any = ""
) -> None:
    """Refuse (and audit the refusal, committed on its own) when the actor lacks perm."""
    if getattr(actor, "is_authenticated", False) and actor.has_perm(perm):
        return
    with transaction.atomic():
        audit_record(
            action="alerts.refused",
            actor=actor,
            target_type="alerts.Alert",
            target_id=target,
            payload={"op": op, "permission": perm},
            request=request,
        )
    raise AlertActionDenied(f"{op} needs the {perm} permission")


def alert_acknowledge(*, alert_id: int, actor: Any, request: Any = None) -> Alert:
    require_permission(actor, HANDLE, "acknowledge", request, alert_id)
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(pk=alert_id)
        if alert.acknowledged_at is None:
            alert.acknowledged_at = timezone.now()
            alert.acknowledged_by = actor
            alert.save(update_fields=["acknowledged_at", "acknowledged_by"])
            audit_record(action="alert.acknowledge", actor=actor, target=alert, request=request)
    return alert


def alert_comment(*, alert_id: int, actor: Any, text: str, request: Any = None) -> AlertComment:
    require_permission(actor, HANDLE, "comment", request, alert_id)
    text = (text or "").strip()
    if not text or len(text) > 2000:
        raise ValidationError({"text": "must be 1 to 2000 characters"})
    with transaction.atomic():
        alert = Alert.objects.get(pk=alert_id)
        comment = AlertComment.objects.create(
            alert=alert, author=actor, text=text, created_at=timezone.now()
        )
        audit_record(
            action="alert.comment",
            actor=actor,
            target=alert,
            payload={"comment_id": comment.pk, "text": text[:500]},
            request=request,
        )
    return comment


# A silence shorter than this would end about as it is stored (1e-300 s is > 0).
SILENCE_MIN_S = 1.0


def _silence_expiry(now: datetime, duration_s: Any) -> datetime:
    if isinstance(duration_s, bool) or not isinstance(duration_s, int | float):
        raise ValidationError({"duration_s": "must be a number of seconds"})
    if not SILENCE_MIN_S <= duration_s <= settings.ALERTS_SILENCE_MAX_S:
        raise ValidationError(
            {
                "duration_s": f"must be >= {SILENCE_MIN_S:g} and <= "
                f"{settings.ALERTS_SILENCE_MAX_S:g} (seconds)"
            }
        )
    return now + timedelta(seconds=duration_s)


def silence_create(
    *,
    actor: Any,
    reason: str,
    duration_s: float,
    symbol: str = "",
    detector: str = "",
    request: Any = None,
) -> Silence:
    """Silence alerts of a symbol and/or detector (at least one) until the expiry."""
    require_permission(actor, HANDLE, "silence", request)
    symbol, detector, reason = (symbol or "").strip(), (detector or "").strip(), (reason or "")
    if not symbol and not detector:
        raise ValidationError({"symbol": "give a symbol, a detector or both"})
    if not reason.strip():
        raise ValidationError({"reason": "is required"})
    now = timezone.now()
    with transaction.atomic():
        silence = Silence.objects.create(
            symbol=symbol[:40],
            detector=detector[:40],
            reason=reason.strip()[:300],
            author=actor,
            created_at=now,
            expires_at=_silence_expiry(now, duration_s),
        )
        audit_record(
            action="alert.silence",
            actor=actor,
            target=silence,
            payload={
                "symbol": silence.symbol,
                "detector": silence.detector,
                "reason": silence.reason,
                "expires_at": silence.expires_at.isoformat(),
            },
            request=request,
        )
    return silence


def silence_end(*, silence_id: int, actor: Any, request: Any = None) -> Silence:
    require_permission(actor, HANDLE, "unsilence", request, silence_id)
    with transaction.atomic():
        silence = Silence.objects.select_for_update().get(pk=silence_id)
        if silence.ended_at is None:
            silence.ended_at = timezone.now()
            silence.ended_by = actor
            silence.save(update_fields=["ended_at", "ended_by"])
            audit_record(action="alert.unsilence", actor=actor, target=silence, request=request)
    return silence


def _rule_payload(rule: AlertRule) -> dict[str, Any]:
    return {
        "detector": rule.detector,
        "params": rule.params,
        "symbol": rule.symbol,
        "timeframe": rule.timeframe,
        "enabled": rule.enabled,
        "severity": rule.severity,
        "rate_limit_s": rule.rate_limit_s,
    }


def rule_save(*, rule: AlertRule, actor: Any, request: Any = None) -> AlertRule:
    """Validate (through the detector's own params validation) and save a rule."""
    require_permission(actor, MANAGE_RULES, "save rule", request, rule.pk or "")
    rule.full_clean()
    created = rule.pk is None
    with transaction.atomic():
        rule.save()
        audit_record(
            action="alert_rule.create" if created else "alert_rule.update",
            actor=actor,
            target=rule,
            payload=_rule_payload(rule),
            request=request,
        )
    return rule


def rule_delete(*, rule: AlertRule, actor: Any, request: Any = None) -> None:
    require_permission(actor, MANAGE_RULES, "delete rule", request, rule.pk)
    with transaction.atomic():
        audit_record(
            action="alert_rule.delete",
            actor=actor,
            target=rule,
            payload=_rule_payload(rule),
            request=request,
        )
        rule.delete()


def subscription_save(*, subscription: AlertSubscription, actor: Any, request: Any = None) -> None:
    """Save a user's alert delivery choices (validated), audited."""
    require_permission(actor, HANDLE, "save subscription", request, subscription.pk or "")
    subscription.full_clean()
    with transaction.atomic():
        subscription.save()
        audit_record(
            action="alert_subscription.save",
            actor=actor,
            target=subscription,
            payload={
                "user_id": subscription.user_id,
                "email": subscription.email,
                "symbols": subscription.symbols,
                "detectors": subscription.detectors,
                "min_severity": subscription.min_severity,
            },
            request=request,
        )
