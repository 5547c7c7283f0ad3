"""Market data: polling closed candles with gap backfill (the real ccxt client against the
Binance stub's klines), the stream freshness selectors, the ccxt.pro kline closer, and
late candles."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from tests.trading.binance_stub import BinanceStub
from tests.trading.test_execution import (  # noqa: F401 - fixtures
    ETH,
    LTC,
    TF_MS,
    _fresh_caches,
    make_deployment,
    nolock,
    switch,
)
from trading import marketdata
from trading.exchange import Candle as Bar
from trading.exchange_ccxt import CcxtExchange
from trading.exchange_stream import KlineCloser
from trading.marketdata import StreamSpec
from trading.models import Candle, MarketStream

START_MS = 1_700_000_100_000 - 1_700_000_100_000 % TF_MS
KLINES = "/api/v3/klines"


def at(index: float) -> datetime:
    """Wall time `index` candles after START (+ 5 s so that candle index-1 is closed)."""
    return datetime.fromtimestamp((START_MS + index * TF_MS + 5_000) / 1000, tz=UTC)


def kline(i: int) -> list:
    open_ms = START_MS + i * TF_MS
    price = 0.05 + i * 0.0001
    return [
        open_ms,
        str(price),
        str(price * 1.01),
        str(price * 0.99),
        str(price),
        "12.5",
        open_ms + TF_MS - 1,
        "0.6",
        10,
        "6",
        "0.3",
        "0",
    ]


@pytest.fixture
def stub():
    with BinanceStub() as server:
        server.klines["ETHBTC"] = [kline(i) for i in range(60)]
        server.klines["LTCBTC"] = [kline(i) for i in range(60)]
        yield server


@pytest.fixture
def public(stub):
    return CcxtExchange("binance", base_url=stub.base_url, timeout_ms=1000, sleep=lambda s: None)


ETH_5M = StreamSpec("binance", ETH, "5m")


def stored(symbol: str = ETH) -> list[int]:
    rows = Candle.objects.filter(exchange="binance", symbol=symbol).order_by("open_time_ms")
    return [(t - START_MS) // TF_MS for t in rows.values_list("open_time_ms", flat=True)]


# --------------------------------------------------------------------------- polling


@pytest.mark.django_db
def test_first_poll_backfills_closed_candles_only(public, settings):
    settings.MARKET_POLL_BACKFILL = 10
    now = at(30)  # candle 30 is forming
    assert marketdata.market_poll(now=now, adapter=public, streams=[ETH_5M]) == {ETH_5M.label: 10}
    assert stored() == list(range(20, 30))
    assert all(c.source == "poll" for c in Candle.objects.all())
    stream = MarketStream.objects.get(exchange="binance", symbol=ETH)
    assert stream.last_received_at == now


@pytest.mark.django_db
def test_poll_after_downtime_fills_the_gap_across_pages(public, stub, settings, monkeypatch):
    settings.MARKET_POLL_BACKFILL = 5
    marketdata.market_poll(now=at(10), adapter=public, streams=[ETH_5M])
    assert stored() == [5, 6, 7, 8, 9]
    monkeypatch.setattr(marketdata, "PAGE_LIMIT", 4)
    calls_before = stub.count("GET", KLINES)
    result = marketdata.market_poll(now=at(25), adapter=public, streams=[ETH_5M])
    assert result == {ETH_5M.label: 15}
    assert stored() == list(range(5, 25))
    assert stub.count("GET", KLINES) - calls_before == 4  # 15 candles in pages of 4


@pytest.mark.django_db
def test_poll_when_up_to_date_only_confirms_freshness(public, stub, settings):
    settings.MARKET_POLL_BACKFILL = 3
    marketdata.market_poll(now=at(30), adapter=public, streams=[ETH_5M])
    calls = stub.count("GET", KLINES)
    later = at(30) + timedelta(seconds=40)  # candle 30 still forming
    assert marketdata.market_poll(now=later, adapter=public, streams=[ETH_5M]) == {ETH_5M.label: 0}
    assert stub.count("GET", KLINES) == calls
    assert MarketStream.objects.get(symbol=ETH).last_received_at == later


@pytest.mark.django_db
def test_unreachable_exchange_leaves_the_stream_silent(public, stub, settings):
    settings.MARKET_POLL_BACKFILL = 3
    ltc = StreamSpec("binance", LTC, "5m")
    marketdata.market_poll(now=at(30), adapter=public, streams=[ETH_5M, ltc])
    stub.fail("GET", KLINES, status=503, times=10)
    result = marketdata.market_poll(now=at(32), adapter=public, streams=[ETH_5M, ltc])
    assert str(result[ETH_5M.label]).startswith("error:")
    assert MarketStream.objects.get(symbol=ETH).last_received_at == at(30)
    assert stored() == [27, 28, 29]


def test_closed_bars_keeps_closed_new_unique_bars_in_order(settings):
    settings.MARKET_POLL_CLOSE_GRACE_MS = 2_000
    bars = [Bar(START_MS + i * TF_MS, 1, 1, 1, 1, 1) for i in (3, 1, 2, 2, 4)]
    now_ms = START_MS + 4 * TF_MS + 1_000  # bar 3 closed 1 s ago: inside the grace
    closed = marketdata.closed_bars(bars, TF_MS, now_ms, after_ms=START_MS)
    assert [b.open_time_ms for b in closed] == [START_MS + TF_MS, START_MS + 2 * TF_MS]


@pytest.mark.django_db
def test_configured_streams_from_settings_or_deployments(settings):
    settings.MARKET_POLL_SYMBOLS = []
    settings.MARKET_POLL_TIMEFRAMES = []
    make_deployment(symbols=[ETH, LTC], timeframe="5m")
    make_deployment(name="off", symbols=["ADA/BTC"], signals_enabled=False)
    assert [s.label for s in marketdata.configured_streams()] == [
        "binance:ETH/BTC:5m",
        "binance:LTC/BTC:5m",
    ]
    settings.MARKET_POLL_SYMBOLS = ["XRP/USDT"]
    settings.MARKET_POLL_TIMEFRAMES = ["1m", "5m"]
    assert [s.label for s in marketdata.configured_streams("kraken")] == [
        "kraken:XRP/USDT:1m",
        "kraken:XRP/USDT:5m",
    ]


# --------------------------------------------------------------------------- freshness


@pytest.mark.django_db
def test_stream_gaps_per_symbol_any_exchange_never_heard_is_infinite():
    now = datetime(2024, 1, 1, 12, tzinfo=UTC)
    dep = make_deployment(symbols=[ETH, LTC, "ADA/BTC"])
    MarketStream.objects.create(
        exchange="paper", symbol=ETH, timeframe="5m", last_received_at=now - timedelta(seconds=50)
    )
    MarketStream.objects.create(
        exchange="binance", symbol=ETH, timeframe="5m", last_received_at=now - timedelta(seconds=4)
    )
    MarketStream.objects.create(
        exchange="binance", symbol=LTC, timeframe="5m", last_received_at=now - timedelta(seconds=31)
    )
    MarketStream.objects.create(
        exchange="binance", symbol=LTC, timeframe="1m", last_received_at=now
    )
    gaps = marketdata.stream_gaps(dep, now)
    assert gaps == {ETH: 4.0, LTC: 31.0, "ADA/BTC": math.inf}
    assert marketdata.max_stream_gap_s(dep, now) == math.inf
    dep.symbols = [ETH, LTC]
    assert marketdata.max_stream_gap_s(dep, now) == 31.0
    dep.symbols = []
    assert marketdata.max_stream_gap_s(dep, now) == math.inf


# --------------------------------------------------------------------------- ccxt.pro closer


def test_kline_closer_emits_each_closed_candle_once():
    closer = KlineCloser()
    assert closer.feed([[0, 1, 1, 1, 1, 1]]) == []  # forming
    first = closer.feed([[0, 1, 2, 1, 2, 5], [300, 2, 2, 2, 2, 1]])
    assert [b.open_time_ms for b in first] == [0] and first[0].close == 2
    assert closer.feed([[0, 1, 2, 1, 2, 5], [300, 2, 3, 2, 3, 2]]) == []
    later = closer.feed([[300, 2, 3, 2, 3, 2], [600, 3, 3, 3, 3, 1], [900, 3, 3, 3, 3, 0]])
    assert [b.open_time_ms for b in later] == [300, 600]


# --------------------------------------------------------------------------- late candles


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("switch", "nolock")
def test_late_candle_is_stored_but_not_run_through_the_strategy():
    from trading.services import candles_ingest

    dep = make_deployment(symbols=[ETH], exchange="paper")

    def item(i: int) -> dict:
        price = 0.05 + (i % 7) * 0.0002
        return {
            "exchange": "paper", "symbol": ETH, "timeframe": "5m",
            "open_time_ms": START_MS + i * TF_MS, "open": price, "high": price * 1.01,
            "low": price * 0.99, "close": price, "volume": 10.0 + i,
        }  # fmt: skip

    candles_ingest(items=[item(i) for i in range(40) if i != 20], source="replay")
    processed = dep.equity.count()
    late = candles_ingest(items=[item(20)], source="replay")
    assert late.late_ids and late.to_process == []
    assert Candle.objects.get(pk=late.late_ids[0]).late
    assert dep.equity.count() == processed
    assert not dep.signals.filter(candle_id=late.late_ids[0]).exists()
