"""The real ccxt binance client, through CcxtExchange, against the Binance stub on 127.0.0.1."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import ccxt
import pytest

from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub, StubMarket
from trading.exchange import (
    AuthenticationError,
    Balance,
    CloseAllIncomplete,
    DuplicateOrder,
    ExchangeConfig,
    InsufficientFunds,
    InvalidOrder,
    OrderNotFound,
    OrderRequest,
    OrderStatusUnknown,
    PermanentExchangeError,
    RateLimited,
    TemporaryExchangeError,
    build_exchange,
    client_order_id,
)
from trading.exchange_ccxt import CcxtExchange, _Pacer, rebase_urls, translate_error
from trading.signals import load_csv

DATA = Path(__file__).resolve().parents[2] / "data" / "market"
ETH, LTC = "ETH/BTC", "LTC/BTC"
ORDER = "/api/v3/order"


@pytest.fixture
def stub():
    with BinanceStub(timeout_sleep_s=1.0) as server:
        yield server


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_exchange(stub: BinanceStub, sleeps: list[float], **kw) -> CcxtExchange:
    params = {
        "api_key": API_KEY,
        "secret": API_SECRET,
        "base_url": stub.base_url,
        "timeout_ms": 400,
        "symbols": [ETH, LTC],
        "sleep": sleeps.append,
        "not_found_grace_s": 0.0,
    }
    params.update(kw)
    return CcxtExchange("binance", **params)


@pytest.fixture
def ex(stub, sleeps) -> CcxtExchange:
    exchange = make_exchange(stub, sleeps)
    exchange.load_markets()
    return exchange


def market_buy(amount: float, cid: str, symbol: str = ETH) -> OrderRequest:
    return OrderRequest(symbol, "buy", "market", amount, client_order_id=cid)


# --------------------------------------------------------------------------- happy paths


def test_load_markets_reads_binance_filters(ex, stub):
    markets = ex.load_markets()
    assert set(markets) == {ETH, LTC, "BTC/USDT"}
    eth = markets[ETH]
    assert (eth.base, eth.quote) == ("ETH", "BTC")
    assert (eth.min_qty, eth.step_size, eth.tick_size, eth.min_notional) == (
        0.0001,
        0.0001,
        0.00001,
        0.0001,
    )
    assert markets["BTC/USDT"].min_notional == 5.0
    paths = {r.path for r in stub.log}
    assert "/sapi/v1/capital/config/getall" not in paths  # currencies are not fetched
    assert stub.count("GET", "/api/v3/exchangeInfo") == 1


def test_time_ticker_and_klines(ex, stub):
    arrays = load_csv(DATA / "ETH_BTC-5m.csv")
    rows = list(
        zip(
            *(
                arrays[c][:50].tolist()
                for c in ("timestamp_ms", "open", "high", "low", "close", "volume")
            ),
            strict=True,
        )
    )
    stub.load_klines("ETHBTC", rows, 300_000)
    assert abs(ex.fetch_time_ms() - stub.ep_time({})["serverTime"]) < 5_000
    assert ex.fetch_ticker(ETH).last == 0.05
    candles = ex.fetch_ohlcv(ETH, "5m", since_ms=int(rows[10][0]), limit=5)
    assert [tuple(c) for c in candles] == [(int(r[0]), *r[1:]) for r in rows[10:15]]
    assert len(ex.fetch_ohlcv(ETH, "5m", limit=20)) == 20


def test_balances_orders_and_cancels(ex, stub):
    assert ex.fetch_balance()["BTC"].free == 1.0
    filled = ex.create_order(market_buy(2.0, "buy-1"))
    assert (filled.status, filled.filled, filled.average) == ("closed", 2.0, 0.05)
    assert filled.fee == pytest.approx(2.0 * 0.05 * 0.001) and filled.fee_currency == "BTC"
    assert ex.positions() == {ETH: 2.0}

    resting = ex.create_order(
        OrderRequest(ETH, "sell", "limit", 0.5, price=0.06, client_order_id="sell-1")
    )
    assert resting.status == "open"
    assert ex.fetch_balance()["ETH"].used == 0.5
    assert [o.client_order_id for o in ex.fetch_open_orders(ETH)] == ["sell-1"]
    assert ex.fetch_order_by_client_id(ETH, "sell-1").exchange_order_id == resting.exchange_order_id
    assert ex.fetch_order_by_client_id(ETH, "never-sent") is None

    canceled = ex.cancel_order(ETH, resting.exchange_order_id)
    assert canceled.status == "canceled"
    assert ex.cancel_order(ETH, resting.exchange_order_id).status == "canceled"  # idempotent
    with pytest.raises(OrderNotFound):
        ex.cancel_order(ETH, "999999")
    assert ex.fetch_open_orders() == []
    assert ex.fetch_balance()["ETH"] == Balance(2.0, 0.0)


def test_cancel_retried_after_a_lost_reply_returns_the_canceled_order(ex, stub, sleeps):
    ex.create_order(market_buy(1.0, "b"))
    resting = ex.create_order(
        OrderRequest(ETH, "sell", "limit", 0.5, price=0.06, client_order_id="s")
    )
    stub.accept_then_timeout("DELETE", ORDER)
    assert ex.cancel_order(ETH, resting.exchange_order_id).status == "canceled"
    assert stub.count("DELETE", ORDER) == 2  # the retry got -2011, the lookup saw it canceled
    assert sleeps[-1] == 0.25  # one backoff before the retry


def test_test_order_sends_to_the_test_endpoint_only(ex, stub):
    ex.test_order(market_buy(1.0, "t-1"))
    assert stub.count("POST", "/api/v3/order/test") == 1
    assert stub.count("POST", ORDER) == 0
    with pytest.raises(InvalidOrder, match="step size"):
        ex.test_order(market_buy(1.00001, "t-2"))  # refused locally, never sent
    assert stub.count("POST", "/api/v3/order/test") == 1


def test_cancel_all_orders(ex, stub):
    ex.create_order(market_buy(1.0, "b"))
    for n in range(3):
        ex.create_order(OrderRequest(ETH, "buy", "limit", 0.1, price=0.04, client_order_id=f"l{n}"))
    ex.create_order(OrderRequest(ETH, "sell", "limit", 0.1, price=0.07, client_order_id="s"))
    canceled = ex.cancel_all_orders(ETH)
    assert sorted(o.client_order_id for o in canceled) == ["l0", "l1", "l2", "s"]
    assert stub.open_orders() == []
    assert ex.cancel_all_orders(ETH) == []  # Binance's -2011 for "nothing open" is not an error


def test_can_withdraw_reports_the_key_permission(ex, stub):
    assert ex.can_withdraw() is False
    stub.can_withdraw = True
    assert ex.can_withdraw() is True


# --------------------------------------------------------------------------- retries of reads


def test_429_on_a_read_is_retried_after_retry_after(ex, stub, sleeps):
    stub.fail("GET", "/api/v3/time", status=429, retry_after=2, times=2)
    assert ex.fetch_time_ms() > 0
    assert stub.count("GET", "/api/v3/time") == 3
    assert sleeps == [2.0, 2.0]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_on_a_read_is_retried_with_backoff(ex, stub, sleeps, status):
    stub.fail("GET", "/api/v3/account", status=status, times=2)
    assert ex.fetch_balance()["BTC"].free == 1.0
    assert sleeps == [0.25, 0.5]


def test_timeout_on_a_read_is_retried(ex, stub, sleeps):
    stub.timeout("GET", "/api/v3/ticker/24hr")
    assert ex.fetch_ticker(ETH).last == 0.05
    assert len(sleeps) == 1


def test_retries_are_bounded(ex, stub, sleeps):
    stub.fail("GET", "/api/v3/openOrders", status=503, times=10)
    with pytest.raises(TemporaryExchangeError):
        ex.fetch_open_orders(ETH)
    assert stub.count("GET", "/api/v3/openOrders") == ex.max_retries + 1


def test_418_is_rate_limited_and_a_long_ban_is_not_waited_out(ex, stub, sleeps):
    stub.fail("GET", "/api/v3/account", status=418, retry_after=120)
    with pytest.raises(RateLimited) as err:
        ex.fetch_balance()
    assert err.value.retry_after_s == 120.0
    assert sleeps == []


# --------------------------------------------------------------------------- order placement


def test_accepted_then_timed_out_order_is_found_not_duplicated(ex, stub):
    stub.accept_then_timeout()
    result = ex.create_order(market_buy(1.0, "lost-reply"))
    assert result.client_order_id == "lost-reply"
    assert (result.status, result.filled) == ("closed", 1.0)
    assert stub.count("POST", ORDER) == 1
    assert len(stub.orders) == 1
    assert stub.count("GET", ORDER) >= 1


def test_5xx_on_create_with_no_order_is_reported_not_placed(ex, stub):
    stub.fail("POST", ORDER, status=502)
    with pytest.raises(TemporaryExchangeError) as err:
        ex.create_order(market_buy(1.0, "bounced"))
    assert err.value.placed is False
    assert stub.count("POST", ORDER) == 1
    assert stub.orders == {}


def test_not_found_is_trusted_only_after_the_grace_period(stub):
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    exchange = make_exchange(stub, [], sleep=sleep, clock=lambda: now[0], not_found_grace_s=6.0)
    stub.fail("POST", ORDER, status=500)
    with pytest.raises(TemporaryExchangeError) as err:
        exchange.create_order(market_buy(1.0, "late"))
    assert err.value.placed is False
    assert waits == [6.0]
    assert stub.count("GET", ORDER) == 2


def test_unresolvable_placement_fails_closed(ex, stub):
    stub.timeout("POST", ORDER)
    stub.fail("GET", ORDER, status=503, times=20)
    with pytest.raises(OrderStatusUnknown) as err:
        ex.create_order(market_buy(1.0, "dark"))
    assert (err.value.symbol, err.value.client_order_id) == (ETH, "dark")
    assert stub.count("POST", ORDER) == 1
    assert stub.count("GET", ORDER) == ex.lookup_attempts


def test_rate_limited_create_is_not_looked_up(ex, stub):
    stub.fail("POST", ORDER, status=429, retry_after=1)
    with pytest.raises(RateLimited) as err:
        ex.create_order(market_buy(1.0, "busy"))
    assert err.value.placed is False and err.value.retry_after_s == 1.0
    assert stub.count("GET", ORDER) == 0


def test_rate_limited_create_holds_the_next_order_back(ex, stub, sleeps):
    stub.fail("POST", ORDER, status=429, retry_after=3)
    with pytest.raises(RateLimited) as err:
        ex.create_order(market_buy(1.0, "refused"))
    assert err.value.retry_after_s == 3.0
    assert ex.create_order(market_buy(1.0, "after")).status == "closed"
    assert sleeps and 2.0 < sleeps[-1] <= 3.0
    assert stub.count("POST", ORDER) == 2


def test_retry_after_is_read_from_the_reply_of_the_failing_request(ex, stub):
    stub.fail("GET", "/api/v3/account", status=429, retry_after=7)
    try:
        ex.client.fetch_balance()
    except ccxt.BaseError as exc:
        ex.client.last_response_headers = {"Retry-After": "99"}  # another thread's reply
        assert ex._translate(exc).retry_after_s == 7.0
    else:
        raise AssertionError("the stub did not rate limit")


def test_retry_after_as_an_http_date():
    when = datetime.now(UTC) + timedelta(seconds=20)
    error = translate_error(ccxt.DDoSProtection("x"), {"Retry-After": format_datetime(when)})
    assert 15.0 < error.retry_after_s <= 20.0
    stale = translate_error(
        ccxt.DDoSProtection("x"), {"Retry-After": "Mon, 01 Jan 2001 00:00:00 GMT"}
    )
    assert stale.retry_after_s == 0.0


def test_418_on_create_is_rate_limited(ex, stub):
    stub.fail("POST", ORDER, status=418, retry_after=60)
    with pytest.raises(RateLimited):
        ex.create_order(market_buy(1.0, "banned"))
    assert stub.count("POST", ORDER) == 1


def test_binance_insufficient_balance_code(ex, stub):
    stub.fail(
        "POST",
        ORDER,
        status=400,
        code=-2010,
        msg="Account has insufficient balance for requested action.",
    )
    with pytest.raises(InsufficientFunds):
        ex.create_order(market_buy(1.0, "poor"))
    with pytest.raises(InsufficientFunds):
        ex.create_order(market_buy(100.0, "really-poor"))  # the stub's own balance check
    assert stub.count("POST", ORDER) == 2


@pytest.mark.parametrize(
    "msg", ["Filter failure: LOT_SIZE", "Filter failure: NOTIONAL", "Filter failure: PRICE_FILTER"]
)
def test_binance_filter_failures_are_invalid_orders(ex, stub, msg):
    stub.fail("POST", ORDER, status=400, code=-1013, msg=msg)
    with pytest.raises(InvalidOrder):
        ex.create_order(market_buy(1.0, "filtered"))
    assert stub.count("POST", ORDER) == 1
    assert stub.count("GET", ORDER) == 0


def test_duplicate_open_client_order_id(ex, stub):
    ex.create_order(market_buy(1.0, "b"))
    ex.create_order(OrderRequest(ETH, "sell", "limit", 0.1, price=0.07, client_order_id="dup"))
    with pytest.raises(DuplicateOrder):
        ex.create_order(OrderRequest(ETH, "sell", "limit", 0.1, price=0.07, client_order_id="dup"))


def test_local_validation_stops_bad_orders_before_the_exchange(ex, stub):
    with pytest.raises(InvalidOrder, match="below the minimum quantity"):
        ex.create_order(OrderRequest(LTC, "buy", "market", 0.0001, client_order_id="x"))
    with pytest.raises(InvalidOrder, match="unknown symbol"):
        ex.create_order(market_buy(1.0, "y", symbol="DOGE/BTC"))
    assert stub.count("POST", ORDER) == 0


def test_bad_credentials_are_authentication_errors(stub, sleeps):
    for key, secret in (("wrong-key", API_SECRET), (API_KEY, "wrong-secret")):
        exchange = make_exchange(stub, sleeps, api_key=key, secret=secret)
        with pytest.raises(AuthenticationError):
            exchange.fetch_balance()
    assert sleeps == []


def test_orders_are_paced_under_the_exchange_limit():
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    pacer = _Pacer(8.0, lambda: now[0], sleep)
    for _ in range(17):
        pacer.wait()
    assert now[0] == pytest.approx(2.0)  # 17 orders need 16 gaps of 1/8 s
    assert len(waits) == 16


# --------------------------------------------------------------------------- close_all


def test_close_all_ends_flat(ex, stub):
    stub.markets["XRPBTC"] = StubMarket(
        "XRPBTC", "XRP", "BTC", 0.00002, "1", "1", "0.00000001", "0.0001"
    )
    stub.set_price("XRPBTC", 0.00002)
    ex.load_markets(reload=True)
    ex.create_order(market_buy(3.0, "e"))
    ex.create_order(market_buy(20.0, "l", symbol=LTC))
    ex.create_order(OrderRequest(ETH, "sell", "limit", 1.0, price=0.06, client_order_id="rest-1"))
    ex.create_order(OrderRequest(LTC, "buy", "limit", 1.0, price=0.001, client_order_id="rest-2"))
    ex.create_order(market_buy(10.0, "x", symbol="XRP/BTC"))
    stub.set_price("XRPBTC", 0.000005)  # 10 XRP are now worth 0.00005 BTC: below min notional

    result = ex.close_all([ETH, LTC, "XRP/BTC"], tag="rollback-7")
    assert sorted(o.client_order_id for o in result.canceled) == ["rest-1", "rest-2"]
    assert {o.symbol: o.filled for o in result} == {ETH: 3.0, LTC: 20.0}
    assert all(
        o.client_order_id == client_order_id("close", "rollback-7", o.symbol) for o in result
    )
    assert result.dust == {"XRP/BTC": 10.0}
    assert ex.positions([ETH, LTC]) == {}
    assert stub.open_orders() == []
    assert stub.balance("ETH") == (0, 0) and stub.balance("LTC") == (0, 0)


def test_close_all_reports_a_symbol_it_could_not_close(ex, stub):
    ex.create_order(market_buy(1.0, "e"))
    stub.fail(
        "POST",
        ORDER,
        status=400,
        code=-2010,
        msg="Account has insufficient balance for requested action.",
    )
    with pytest.raises(CloseAllIncomplete) as err:
        ex.close_all([ETH], tag="t")
    assert isinstance(err.value.result.errors[ETH], InsufficientFunds)


# --------------------------------------------------------------------------- wiring


def test_build_exchange_ccxt_points_at_the_stub(stub):
    config = ExchangeConfig(
        kind="ccxt",
        symbols=[ETH],
        api_key=API_KEY,
        api_secret=API_SECRET,
        base_url=stub.base_url,
        timeout_ms=400,
    )
    exchange = build_exchange(config)
    assert isinstance(exchange, CcxtExchange)
    assert exchange.not_found_grace_s == 6.0  # recvWindow 5 s + 1 s
    assert build_exchange(replace(config, not_found_grace_s=0.5)).not_found_grace_s == 0.5
    assert exchange.fetch_balance()["BTC"].free == 1.0


def test_rebase_urls_keeps_paths():
    urls = ccxt.binance().urls["api"]
    rebased = rebase_urls(urls, "http://127.0.0.1:9/")
    assert rebased["public"] == "http://127.0.0.1:9/api/v3"
    assert rebased["private"] == "http://127.0.0.1:9/api/v3"
    assert rebased["sapi"] == "http://127.0.0.1:9/sapi/v1"
    assert set(rebased) == set(urls)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ccxt.RateLimitExceeded("x"), RateLimited),
        (ccxt.DDoSProtection("x"), RateLimited),
        (ccxt.RequestTimeout("x"), TemporaryExchangeError),
        (ccxt.ExchangeNotAvailable("x"), TemporaryExchangeError),
        (ccxt.OnMaintenance("x"), TemporaryExchangeError),
        (ccxt.NetworkError("x"), TemporaryExchangeError),
        (ccxt.InsufficientFunds("x"), InsufficientFunds),
        (ccxt.InvalidOrder("x"), InvalidOrder),
        (ccxt.OrderNotFound("x"), OrderNotFound),
        (ccxt.AuthenticationError("x"), AuthenticationError),
        (ccxt.PermissionDenied("x"), AuthenticationError),
        (ccxt.BadRequest('binance {"code":-1013,"msg":"Filter failure: NOTIONAL"}'), InvalidOrder),
        (
            ccxt.BadRequest('binance {"code":-1104,"msg":"Not all sent parameters were read"}'),
            PermanentExchangeError,
        ),
        (ccxt.ExchangeError("x"), PermanentExchangeError),
    ],
)
def test_translate_error(error, expected):
    translated = translate_error(error, {"Retry-After": "3"})
    assert type(translated) is expected
    if expected is RateLimited:
        assert translated.retry_after_s == 3.0
