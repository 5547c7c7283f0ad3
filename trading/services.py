"""Writes of the trading app. Each service is one transaction and audits what it writes."""

from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone

from alerts.selectors import Prepared
from audit.services import audit_record

from .candles import KEY_FIELDS, FieldError, candle_key, validate_batch
from .models import Candle, Deployment, MarketStream
from .rows import insert_rows, sql_once


class CandleBatchInvalid(Exception):
    def __init__(self, errors: list[FieldError]):
        super().__init__(f"{len(errors)} invalid item(s)")
        self.errors = errors


class CandleConflict(Exception):
    def __init__(self, conflicts: list[dict]):
        super().__init__(f"{len(conflicts)} candle(s) conflict with stored values")
        self.conflicts = conflicts


@dataclass
class IngestResult:
    created_ids: list[int] = field(default_factory=list)
    duplicates: int = 0
    late_ids: list[int] = field(default_factory=list)
    # Whether a deployment with signals enabled trades the batch's timeframe, when the
    # ingestion read it (PostgreSQL, a batch of one stream); None: read after the commit.
    watched: bool | None = None

    @property
    def to_process(self) -> list[int]:
        late = set(self.late_ids)
        return [pk for pk in self.created_ids if pk not in late]


def _one_of(column: str, values: list[Any]) -> tuple[str, list[Any]]:
    """SQL for "column is one of these values" (at least one): one array parameter on
    PostgreSQL (one statement text whatever their number), one parameter each elsewhere."""
    column = connection.ops.quote_name(column)
    if connection.vendor == "postgresql":
        return f"{column} = ANY(%s)", [list(values)]
    return f"{column} IN ({', '.join(['%s'] * len(values))})", list(values)


_STREAM_WHERE = "exchange = %s AND symbol = %s AND timeframe = %s"


def _existing(cleaned: list[dict]) -> dict[tuple, tuple]:
    """The stored value fields (Candle.VALUE_FIELDS) of the candles with these keys, by key;
    read as rows, one query per stream (ingestion's hot path: no ORM query building)."""
    by_stream: dict[tuple, list[int]] = {}
    for item in cleaned:
        by_stream.setdefault(candle_key(item)[:3], []).append(item["open_time_ms"])
    quote = connection.ops.quote_name
    columns = ", ".join(map(quote, ("open_time_ms", *Candle.VALUE_FIELDS)))
    found: dict[tuple, tuple] = {}
    with connection.cursor() as cursor:
        for stream, times in by_stream.items():
            among, params = _one_of("open_time_ms", times)
            cursor.execute(
                f"SELECT {columns} FROM {quote(Candle._meta.db_table)}"
                f" WHERE {_STREAM_WHERE} AND {among}",
                [*stream, *params],
            )
            found.update({(*stream, time): tuple(values) for time, *values in cursor.fetchall()})
    return found


def _lock_stream(stream: tuple[str, str, str]) -> tuple[int, int, int]:
    """The stream's freshness row (id, last open time, candles received), created if it
    is missing, locked for the transaction."""
    table = connection.ops.quote_name(MarketStream._meta.db_table)
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id, last_open_time_ms, candles_received FROM {table}"
            f" WHERE {_STREAM_WHERE}{lock}",
            list(stream),
        )
        row = cursor.fetchone()
    if row is not None:
        return row
    exchange, symbol, timeframe = stream
    created, _ = MarketStream.objects.select_for_update().get_or_create(
        exchange=exchange, symbol=symbol, timeframe=timeframe
    )
    return created.pk, created.last_open_time_ms, created.candles_received


def _touch_streams(new: list[Candle], now: datetime) -> set[int]:
    """Update stream freshness; return the ids (positions in `new`) of late candles."""
    late: set[int] = set()
    by_stream: dict[tuple, list[int]] = {}
    for pos, candle in enumerate(new):
        by_stream.setdefault((candle.exchange, candle.symbol, candle.timeframe), []).append(pos)
    table = connection.ops.quote_name(MarketStream._meta.db_table)
    received_at = connection.ops.adapt_datetimefield_value(now)
    for stream, positions in by_stream.items():
        ordered = sorted(positions, key=lambda p: new[p].open_time_ms)
        newest = new[ordered[-1]].open_time_ms
        last = _touch_stored_stream(stream, newest, received_at, len(positions))
        if last is None:
            pk, last, received = _lock_stream(stream)
            with connection.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {table} SET last_open_time_ms = %s, last_received_at = %s,"
                    " candles_received = %s WHERE id = %s",
                    [max(last, newest), received_at, received + len(positions), pk],
                )
        for pos in ordered:
            if new[pos].open_time_ms < last:
                late.add(pos)
            last = max(last, new[pos].open_time_ms)
    return late


def _touch_stored_stream(
    stream: tuple[str, str, str], newest: int, received_at: Any, count: int
) -> int | None:
    """PostgreSQL: lock and update a stored stream's freshness row in one statement and
    return its last open time before the update; None when the stream has no row yet, and
    elsewhere (the caller then locks, creates and updates it in turn)."""
    if connection.vendor != "postgresql":
        return None
    table = connection.ops.quote_name(MarketStream._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} AS s SET last_open_time_ms = GREATEST(o.last_open_time_ms, %s),"
            " last_received_at = %s, candles_received = o.candles_received + %s"
            f" FROM (SELECT id, last_open_time_ms, candles_received FROM {table}"
            f" WHERE {_STREAM_WHERE} FOR UPDATE) AS o WHERE s.id = o.id"
            " RETURNING o.last_open_time_ms",
            [newest, received_at, count, *stream],
        )
        row = cursor.fetchone()
    return None if row is None else row[0]


# PostgreSQL, a feed posting its stream's next candles (the stream's row exists, and every
# candle opens after its last one: none can be stored yet, none is late): in one
# statement, lock the stream's row and advance it, store the candles, append the audit
# record (its first and last ids made by the statement: ``audit_append_ctes``) and read
# whether a deployment with signals enabled trades the timeframe. Nothing is written
# unless the row holds that and the audit chain has its head row: the caller then takes
# the general way. Run outside a transaction, the statement is its own: one round trip.
_NEXT_CANDLES_SQL = """
WITH o AS (
    SELECT id, last_open_time_ms FROM {stream} WHERE {where} FOR UPDATE
), u AS (
    UPDATE {stream} AS s
    SET last_open_time_ms = GREATEST(o.last_open_time_ms, %s), last_received_at = %s,
        candles_received = s.candles_received + %s
    FROM o WHERE s.id = o.id AND o.last_open_time_ms < %s AND {head_exists}
    RETURNING s.id
), c AS (
    INSERT INTO {candle} ({columns})
    SELECT {values}
    FROM unnest({arrays}) WITH ORDINALITY AS t({names}, n)
    WHERE EXISTS (SELECT 1 FROM u)
    ORDER BY t.n
    RETURNING id
), {audit}
SELECT EXISTS (SELECT 1 FROM u),
       EXISTS (SELECT 1 FROM {deployment} WHERE signals_enabled AND timeframe = %s),
       ARRAY(SELECT id FROM c ORDER BY id), e.id, e.seq, e.prev_hash, e.hash
FROM o LEFT JOIN audit_event e ON TRUE
"""
_CANDLE_FIELDS = [f for f in Candle._meta.concrete_fields if not f.primary_key]
# The columns a batch's candles differ in (one array each); the others hold one value.
_PER_CANDLE = [
    f
    for f in _CANDLE_FIELDS
    if f.attname in ("open_time_ms", "close_time_ms", *Candle.VALUE_FIELDS)
]
_ONE_VALUE = [f for f in _CANDLE_FIELDS if f not in _PER_CANDLE]
_AUDIT_IDS = {"first_id": "(SELECT min(id) FROM c)", "last_id": "(SELECT max(id) FROM c)"}


def _next_candles_sql(audit_sql: str) -> str:
    from audit.services import AUDIT_HEAD_EXISTS

    qn = connection.ops.quote_name
    return _NEXT_CANDLES_SQL.format(
        stream=MarketStream._meta.db_table,
        where=_STREAM_WHERE,
        head_exists=AUDIT_HEAD_EXISTS,
        candle=Candle._meta.db_table,
        columns=", ".join(qn(f.column) for f in _CANDLE_FIELDS),
        values=", ".join(
            f"t.{qn(f.column)}" if f in _PER_CANDLE else f"%s::{f.db_type(connection)}"
            for f in _CANDLE_FIELDS
        ),
        arrays=", ".join(f"%s::{f.db_type(connection)}[]" for f in _PER_CANDLE),
        names=", ".join(qn(f.column) for f in _PER_CANDLE),
        deployment=Deployment._meta.db_table,
        audit=audit_sql,
    )


def _ingest_next(
    cleaned: list[dict], *, source: str, actor: Any, request: Any
) -> IngestResult | None:
    """PostgreSQL, a batch of one stream: ``_NEXT_CANDLES_SQL``. The result, or None when
    it wrote nothing (another vendor, several streams, a stream without its row yet, a
    candle not newer than the stream's last one, no audit head row). A candle stored
    without its stream's row being advanced (by the admin) makes it fail with an
    IntegrityError, having written nothing."""
    from audit.services import audit_append_ctes, audit_appended, audit_event

    streams = {candle_key(item)[:3] for item in cleaned}
    if connection.vendor != "postgresql" or len(streams) != 1:
        return None
    (stream,) = streams
    now = timezone.now()
    new = [Candle(**item, source=source, ingested_at=now) for item in cleaned]
    event = audit_event(
        action="candles.ingest",
        actor=actor,
        target_type="trading.Candle",
        payload=_ingest_payload(source, len(cleaned), new, 0),
        request=request,
    )
    audit_sql, audit_params = audit_append_ctes(
        event, when="EXISTS (SELECT 1 FROM c)", filled=_AUDIT_IDS
    )
    sql = sql_once(connection, ("ingest_next", audit_sql), lambda: _next_candles_sql(audit_sql))
    first = new[0]
    times = [item["open_time_ms"] for item in cleaned]
    params = [
        *stream,
        max(times), connection.ops.adapt_datetimefield_value(now), len(new), min(times),
        *(f.get_db_prep_save(getattr(first, f.attname), connection) for f in _ONE_VALUE),
        *(_array_text([getattr(c, f.attname) for c in new]) for f in _PER_CANDLE),
        *audit_params,
        stream[2],
    ]  # fmt: skip
    savepoint = transaction.atomic() if connection.in_atomic_block else nullcontext()
    with savepoint, connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None or not row[0]:
        return None
    _, watched, ids, *appended = row
    for candle, pk in zip(new, ids, strict=True):
        candle.pk = pk
        candle._state.adding = False
    event.payload.update(first_id=ids[0], last_id=ids[-1])
    audit_appended(event, appended, connection.alias)
    return IngestResult(created_ids=list(ids), watched=watched)


def _array_text(values: list[int | float]) -> str:
    """An array of numbers as PostgreSQL's text form (a Python float's repr reads back as
    the same double): one text parameter, which the driver passes on as it is, where a
    list would be typed and converted element by element on every statement."""
    return "{" + ",".join(map(repr, values)) + "}"


def _ingest_payload(source: str, received: int, new: list[Candle], late: int) -> dict:
    return {
        "source": source,
        "received": received,
        "created": len(new),
        "duplicates": received - len(new),
        "late": late,
        "streams": sorted({f"{c.exchange}:{c.symbol}:{c.timeframe}" for c in new}),
        "first_id": new[0].pk if new else None,
        "last_id": new[-1].pk if new else None,
    }


def _insert(cleaned: list[dict], *, source: str, actor: Any, request: Any) -> IngestResult:
    now = timezone.now()
    existing = _existing(cleaned)
    conflicts, fresh = [], []
    for index, item in enumerate(cleaned):
        stored = existing.get(candle_key(item))
        if stored is None:
            fresh.append(item)
            continue
        values = dict(zip(Candle.VALUE_FIELDS, stored, strict=True))
        if any(values[f] != item[f] for f in Candle.VALUE_FIELDS):
            conflicts.append(
                {
                    "index": index,
                    "key": dict(zip(KEY_FIELDS, candle_key(item), strict=True)),
                    "stored": values,
                    "received": {f: item[f] for f in Candle.VALUE_FIELDS},
                }
            )
    if conflicts:
        raise CandleConflict(conflicts)
    new = [Candle(**item, source=source, ingested_at=now) for item in fresh]
    late_positions = _touch_streams(new, now)
    for pos in late_positions:
        new[pos].late = True
    insert_rows(new)
    result = IngestResult(
        created_ids=[c.pk for c in new],
        duplicates=len(cleaned) - len(new),
        late_ids=[new[p].pk for p in late_positions],
    )
    audit_record(
        action="candles.ingest",
        actor=actor,
        target_type="trading.Candle",
        payload=_ingest_payload(source, len(cleaned), new, len(late_positions)),
        request=request,
    )
    return result


_WATCHED_TIMEFRAMES = Prepared(
    lambda: Deployment.objects.filter(signals_enabled=True).order_by().values_list("timeframe")
)


def _queue_strategy(
    candle_ids: list[int], timeframes: set[str], watched: bool | None = None
) -> None:
    """Queue the strategy step of these candles when a deployment with signals enabled
    trades one of their timeframes: for the others the step finds no deployment watching
    (strategy.watchers) and does nothing, so its worker round trip is skipped. ``watched``:
    as the ingestion's transaction read it; None: read after the commit, when the step
    would have been queued; when the read fails, queued anyway."""
    from .tasks import process_candles_strategy

    if watched is None:
        try:
            watched = any(tf in timeframes for (tf,) in _WATCHED_TIMEFRAMES.rows())
        except DatabaseError:
            watched = True
    if watched:
        process_candles_strategy.delay(candle_ids)


def _queue_on_commit(result: IngestResult, cleaned: list[dict]) -> None:
    """New, in-order candles queued for processing once the transaction commits (at
    once outside one)."""
    if result.to_process:
        from alerts.services import candles_queue

        ids = result.to_process
        timeframes = {item["timeframe"] for item in cleaned}
        transaction.on_commit(partial(candles_queue, ids))
        transaction.on_commit(partial(_queue_strategy, ids, timeframes, result.watched))


def candles_ingest(
    *, items: Any, actor: Any = None, source: str = "api", request: Any = None
) -> IngestResult:
    """Validate and store a batch of closed candles, all or nothing.

    Identical repeats are no-ops; the same key with other values raises CandleConflict
    (recorded in the audit trail). New, in-order candles are queued for processing once
    the transaction commits.
    """
    cleaned, errors = validate_batch(
        items, settings.MARKET_TIMEFRAMES, settings.MAX_CANDLES_PER_BATCH
    )
    if errors:
        raise CandleBatchInvalid(errors)
    try:
        result = _ingest_next(cleaned, source=source, actor=actor, request=request)
    except IntegrityError:
        result = None
    if result is not None:
        _queue_on_commit(result, cleaned)
        return result
    for attempt in range(2):
        try:
            with transaction.atomic():
                result = _insert(cleaned, source=source, actor=actor, request=request)
                _queue_on_commit(result, cleaned)
            return result
        except CandleConflict as conflict:
            audit_record(
                action="candles.conflict",
                actor=actor,
                target_type="trading.Candle",
                payload={"conflicts": conflict.conflicts[:50], "count": len(conflict.conflicts)},
                request=request,
            )
            raise
        except IntegrityError:
            # A concurrent writer stored some of these keys first: re-read and classify.
            if attempt:
                raise
    raise AssertionError("unreachable")
