"""Candle ingestion has a rate of its own per person (API_THROTTLE_INGEST), counted in
fixed windows: a feed is not held to the user rate, and over its own rate it gets 429."""

from datetime import UTC, datetime

import pytest
import time_machine
from django.core.cache import cache
from rest_framework.test import APIClient
from rest_framework.throttling import UserRateThrottle

from trading.api import IngestRateThrottle
from trading.models import Candle

from .helpers import minute_candle as candle

URL = "/api/v1/market/candles"


@pytest.fixture
def feed(api_token):
    cache.clear()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token()}")
    yield client
    cache.clear()


def _rates(monkeypatch, **rates):
    for throttle in (IngestRateThrottle, UserRateThrottle):
        monkeypatch.setattr(throttle, "THROTTLE_RATES", {**throttle.THROTTLE_RATES, **rates})


@pytest.mark.django_db
def test_over_the_ingest_rate_is_429_and_stores_nothing(feed, monkeypatch):
    _rates(monkeypatch, ingest="3/min")
    with time_machine.travel(datetime(2026, 1, 5, 12, 0, 10, tzinfo=UTC), tick=False):
        codes = [feed.post(URL, [candle(i)], format="json").status_code for i in range(4)]
        assert codes == [201, 201, 201, 429]
        assert Candle.objects.count() == 3
        throttled = feed.post(URL, [candle(9)], format="json")
        assert throttled.status_code == 429
        assert 0 < int(throttled.headers["Retry-After"]) <= 50
    with time_machine.travel(datetime(2026, 1, 5, 12, 1, 0, tzinfo=UTC), tick=False):
        assert feed.post(URL, [candle(4)], format="json").status_code == 201  # a new window
    assert Candle.objects.count() == 4


@pytest.mark.django_db
def test_a_feed_is_not_held_to_the_user_rate(feed, monkeypatch):
    _rates(monkeypatch, user="2/min", ingest="100/min")
    with time_machine.travel(datetime(2026, 1, 5, 12, 0, 10, tzinfo=UTC), tick=False):
        codes = [feed.post(URL, [candle(i)], format="json").status_code for i in range(5)]
    assert codes == [201] * 5
