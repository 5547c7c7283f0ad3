"""Ingestion by several writers at once into one stream: the stream's freshness row counts
every candle and keeps the newest open time (its lock serialises the writers)."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from trading.models import Candle, MarketStream

from .helpers import START_MS, STEP_MS, minute_candle


@pytest.mark.django_db(transaction=True)
def test_writers_at_once_lose_no_count_and_keep_the_newest_open_time(monkeypatch):
    from alerts import services as alert_services
    from trading.services import candles_ingest

    monkeypatch.setattr(alert_services, "candles_queue", lambda ids: None)
    writers, each = 4, 15
    candles_ingest(items=[minute_candle(-1)], actor="test")  # the stream's row exists
    failures: list[BaseException] = []
    barrier = threading.Barrier(writers)

    def write(w: int) -> None:
        try:
            barrier.wait(timeout=30)
            for k in range(each):
                candles_ingest(items=[minute_candle(k * writers + w)], actor="test")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    stream = MarketStream.objects.get()
    total = writers * each + 1
    assert Candle.objects.count() == stream.candles_received == total
    assert stream.last_open_time_ms == START_MS + (writers * each - 1) * STEP_MS
    # A candle is late exactly when a newer one of its stream was stored before it.
    stored = list(Candle.objects.order_by("pk").values_list("open_time_ms", "late"))
    newest = None
    for open_time, late in stored:
        assert late == (newest is not None and open_time < newest)
        newest = open_time if newest is None else max(newest, open_time)
