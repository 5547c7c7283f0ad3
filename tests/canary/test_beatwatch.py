"""The beat watch: when it alerts (once per stale episode, only on a stop it saw), and that
two workers watching the same heartbeat raise one alert."""

from __future__ import annotations

import pytest

from canary.beatwatch import BeatWatch, Watch, alert_key, assess

STALE = 30.0


def _run(ticks: list[tuple[float | None, float]]) -> list[float | None]:
    """(heartbeat, now) per tick; the episode alerted at each tick (None: no alert)."""
    watch, out = Watch(), []
    for heartbeat, now in ticks:
        verdict = assess(watch, heartbeat, now=now, stale_s=STALE)
        watch = verdict.watch
        out.append(verdict.stale_since)
    return out


def test_fresh_heartbeats_raise_nothing():
    assert _run([(100.0, 101.0), (105.0, 106.0), (110.0, 139.0)]) == [None, None, None]


def test_a_stale_heartbeat_alerts_once_per_episode():
    ticks = [(100.0, 101.0), (100.0, 129.0), (100.0, 130.0), (100.0, 131.0), (100.0, 500.0)]
    assert _run(ticks) == [None, None, 100.0, None, None]


def test_beat_back_then_stopped_again_is_a_new_episode():
    ticks = [(100.0, 101.0), (100.0, 140.0), (200.0, 201.0), (200.0, 231.0), (200.0, 240.0)]
    assert _run(ticks) == [None, 100.0, None, 200.0, None]


def test_a_heartbeat_gone_after_the_alert_raises_nothing_more():
    ticks = [(100.0, 101.0), (100.0, 140.0), (None, 4000.0), (None, 9000.0)]
    assert _run(ticks) == [None, 100.0, None, None]


def test_a_heartbeat_that_disappears_is_stale_from_its_last_value():
    ticks = [(100.0, 101.0), (None, 120.0), (None, 131.0), (None, 140.0)]
    assert _run(ticks) == [None, None, 100.0, None]


def test_no_alert_for_a_beat_never_seen_running():
    assert _run([(None, 100.0), (None, 1000.0)]) == [None, None]
    assert _run([(100.0, 5000.0), (100.0, 5100.0)]) == [None, None]
    assert _run([(100.0, 5000.0), (6000.0, 6001.0), (6000.0, 6040.0)]) == [None, None, 6000.0]


def test_a_failed_read_or_alert_changes_nothing_and_is_tried_again():
    calls, reads, now = [], iter([100.0, RuntimeError("redis down"), 100.0, 100.0]), [101.0]

    def read():
        value = next(reads)
        if isinstance(value, Exception):
            raise value
        return value

    def alert(since, age):
        calls.append((since, age))
        if len(calls) == 1:
            raise RuntimeError("database down")

    watch = BeatWatch(interval_s=1.0, stale_s=STALE, read=read, alert=alert, clock=lambda: now[0])
    assert watch.tick() is None
    now[0] = 140.0
    assert watch.tick() is None  # unreadable
    assert watch.tick() is None  # the alert failed
    assert watch.tick() == 100.0
    assert calls == [(100.0, 40.0), (100.0, 40.0)]


@pytest.mark.django_db(transaction=True)
def test_two_workers_raise_one_alert_per_episode(redis_url, settings):
    """Two watches (two worker processes) read the real heartbeat in Redis and raise
    through the real alerts service: one alert, keyed by the stale heartbeat."""
    from alerts.models import Alert
    from canary.heartbeat import KEY_BEAT, mark, redis_client

    redis_client.cache_clear()
    now = [1_000_000.0]
    mark(KEY_BEAT, now=now[0])
    try:
        workers = [BeatWatch(interval_s=1.0, stale_s=STALE, clock=lambda: now[0]) for _ in "ab"]
        assert [w.tick() for w in workers] == [None, None]
        now[0] += STALE + 5
        assert [w.tick() for w in workers] == [1_000_000.0, 1_000_000.0]
        assert [w.tick() for w in workers] == [None, None]
        [alert] = Alert.objects.all()
        assert alert.dedupe_key == f"canary:{alert_key(1_000_000.0)}"
        assert alert.severity == "critical" and "beat stopped" in alert.message
        mark(KEY_BEAT, now=now[0])
        assert [w.tick() for w in workers] == [None, None]
        now[0] += STALE + 5
        assert [w.tick() for w in workers] == [now[0] - STALE - 5] * 2
        assert Alert.objects.count() == 2
    finally:
        redis_client().delete(KEY_BEAT)
        redis_client.cache_clear()


def test_the_watch_thread_starts_and_stops():
    reads = []
    watch = BeatWatch(interval_s=0.01, stale_s=STALE, read=lambda: reads.append(1))
    watch.start()
    try:
        import time

        deadline = time.monotonic() + 30
        while len(reads) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watch.stop()
    assert len(reads) >= 3 and not watch._thread.is_alive()
