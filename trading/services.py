"""Writes of the trading app. Each service is one transaction and audits what it writes."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.services import audit_record

from .candles import KEY_FIELDS, FieldError, candle_key, validate_batch
from .models import Candle, MarketStream


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

    @property
    def to_process(self) -> list[int]:
        late = set(self.late_ids)
        return [pk for pk in self.created_ids if pk not in late]


def _existing(cleaned: list[dict]) -> dict[tuple, Candle]:
    by_stream: dict[tuple, list[int]] = {}
    for item in cleaned:
        by_stream.setdefault(candle_key(item)[:3], []).append(item["open_time_ms"])
    found: dict[tuple, Candle] = {}
    for (exchange, symbol, timeframe), times in by_stream.items():
        rows = Candle.objects.filter(
            exchange=exchange, symbol=symbol, timeframe=timeframe, open_time_ms__in=times
        )
        found.update({candle_key(c.__dict__): c for c in rows})
    return found


def _touch_streams(new: list[Candle], now: datetime) -> set[int]:
    """Update stream freshness; return the ids (positions in `new`) of late candles."""
    late: set[int] = set()
    by_stream: dict[tuple, list[int]] = {}
    for pos, candle in enumerate(new):
        by_stream.setdefault((candle.exchange, candle.symbol, candle.timeframe), []).append(pos)
    for (exchange, symbol, timeframe), positions in by_stream.items():
        stream, _ = MarketStream.objects.select_for_update().get_or_create(
            exchange=exchange, symbol=symbol, timeframe=timeframe
        )
        last = stream.last_open_time_ms
        for pos in sorted(positions, key=lambda p: new[p].open_time_ms):
            if new[pos].open_time_ms < last:
                late.add(pos)
            last = max(last, new[pos].open_time_ms)
        stream.last_open_time_ms = last
        stream.last_received_at = now
        stream.candles_received += len(positions)
        stream.save(update_fields=["last_open_time_ms", "last_received_at", "candles_received"])
    return late


def _insert(cleaned: list[dict], *, source: str, actor: Any, request: Any) -> IngestResult:
    now = timezone.now()
    existing = _existing(cleaned)
    conflicts, fresh = [], []
    for index, item in enumerate(cleaned):
        stored = existing.get(candle_key(item))
        if stored is None:
            fresh.append(item)
        elif not stored.same_values(item):
            conflicts.append(
                {
                    "index": index,
                    "key": dict(zip(KEY_FIELDS, candle_key(item), strict=True)),
                    "stored": {f: getattr(stored, f) for f in Candle.VALUE_FIELDS},
                    "received": {f: item[f] for f in Candle.VALUE_FIELDS},
                }
            )
    if conflicts:
        raise CandleConflict(conflicts)
    new = [Candle(**item, source=source, ingested_at=now) for item in fresh]
    late_positions = _touch_streams(new, now)
    for pos in late_positions:
        new[pos].late = True
    Candle.objects.bulk_create(new)
    result = IngestResult(
        created_ids=[c.pk for c in new],
        duplicates=len(cleaned) - len(new),
        late_ids=[new[p].pk for p in late_positions],
    )
    audit_record(
        action="candles.ingest",
        actor=actor,
        target_type="trading.Candle",
        payload={
            "source": source,
            "received": len(cleaned),
            "created": len(new),
            "duplicates": result.duplicates,
            "late": len(late_positions),
            "streams": sorted({f"{c.exchange}:{c.symbol}:{c.timeframe}" for c in new}),
            "first_id": new[0].pk if new else None,
            "last_id": new[-1].pk if new else None,
        },
        request=request,
    )
    return result


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
    for attempt in range(2):
        try:
            with transaction.atomic():
                result = _insert(cleaned, source=source, actor=actor, request=request)
                if result.to_process:
                    from alerts.tasks import process_candles

                    from .tasks import process_candles_strategy

                    ids = result.to_process
                    transaction.on_commit(lambda ids=ids: process_candles.delay(ids))
                    transaction.on_commit(lambda ids=ids: process_candles_strategy.delay(ids))
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
