"""The strategy's buffered rows written with SQL written once (``trading.rows.BulkInsert``):
the rows ``bulk_create`` writes, their ids set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from tests.trading.test_execution import ETH, LTC, T0, TF_MS, make_deployment
from trading import strategy
from trading.models import Candle, EquitySnapshot, Signal

pytestmark = pytest.mark.django_db

T = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
PLUS2 = timezone(timedelta(hours=2))


def values(obj, skip=("id",)):
    return {
        f.attname: getattr(obj, f.attname)
        for f in type(obj)._meta.concrete_fields
        if f.attname not in skip
    }


def candles(symbol, n, start=0):
    return [
        Candle(
            exchange="paper", symbol=symbol, timeframe="5m", open_time_ms=T0 + (start + i) * TF_MS,
            close_time_ms=T0 + (start + i + 1) * TF_MS - 1, open=1.0 + i, high=2.0, low=0.5,
            close=1.5, volume=float(i), source="replay",
            # shared times, a time in another zone (the same instant as T + i s), none
            ingested_at=(T if i % 2 else (T + timedelta(seconds=i)).astimezone(PLUS2)),
            processed_at=None if i % 3 else T + timedelta(minutes=i),
        )
        for i in range(n)
    ]  # fmt: skip


def test_inserted_rows_are_bulk_creates():
    dep = make_deployment()
    mine, theirs = candles(ETH, 7), candles(LTC, 7)
    strategy._CANDLES.insert(mine)
    Candle.objects.bulk_create(theirs)
    assert all(c.pk is not None and not c._state.adding for c in mine)
    for a, b in zip(mine, theirs, strict=True):
        stored_a, stored_b = Candle.objects.get(pk=a.pk), Candle.objects.get(pk=b.pk)
        assert values(stored_a, ("id", "symbol")) == values(stored_b, ("id", "symbol"))
        assert stored_a.ingested_at == a.ingested_at and stored_a.processed_at == a.processed_at
    # signals of candles inserted just before (their ids taken from the candle objects)
    fresh = candles(ETH, 3, start=10)
    strategy._CANDLES.insert(fresh)
    signals = [
        Signal(
            deployment=dep, candle=c, symbol=c.symbol, side="buy", entry=1.0, stop=0.9,
            target=1.2, reward_risk=2.0, score=3, factors={"trend": True, "n": [1, None]},
            ts_ms=c.open_time_ms, created_at=T,
        )
        for c in fresh
    ]  # fmt: skip
    strategy._SIGNALS.insert(signals)
    stored = list(Signal.objects.filter(deployment=dep).order_by("candle_id"))
    assert [s.candle_id for s in stored] == [c.pk for c in fresh]
    assert all(s.factors == {"trend": True, "n": [1, None]} and s.created_at == T for s in stored)
    strategy._SIGNALS.insert(signals)  # conflicts ignored
    assert Signal.objects.filter(deployment=dep).count() == 3
    snaps = [
        EquitySnapshot(
            deployment_id=dep.pk, ts=T + timedelta(minutes=i // 2), cash=1.0, positions_value=0.0,
            equity=1.0 - i / 100, peak=1.0, drawdown_pct=-float(i),
        )
        for i in range(5)
    ]  # fmt: skip
    strategy._SNAPSHOTS.insert(snaps)
    read = list(EquitySnapshot.objects.filter(deployment=dep).order_by("id"))
    assert [values(s) for s in read] == [values(s) for s in snaps]
    assert [s.pk for s in read] == [s.pk for s in snaps]


def test_related_objects_are_checked_as_bulk_create_checks_them():
    dep = make_deployment()
    (early,), (unsaved,) = candles(ETH, 1, start=20), candles(ETH, 1, start=21)

    def signal(candle):
        return Signal(
            deployment=dep, candle=candle, symbol=ETH, side="buy", entry=1.0, stop=0.9,
            target=1.2, reward_risk=2.0, score=3, factors={}, ts_ms=candle.open_time_ms,
            created_at=T,
        )  # fmt: skip

    made_before = signal(early)  # the candle saved after it was assigned: its id is taken
    strategy._CANDLES.insert([early])
    strategy._SIGNALS.insert([made_before])
    assert Signal.objects.get(deployment=dep).candle_id == early.pk
    with pytest.raises(ValueError, match="unsaved related object 'candle'"):
        strategy._SIGNALS.insert([signal(unsaved)])
    with pytest.raises(ValueError, match="unsaved related object 'candle'"):
        Signal.objects.bulk_create([signal(unsaved)])
