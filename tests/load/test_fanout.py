"""Load, small and bounded, on loopback (the figures at scale: bench/bench_load.py).

- 100 authenticated WebSocket clients on uvicorn with a Celery worker on a private Redis:
  every client receives every alert exactly once and in order, and the database records
  one WebSocket Delivery per alert and user.
- 20 candle POSTs/s for 5 s: no error (latency printed, not asserted).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.harness import (
    engulfing_series,
    flush_database,
    private_stack,
    user_token,
    wait_for,
)

from .clients import Client, Fleet, make_viewers, post_load, raise_fd_limit, rss_kib, stream_candle

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CLIENTS = 100
CANDLES = 20  # five engulfing alerts


@pytest.fixture(scope="module")
def live(django_db_setup, django_db_blocker, request):
    if request.config.redis_problem:
        pytest.skip(request.config.redis_problem)
    raise_fd_limit(4 * CLIENTS + 256)
    with django_db_blocker.unblock():
        try:
            with private_stack() as (stack, _):
                yield stack
        finally:
            flush_database()


def test_every_client_receives_every_alert_once_in_order(live, django_db_blocker):
    from alerts.models import Alert, Delivery

    with django_db_blocker.unblock():
        tokens = make_viewers(CLIENTS)
        poster = user_token("load-ops", "Ops")
    fleet = Fleet(f"{live.ws_url}/ws/alerts/", live.base_url, [Client(t) for t in tokens])
    web = live.stack.procs["web"].pid
    idle_kib = rss_kib(web)

    async def scenario() -> tuple[bool, int, float]:
        await fleet.connect()
        connected_kib = rss_kib(web)
        posted = time.time()
        status, body = await asyncio.to_thread(
            live.request, "POST", "/api/v1/market/candles", engulfing_series(CANDLES), poster
        )
        assert status == 201, body
        complete = await fleet.wait_for(CANDLES // 4, timeout=60)
        await fleet.close()
        return complete, connected_kib, posted

    complete, connected_kib, posted = asyncio.run(scenario())
    with django_db_blocker.unblock():
        expected = list(
            Alert.objects.filter(suppressed=False).order_by("event_ms").values_list("pk", flat=True)
        )
        sent = Delivery.objects.filter(channel="websocket", status="sent")
        want = len(expected) * CLIENTS
        wait_for(lambda: sent.count() >= want, 10, lambda: f"{want} rows, {sent.count()} seen")
        rows = sent.count()
    lost = fleet.lost(expected)
    latency = sorted((t - posted) * 1000 for c in fleet.clients for _, t in c.alerts)
    print(
        f"\nfan-out: {CLIENTS} clients, {len(expected)} alerts, lost {lost}; web RSS "
        f"{idle_kib} -> {connected_kib} KiB ({(connected_kib - idle_kib) / CLIENTS:.0f} KiB per "
        f"connection); POST to receipt p50 {latency[len(latency) // 2]:.0f} ms, max "
        f"{latency[-1]:.0f} ms"
    )
    assert len(expected) == CANDLES // 4
    assert complete and lost == {"missing": 0, "doubled": 0, "out_of_order": 0}
    assert not [c.error for c in fleet.clients if c.error]
    assert rows == want


def test_twenty_candle_posts_a_second_without_error(live, django_db_blocker):
    with django_db_blocker.unblock():
        token = user_token("load-feed", "Ops")
    result = post_load("127.0.0.1", live.port, token, lambda i: [stream_candle(i)], 20, 5, 4)
    print(f"\ningest: {result.summary()}")
    assert result.planned == result.sent == 100 and result.errors == 0, result.statuses
