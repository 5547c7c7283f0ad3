"""Queuing candle processing: one run queued at a time (a flag in the broker's Redis) that
takes every stream's pending candles when it starts; no failure leaves a candle behind."""

from __future__ import annotations

import pytest
import redis

from .helpers import candle, engulfing_pair

pytestmark = pytest.mark.django_db


@pytest.fixture
def flag(redis_url, settings):
    from alerts.services import QUEUED_KEY

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete(QUEUED_KEY)
    yield client
    client.delete(QUEUED_KEY)


@pytest.fixture
def sent(monkeypatch):
    """The processing tasks sent (not run)."""
    from alerts.tasks import process_candles

    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(process_candles, "delay", lambda *a, **k: calls.append((a, k)))
    return calls


def _ingest(items: list[dict], capture) -> list[int]:
    from trading.services import candles_ingest

    with capture(execute=True):
        return candles_ingest(items=items, actor="test").created_ids


def test_while_a_run_waits_no_other_is_queued_and_it_takes_every_stream(
    flag, sent, alert_settings, django_capture_on_commit_callbacks
):
    from alerts.services import QUEUED_KEY, candles_process_pending
    from trading.models import Candle

    first = _ingest(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    _ingest(engulfing_pair(0, 50.0, symbol="BTC/USDT"), django_capture_on_commit_callbacks)
    assert sent == [((first,), {"pending": True})]
    assert 0 < flag.ttl(QUEUED_KEY) <= alert_settings.ALERTS_QUEUED_FLAG_TTL_S

    alerts = candles_process_pending()
    assert sorted(a.symbol for a in alerts) == ["BTC/USDT", "ETH/BTC"]
    assert not Candle.objects.filter(processed_at__isnull=True).exists()
    assert flag.get(QUEUED_KEY) is None

    third = _ingest([candle(2, 100.0, 100.1)], django_capture_on_commit_callbacks)
    assert sent[1:] == [((third,), {"pending": True})]


def test_the_run_clears_the_flag_before_it_reads_so_candles_stored_meanwhile_queue_another(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services

    _ingest(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    read = services.pending_streams
    during: list[list[int]] = []

    def pending_streams():
        streams = read()
        # Stored after the run read the pending streams: this run does not take it.
        during.append(_ingest([candle(2, 100.0, 100.1)], django_capture_on_commit_callbacks))
        return streams

    monkeypatch.setattr(services, "pending_streams", pending_streams)
    services.candles_process_pending()
    assert len(sent) == 2 and sent[1] == ((during[0],), {"pending": True})


def test_redis_unreachable_sends_the_task_anyway(
    sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services

    monkeypatch.setattr(services, "_queue_client", redis.Redis(port=1, socket_connect_timeout=0.2))
    a = _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    b = _ingest([candle(1, 100.1, 100.2)], django_capture_on_commit_callbacks)
    assert sent == [((a,), {"pending": True}), ((b,), {"pending": True})]


def test_a_task_that_cannot_be_sent_leaves_no_flag_behind(flag, monkeypatch):
    from kombu.exceptions import OperationalError

    from alerts import services
    from alerts.tasks import process_candles

    def refuse(*args, **kwargs):
        raise OperationalError("broker unreachable")

    monkeypatch.setattr(process_candles, "delay", refuse)
    with pytest.raises(OperationalError):
        services.candles_queue([1])
    assert flag.get(services.QUEUED_KEY) is None


def test_a_failing_stream_holds_up_no_other_and_stays_pending(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services
    from trading.models import Candle

    _ingest(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    _ingest(engulfing_pair(0, 50.0, symbol="BTC/USDT"), django_capture_on_commit_callbacks)
    process = services.stream_process

    def stream_process(*, exchange, symbol, timeframe):
        if symbol == "BTC/USDT":
            raise ZeroDivisionError("a detector failed")
        return process(exchange=exchange, symbol=symbol, timeframe=timeframe)

    monkeypatch.setattr(services, "stream_process", stream_process)
    with pytest.raises(ZeroDivisionError):
        services.candles_process_pending()
    assert Candle.objects.filter(symbol="ETH/BTC", processed_at__isnull=True).count() == 0
    assert Candle.objects.filter(symbol="BTC/USDT", processed_at__isnull=True).count() == 2
    assert services.pending_streams() == [("binance", "BTC/USDT", "5m")]


def test_a_database_error_ends_the_run_at_once(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from django.db import OperationalError

    from alerts import services

    _ingest(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    _ingest(engulfing_pair(0, 50.0, symbol="BTC/USDT"), django_capture_on_commit_callbacks)
    tried = []

    def stream_process(*, exchange, symbol, timeframe):
        tried.append(symbol)
        raise OperationalError("the database went away")

    monkeypatch.setattr(services, "stream_process", stream_process)
    with pytest.raises(OperationalError):
        services.candles_process_pending()
    assert tried == ["BTC/USDT"]


def test_pending_streams_leave_out_processed_and_late_candles(
    flag, sent, alert_settings, django_capture_on_commit_callbacks
):
    from alerts.services import candles_process_pending, pending_streams
    from trading.models import Candle

    _ingest([candle(5, 100.0, 100.1)], django_capture_on_commit_callbacks)
    assert pending_streams() == [("binance", "ETH/BTC", "5m")]
    candles_process_pending()
    assert pending_streams() == []
    late = _ingest([candle(1, 100.0, 100.1)], django_capture_on_commit_callbacks)
    assert Candle.objects.get(pk__in=late).late
    assert pending_streams() == []
    assert len(sent) == 1  # the late candle queues nothing
