"""Queuing candle processing: one run at a time (a flag in the broker's Redis, held while
the run is queued and while it works) that takes every stream's pending candles, again
while more come; no failure leaves a candle behind."""

from __future__ import annotations

import pytest
import redis

from .helpers import candle, engulfing_pair

pytestmark = pytest.mark.django_db


@pytest.fixture
def flag(redis_url, settings):
    from alerts.services import POKE_KEY, QUEUED_KEY

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete(QUEUED_KEY, POKE_KEY)
    yield client
    client.delete(QUEUED_KEY, POKE_KEY)


@pytest.fixture
def sent(monkeypatch):
    """The processing tasks sent (not run)."""
    from alerts.tasks import process_candles

    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(process_candles, "delay", lambda *a, **k: calls.append((a, k)))
    return calls


def _unreachable() -> redis.Redis:
    """A Redis client that fails at once (no retries)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


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

    alerts = candles_process_pending(linger_s=0)
    assert sorted(a.symbol for a in alerts) == ["BTC/USDT", "ETH/BTC"]
    assert not Candle.objects.filter(processed_at__isnull=True).exists()
    assert flag.get(QUEUED_KEY) is None

    third = _ingest([candle(2, 100.0, 100.1)], django_capture_on_commit_callbacks)
    assert sent[1:] == [((third,), {"pending": True})]


def test_candles_stored_while_the_run_works_are_taken_by_it_and_queue_nothing(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services
    from trading.models import Candle

    _ingest(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    read = services.pending_streams
    during: list[list[int]] = []

    def pending_streams():
        streams = read()
        if not during:  # stored after the run's first read, while it holds the flag
            during.append(_ingest([candle(2, 100.0, 100.1)], django_capture_on_commit_callbacks))
        return streams

    monkeypatch.setattr(services, "pending_streams", pending_streams)
    services.candles_process_pending(linger_s=0)
    assert len(sent) == 1
    assert Candle.objects.get(pk__in=during[0]).processed_at is not None
    assert flag.get(services.QUEUED_KEY) is None


def test_a_run_waiting_for_more_takes_the_candles_it_is_told_of(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services
    from trading.models import Candle

    _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    client = services._queue_flags()
    waits: list[float] = []
    blpop = client.blpop

    def wait_for_more(keys, timeout):
        waits.append(timeout)
        if len(waits) == 1:  # a batch stored while the run waits: it leaves word
            _ingest([candle(1, 100.1, 100.2)], django_capture_on_commit_callbacks)
        return blpop(keys, timeout=0.01)

    monkeypatch.setattr(client, "blpop", wait_for_more)
    services.candles_process_pending(linger_s=0.5)
    assert waits == [0.5, 0.5]  # woken by the word, then waited in vain once
    assert len(sent) == 1
    assert not Candle.objects.filter(processed_at__isnull=True).exists()
    assert flag.get(services.QUEUED_KEY) is None


def test_a_batch_that_saw_the_flag_held_as_the_run_let_it_go_is_taken_by_that_run(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services
    from trading.models import Candle

    _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    client = services._queue_flags()
    stored: list[list[int]] = []

    def wait_in_vain(keys, timeout):
        if not stored:  # stored and told just as the wait ends in vain: the word is not read
            stored.append(_ingest([candle(1, 100.1, 100.2)], django_capture_on_commit_callbacks))
        return None

    monkeypatch.setattr(client, "blpop", wait_in_vain)
    services.candles_process_pending(linger_s=0.5)
    assert len(sent) == 1  # the batch found the flag held and sent nothing
    assert Candle.objects.get(pk__in=stored[0]).processed_at is not None
    assert flag.get(services.QUEUED_KEY) is None


def test_candles_stored_after_the_run_let_its_flag_go_queue_another(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services
    from trading.models import Candle

    _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    clear = services._clear_queued_flag
    after: list[list[int]] = []

    def let_go(*args):
        clear(*args)
        if not after:
            after.append(_ingest([candle(1, 100.1, 100.2)], django_capture_on_commit_callbacks))

    monkeypatch.setattr(services, "_clear_queued_flag", let_go)
    services.candles_process_pending(linger_s=0)
    assert len(sent) == 2 and sent[1] == ((after[0],), {"pending": True})
    # The new run's flag stays; the candle is left to that run.
    assert flag.get(services.QUEUED_KEY) is not None
    assert Candle.objects.get(pk__in=after[0]).processed_at is None


def test_a_run_that_reaches_its_time_limit_hands_over_to_a_new_one(
    flag, sent, alert_settings, django_capture_on_commit_callbacks
):
    from alerts import services

    _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    services.candles_process_pending(linger_s=0, max_s=0)
    assert sent[1:] == [(([],), {"pending": True})]
    assert 0 < flag.ttl(services.QUEUED_KEY) <= alert_settings.ALERTS_QUEUED_FLAG_TTL_S
    # Queued, not the run's own: the new run takes it when it starts.
    assert flag.get(services.QUEUED_KEY) == services.QUEUED.encode()


def test_without_redis_the_run_processes_once_and_ends(
    sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services
    from trading.models import Candle

    monkeypatch.setattr(services, "_queue_client", _unreachable())
    _ingest(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    alerts = services.candles_process_pending(linger_s=0.5)
    assert [a.symbol for a in alerts] == ["ETH/BTC"]
    assert not Candle.objects.filter(processed_at__isnull=True).exists()


def test_eagerly_run_it_does_not_wait(flag, alert_settings, settings, monkeypatch):
    from alerts import services
    from alerts.tasks import process_candles

    seen: list[tuple[float | None, str | None]] = []
    monkeypatch.setattr(
        services,
        "candles_process_pending",
        lambda linger_s=None, run_id=None: seen.append((linger_s, run_id)) or [],
    )
    monkeypatch.setattr("alerts.tasks.candles_process_pending", services.candles_process_pending)
    settings.CELERY_TASK_ALWAYS_EAGER = True
    result = process_candles.apply(([],), {"pending": True})
    assert seen == [(0.0, result.id)]  # the run holds the flag under its task's id


def test_redis_unreachable_sends_the_task_anyway(
    sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services

    monkeypatch.setattr(services, "_queue_client", _unreachable())
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
    process = services._stream_alerts

    def stream_alerts(stream, *args):
        if stream[1] == "BTC/USDT":
            raise ZeroDivisionError("a detector failed")
        return process(stream, *args)

    monkeypatch.setattr(services, "_stream_alerts", stream_alerts)
    with pytest.raises(ZeroDivisionError):
        services.candles_process_pending()
    assert Candle.objects.filter(symbol="ETH/BTC", processed_at__isnull=True).count() == 0
    assert Candle.objects.filter(symbol="BTC/USDT", processed_at__isnull=True).count() == 2
    assert services.pending_streams() == [("binance", "BTC/USDT", "5m")]
    assert flag.get(services.QUEUED_KEY) is None  # the next batch queues a run again


def test_a_database_error_ends_the_run_at_once(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from django.db import OperationalError

    from alerts import services

    _ingest(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    _ingest(engulfing_pair(0, 50.0, symbol="BTC/USDT"), django_capture_on_commit_callbacks)
    tried = []

    def stream_alerts(stream, *args):
        tried.append(stream[1])
        raise OperationalError("the database went away")

    monkeypatch.setattr(services, "_stream_alerts", stream_alerts)
    with pytest.raises(OperationalError):
        services.candles_process_pending()
    assert tried == ["BTC/USDT"]
    assert flag.get(services.QUEUED_KEY) is None


def test_pending_streams_leave_out_processed_and_late_candles(
    flag, sent, alert_settings, django_capture_on_commit_callbacks
):
    from alerts.services import candles_process_pending, pending_streams
    from trading.models import Candle

    _ingest([candle(5, 100.0, 100.1)], django_capture_on_commit_callbacks)
    assert pending_streams() == [("binance", "ETH/BTC", "5m")]
    candles_process_pending(linger_s=0)
    assert pending_streams() == []
    late = _ingest([candle(1, 100.0, 100.1)], django_capture_on_commit_callbacks)
    assert Candle.objects.get(pk__in=late).late
    assert pending_streams() == []
    assert len(sent) == 1  # the late candle queues nothing


def test_a_starting_worker_queues_a_run_for_pending_candles_whatever_the_flag(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    """A run killed with its flag held would hold off the next until the flag expires."""
    from types import SimpleNamespace

    from alerts import services, tasks
    from alerts.tasks import _sweep_once

    # In its own thread it closes that thread's connection; here it is the test's.
    monkeypatch.setattr(tasks, "connection", SimpleNamespace(close=lambda: None))

    _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    assert flag.get(services.QUEUED_KEY) is not None and len(sent) == 1
    _sweep_once()
    assert sent[1:] == [(([],), {"pending": True})]
    services.candles_process_pending(linger_s=0)
    _sweep_once()  # nothing pending: nothing sent
    assert len(sent) == 2


def test_a_run_the_starting_worker_cannot_send_leaves_no_queued_flag(flag, monkeypatch):
    from alerts import services
    from alerts.tasks import process_candles

    def refuse(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(process_candles, "delay", refuse)
    with pytest.raises(ConnectionError):
        services.queue_run_anyway()
    assert flag.get(services.QUEUED_KEY) is None


def test_a_run_started_while_another_holds_the_flag_ends_at_once_leaving_it_the_candles(
    flag, sent, alert_settings, django_capture_on_commit_callbacks
):
    from alerts import services
    from trading.models import Candle

    ids = _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    flag.set(services.QUEUED_KEY, "run-a")  # run-a started and holds the flag
    assert services.candles_process_pending(linger_s=0, run_id="run-b") == []
    assert Candle.objects.get(pk__in=ids).processed_at is None
    assert flag.get(services.QUEUED_KEY) == b"run-a"
    # run-a's own flag is its own: a task redelivered after its worker died takes it back.
    services.candles_process_pending(linger_s=0, run_id="run-a")
    assert Candle.objects.get(pk__in=ids).processed_at is not None
    assert flag.get(services.QUEUED_KEY) is None
    assert len(sent) == 1


def test_a_worker_starting_while_a_run_goes_on_leaves_one_run_going(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    """Two runs would both take every pass's candles and each hand over to a new run, for
    as long as candles keep coming."""
    from types import SimpleNamespace

    from alerts import services, tasks
    from trading.models import Candle

    monkeypatch.setattr(tasks, "connection", SimpleNamespace(close=lambda: None))
    ids = _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    flag.set(services.QUEUED_KEY, "run-a")
    tasks._sweep_once()
    assert len(sent) == 2 and flag.get(services.QUEUED_KEY) == services.QUEUED.encode()
    assert services._hold_flag("run-a")  # run-a's next pass takes the flag back
    assert services.candles_process_pending(linger_s=0, run_id="run-sent") == []
    assert flag.get(services.QUEUED_KEY) == b"run-a"
    assert Candle.objects.get(pk__in=ids).processed_at is None  # left to run-a


def test_a_stream_failing_on_redis_fails_the_run_with_that_error(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services

    _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)

    def stream_alerts(stream, *args):
        raise redis.ConnectionError("the channel layer's Redis went away")

    monkeypatch.setattr(services, "_stream_alerts", stream_alerts)
    with pytest.raises(redis.ConnectionError):
        services.candles_process_pending(linger_s=0)
    assert flag.get(services.QUEUED_KEY) is None
    assert services.pending_streams() == [("binance", "ETH/BTC", "5m")]


@pytest.mark.django_db(transaction=True)
def test_a_connection_dropped_while_the_run_waits_is_replaced_before_it_reads_again(
    flag, sent, alert_settings, monkeypatch
):
    import psycopg
    from django.db import connection

    from alerts import services
    from trading.models import Candle
    from trading.services import candles_ingest

    if connection.vendor != "postgresql":
        pytest.skip("a backend is terminated on PostgreSQL")
    candles_ingest(items=[candle(0, 100.0, 100.1)], actor="test")
    client = services._queue_flags()
    dropped: list[int] = []

    def wait_while_the_database_drops_the_connection(keys, timeout):
        if not dropped:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                dropped.append(cursor.fetchone()[0])
            conf = connection.settings_dict
            with psycopg.connect(
                host=conf["HOST"] or "127.0.0.1", port=conf["PORT"] or 5432,
                user=conf["USER"], dbname=conf["NAME"], autocommit=True,
            ) as admin:  # fmt: skip
                admin.execute("SELECT pg_terminate_backend(%s)", [dropped[0]])
        return None

    monkeypatch.setattr(client, "blpop", wait_while_the_database_drops_the_connection)
    services.candles_process_pending(linger_s=0.5)
    assert dropped
    assert not Candle.objects.filter(processed_at__isnull=True).exists()
    assert flag.get(services.QUEUED_KEY) is None


def _csv_stream(name: str, symbol: str, n: int) -> list[dict]:
    from .helpers import MARKET

    out = []
    for row in (MARKET / name).read_text().splitlines()[1 : n + 1]:
        ts, o, h, lo, c, v = row.split(",")[:6]
        values = {"open": float(o), "high": float(h), "low": float(lo), "close": float(c)}
        out.append(
            {
                "exchange": "binance",
                "symbol": symbol,
                "timeframe": "5m",
                "open_time_ms": int(ts),
                **values,
                "volume": float(v),
            }
        )
    return out


def test_one_run_over_several_streams_in_passes_finds_each_streams_backtest(
    flag, sent, alert_settings, django_capture_on_commit_callbacks
):
    """Several streams' backlogs, taken a few candles a stream per pass (each pass reading
    every stream's pending candles and history together), give each stream exactly the
    detections and decisions of its backtest."""
    from alerts.backtest import run_backtest
    from alerts.detectors import load_csv
    from alerts.models import Alert
    from alerts.services import candles_process_pending, pending_streams

    from .helpers import MARKET

    alert_settings.ALERTS_PROCESS_BATCH = 7
    n = 160
    files = {"ETH/BTC": "ETH_BTC-5m.csv", "LTC/BTC": "LTC_BTC-5m.csv", "ADA/BTC": "ADA_BTC-5m.csv"}
    series = {symbol: _csv_stream(name, symbol, n) for symbol, name in files.items()}
    for start in range(0, n, 40):  # interleaved batches, as feeds post them
        for items in series.values():
            _ingest(items[start : start + 40], django_capture_on_commit_callbacks)
    assert len(pending_streams()) == 3
    candles_process_pending(linger_s=0)
    assert pending_streams() == []
    for symbol, name in files.items():
        arrays = {k: v[:n] for k, v in load_csv(MARKET / name).items()}
        expected = run_backtest(
            arrays, symbol=symbol, timeframe="5m", rules=[], default_rate_limit_s=60.0
        )
        live = Alert.objects.filter(symbol=symbol).order_by("event_ms", "detector")
        got = [(a.event_ms, a.detector, a.direction, a.suppressed) for a in live]
        assert got == [(r.ts, r.detector, r.direction, r.suppressed) for r in expected]
        assert got, f"{symbol}: the data should give some detections"


def test_a_stream_failing_after_its_alerts_were_written_undoes_them_alone(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    from alerts import services
    from alerts.models import Alert
    from trading.models import Candle

    _ingest(engulfing_pair(0, 100.0), django_capture_on_commit_callbacks)
    _ingest(engulfing_pair(0, 50.0, symbol="BTC/USDT"), django_capture_on_commit_callbacks)
    finish = services._finish

    def failing_finish(fan, **kwargs):
        if any(a.symbol == "BTC/USDT" for a in fan.delivered):
            assert Alert.objects.filter(symbol="BTC/USDT").exists()  # written, then undone
            raise ValueError("recording failed")
        return finish(fan, **kwargs)

    monkeypatch.setattr(services, "_finish", failing_finish)
    with pytest.raises(ValueError, match="recording failed"):
        services.candles_process_pending(linger_s=0)
    assert list(Alert.objects.values_list("symbol", "detector")) == [("ETH/BTC", "engulfing")]
    assert Candle.objects.filter(symbol="BTC/USDT", processed_at__isnull=True).count() == 2
    assert Candle.objects.filter(symbol="ETH/BTC", processed_at__isnull=True).count() == 0


def test_while_candles_keep_coming_a_run_starts_a_pass_at_most_every_pass_s(
    flag, sent, alert_settings, django_capture_on_commit_callbacks, monkeypatch
):
    """After a pass that found candles the run rests for the rest of ``pass_s`` before the
    next (so that the next takes several streams' candles together); run eagerly, never."""
    from alerts import services
    from trading.models import Candle

    slept: list[float] = []
    monkeypatch.setattr(services.time, "sleep", slept.append)
    _ingest([candle(0, 100.0, 100.1)], django_capture_on_commit_callbacks)
    services.candles_process_pending(linger_s=0.05, pass_s=30.0)
    assert len(slept) == 1 and 29.0 < slept[0] <= 30.0
    assert not Candle.objects.filter(processed_at__isnull=True).exists()

    _ingest([candle(1, 100.1, 100.2)], django_capture_on_commit_callbacks)
    services.candles_process_pending(linger_s=0, pass_s=30.0)
    assert len(slept) == 1
    assert not Candle.objects.filter(processed_at__isnull=True).exists()
