"""Paper exchange and the shared exchange helpers (validation, client ids, factory)."""

from __future__ import annotations

import threading

import pytest

from trading.exchange import (
    CLIENT_ORDER_ID_RE,
    Candle,
    CloseAllIncomplete,
    DuplicateOrder,
    ExchangeConfig,
    InsufficientFunds,
    InvalidOrder,
    MarketInfo,
    OrderRequest,
    PaperSettings,
    TemporaryExchangeError,
    build_exchange,
    client_order_id,
    closed_candles,
    validate_order,
)
from trading.exchange_paper import PaperExchange

ETH = "ETH/BTC"


def paper(**settings) -> PaperExchange:
    base = {"starting_balances": {"BTC": 1.0}, "fee_bps": 10.0, "slippage_bps": 10.0}
    ex = PaperExchange([ETH, "LTC/BTC", "BTC/USDT"], PaperSettings(**{**base, **settings}))
    ex.set_price(ETH, 0.05, 1_000)
    ex.set_price("LTC/BTC", 0.002, 1_000)
    ex.set_price("BTC/USDT", 60_000.0, 1_000)
    return ex


def buy(symbol=ETH, amount=1.0, cid="b1", **kw) -> OrderRequest:
    return OrderRequest(symbol, "buy", "market", amount, client_order_id=cid, **kw)


# --------------------------------------------------------------------------- fills


def test_market_buy_fills_with_slippage_and_fee():
    ex = paper()
    result = ex.create_order(buy(amount=2.0))
    assert result.status == "closed"
    assert result.filled == 2.0
    assert result.average == pytest.approx(0.05 * 1.001)
    notional = 2.0 * 0.05 * 1.001
    assert result.fee == pytest.approx(notional * 0.001)
    assert result.fee_currency == "BTC"
    balance = ex.fetch_balance()
    assert balance["BTC"].free == pytest.approx(1.0 - notional - result.fee)
    assert balance["ETH"].free == 2.0
    assert ex.positions() == {ETH: 2.0}


def test_slippage_works_against_the_taker_on_both_sides():
    ex = paper(slippage_random_bps=20.0, seed=7)
    for n in range(20):
        bought = ex.create_order(buy(amount=0.1, cid=f"b{n}"))
        sold = ex.create_order(OrderRequest(ETH, "sell", "market", 0.1, client_order_id=f"s{n}"))
        assert 0.05 * 1.001 <= bought.average <= 0.05 * 1.003
        assert 0.05 * 0.997 <= sold.average <= 0.05 * 0.999


def test_marketable_limit_never_fills_beyond_its_limit():
    ex = paper(slippage_bps=50.0)
    result = ex.create_order(
        OrderRequest(ETH, "buy", "limit", 1.0, price=0.05002, client_order_id="l1")
    )
    assert result.status == "closed"
    assert result.average == 0.05002


def test_resting_limit_reserves_funds_and_fills_when_price_crosses():
    ex = paper()
    order = ex.create_order(
        OrderRequest(ETH, "buy", "limit", 1.0, price=0.049, client_order_id="l1")
    )
    assert order.status == "open"
    reserved = 0.049 * 1.001
    assert ex.fetch_balance()["BTC"].used == pytest.approx(reserved)
    assert ex.set_price(ETH, 0.0495, 2_000) == []
    fills = ex.set_price(ETH, 0.0489, 3_000)
    assert [f.status for f in fills] == ["closed"]
    assert fills[0].average == 0.049  # a resting order fills at its limit
    assert ex.fetch_balance()["BTC"].used == pytest.approx(0.0)
    assert ex.fetch_balance()["BTC"].free == pytest.approx(1.0 - reserved)
    assert ex.fetch_open_orders() == []


def test_candles_fill_resting_limits_on_their_wicks():
    ex = paper()
    ex.create_order(buy(amount=1.0, cid="b"))
    ex.create_order(OrderRequest(ETH, "sell", "limit", 0.5, price=0.052, client_order_id="s"))
    assert ex.fetch_balance()["ETH"].used == 0.5
    fills = ex.on_candle(ETH, Candle(60_000, 0.05, 0.0521, 0.0499, 0.0505, 10.0))
    assert [f.client_order_id for f in fills] == ["s"]
    assert ex.fetch_ticker(ETH).last == 0.0505
    assert ex.fetch_ohlcv(ETH, "5m") == [Candle(60_000, 0.05, 0.0521, 0.0499, 0.0505, 10.0)]


def test_partial_fill_cancels_market_remainder_and_keeps_limit_remainder_open():
    ex = paper(partial_fill_probability=1.0, partial_fill_fraction=0.5)
    market = ex.create_order(buy(amount=1.0))
    assert (market.status, market.filled, market.remaining) == ("canceled", 0.5, 0.5)
    limit = ex.create_order(OrderRequest(ETH, "buy", "limit", 1.0, price=0.06, client_order_id="l"))
    assert (limit.status, limit.filled) == ("open", 0.5)
    assert ex.fetch_open_orders(ETH)[0].remaining == 0.5
    later = ex.set_price(ETH, 0.05, 2_000)
    assert later[0].filled == 0.75  # half of the rest each time it crosses
    ex.cancel_all_orders(ETH)
    assert ex.fetch_balance()["BTC"].used == pytest.approx(0.0, abs=1e-15)


def test_insufficient_funds_rejects_without_side_effects():
    ex = paper()
    before = ex.fetch_balance()
    with pytest.raises(InsufficientFunds):
        ex.create_order(buy(amount=100.0))
    with pytest.raises(InsufficientFunds):
        ex.create_order(OrderRequest(ETH, "sell", "market", 1.0, client_order_id="s"))
    with pytest.raises(InsufficientFunds):
        ex.test_order(buy(amount=100.0, cid="t"))
    assert ex.fetch_balance() == before
    assert ex.fetch_order_by_client_id(ETH, "b1") is None
    ex.create_order(buy(amount=1.0))  # the rejected id was not consumed


def test_test_order_validates_without_executing():
    ex = paper()
    ex.test_order(buy(amount=1.0))
    assert ex.fetch_balance()["BTC"].free == 1.0
    with pytest.raises(InvalidOrder, match="step size"):
        ex.test_order(buy(amount=1.00005))


def test_duplicate_client_order_id_is_rejected_and_found():
    ex = paper()
    first = ex.create_order(buy(amount=1.0, cid="same"))
    with pytest.raises(DuplicateOrder, match="duplicate client order id"):
        ex.create_order(buy(amount=1.0, cid="same"))
    assert ex.fetch_order_by_client_id(ETH, "same") == first
    assert ex.fetch_order_by_client_id("LTC/BTC", "same") is None
    assert ex.positions() == {ETH: 1.0}


def test_same_seed_same_history():
    def run(seed: int) -> list:
        ex = paper(
            seed=seed,
            slippage_random_bps=30.0,
            partial_fill_probability=0.5,
            latency_ms=20,
            latency_jitter_ms=30,
        )
        out = []
        for n in range(30):
            side = "buy" if n % 2 == 0 else "sell"
            amount = 0.2 if side == "buy" else 0.1
            out.append(
                ex.create_order(OrderRequest(ETH, side, "market", amount, client_order_id=f"o{n}"))
            )
        return [
            (r.status, r.filled, r.average, r.fee, r.timestamp_ms, r.raw["latency_ms"]) for r in out
        ]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_latency_is_simulated_and_recorded():
    slept = []
    ex = PaperExchange([ETH], PaperSettings(latency_ms=40, real_sleep=True), sleep=slept.append)
    ex.set_price(ETH, 0.05, 5_000)
    result = ex.create_order(buy(amount=1.0))
    assert result.timestamp_ms == 5_040
    assert result.raw["latency_ms"] == 40
    assert slept == [0.04]


def test_cancel_all_releases_reservations():
    ex = paper()
    ex.create_order(buy(amount=2.0, cid="b"))
    for n in range(3):
        ex.create_order(OrderRequest(ETH, "buy", "limit", 1.0, price=0.04, client_order_id=f"l{n}"))
        ex.create_order(
            OrderRequest(ETH, "sell", "limit", 0.5, price=0.07, client_order_id=f"s{n}")
        )
    free_btc = ex.fetch_balance()["BTC"].free
    canceled = ex.cancel_all_orders(ETH)
    assert len(canceled) == 6 and all(o.status == "canceled" for o in canceled)
    assert ex.fetch_open_orders() == []
    balance = ex.fetch_balance()
    assert balance["BTC"].used == pytest.approx(0.0, abs=1e-15)
    assert balance["ETH"].used == 0.0
    assert balance["BTC"].free == pytest.approx(free_btc + 3 * 0.04 * 1.001)
    assert ex.cancel_all_orders(ETH) == []


def test_close_all_ends_flat_and_reports_dust():
    ex = paper()
    ex.set_price("BTC/USDT", 60_000.0, 1_000)
    ex.create_order(buy(amount=3.0, cid="e"))
    ex.create_order(buy("LTC/BTC", amount=10.0, cid="l"))
    ex.create_order(OrderRequest(ETH, "sell", "limit", 1.0, price=0.06, client_order_id="rest"))
    ex.create_order(buy("LTC/BTC", amount=0.05, cid="tiny"))  # 0.0001 BTC: tradable now
    ex.set_price("LTC/BTC", 0.0019, 2_000)
    result = ex.close_all([ETH, "LTC/BTC", "BTC/USDT"], tag="rollback-1")
    assert ex.positions() == {}
    assert ex.fetch_open_orders() == []
    assert {o.symbol for o in result} == {ETH, "LTC/BTC"}
    assert all(o.side == "sell" and o.type == "market" and o.status == "closed" for o in result)
    assert [o.client_order_id for o in result] == [
        client_order_id("close", "rollback-1", s) for s in (ETH, "LTC/BTC")
    ]
    assert [o.client_order_id for o in result.canceled] == ["rest"]
    assert result.dust == {}

    ex.create_order(buy("LTC/BTC", amount=0.06, cid="tiny2"))
    ex.set_price("LTC/BTC", 0.0015, 3_000)  # 0.06 LTC is now below the 0.0001 BTC min notional
    dust = ex.close_all(["LTC/BTC"], tag="rollback-2")
    assert list(dust) == []
    assert dust.dust == {"LTC/BTC": 0.06}


def test_close_all_reports_failures():
    ex = paper()
    ex.create_order(buy(amount=1.0))
    ex.create_order(
        OrderRequest(ETH, "sell", "market", 1.0, client_order_id=client_order_id("close", "t", ETH))
    )
    ex.create_order(buy(amount=1.0, cid="again"))
    with pytest.raises(CloseAllIncomplete) as err:
        ex.close_all([ETH], tag="t")  # the deterministic id is taken: the close is refused
    assert isinstance(err.value.result.errors[ETH], DuplicateOrder)


def test_reduce_only_on_spot():
    ex = paper()
    ex.create_order(buy(amount=1.0))
    with pytest.raises(InvalidOrder, match="must be a sell"):
        ex.create_order(buy(amount=1.0, cid="r1", reduce_only=True))
    with pytest.raises(InvalidOrder, match="exceeds the holding"):
        ex.create_order(
            OrderRequest(ETH, "sell", "market", 2.0, client_order_id="r2", reduce_only=True)
        )
    ex.create_order(
        OrderRequest(ETH, "sell", "market", 1.0, client_order_id="r3", reduce_only=True)
    )
    assert ex.positions() == {}


def test_no_price_yet_is_temporary():
    ex = PaperExchange([ETH])
    with pytest.raises(TemporaryExchangeError):
        ex.create_order(buy())
    assert ex.can_withdraw() is False


def test_concurrent_orders_keep_books_consistent():
    ex = paper(starting_balances={"BTC": 100.0})
    errors = []

    def worker(n: int) -> None:
        try:
            for k in range(25):
                ex.create_order(buy(amount=0.1, cid=f"w{n}-{k}"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ex.positions() == {ETH: pytest.approx(20.0)}
    spent = sum(f[2] * f[3] * 1.001 for f in ex.fills)
    assert ex.fetch_balance()["BTC"].free == pytest.approx(100.0 - spent)
    assert len({f[0] for f in ex.fills}) == 200


# --------------------------------------------------------------------------- helpers


MARKET = MarketInfo(
    ETH, "ETH", "BTC", min_qty=0.001, step_size=0.001, min_notional=0.0001, tick_size=0.00001
)


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (OrderRequest(ETH, "buy", "market", 0.0), "amount must be positive"),
        (OrderRequest(ETH, "buy", "market", -1.0), "amount must be positive"),
        (OrderRequest(ETH, "buy", "market", float("nan")), "finite"),
        (OrderRequest(ETH, "hold", "market", 1.0), "side must be"),
        (OrderRequest(ETH, "buy", "stop", 1.0), "type must be"),
        (OrderRequest("DOGE/BTC", "buy", "market", 1.0), "unknown symbol"),
        (OrderRequest(ETH, "buy", "market", 0.0005), "below the minimum quantity"),
        (OrderRequest(ETH, "buy", "market", 0.0015), "not a multiple of the step size"),
        (OrderRequest(ETH, "buy", "limit", 1.0), "needs a price"),
        (OrderRequest(ETH, "buy", "limit", 1.0, price=0.050001), "tick size"),
        (OrderRequest(ETH, "buy", "limit", 0.001, price=0.05), "below the minimum notional"),
        (OrderRequest(ETH, "buy", "market", 1.0, client_order_id="bad id!"), "client order id"),
    ],
)
def test_validate_order_reasons(request_, reason):
    with pytest.raises(InvalidOrder, match=reason):
        validate_order(request_, MARKET if request_.symbol == ETH else None)


def test_validate_order_accepts_valid_orders():
    validate_order(OrderRequest(ETH, "buy", "limit", 0.123, price=0.05123), MARKET)
    validate_order(OrderRequest(ETH, "sell", "market", 0.003), MARKET)  # no reference price


def test_client_order_id_is_deterministic_and_binance_valid():
    a = client_order_id("router", "strategy-1", 1_700_000_000_000, "buy")
    assert a == client_order_id("router", "strategy-1", 1_700_000_000_000, "buy")
    assert a != client_order_id("router", "strategy-1", 1_700_000_000_001, "buy")
    long = client_order_id("a very long prefix with spaces!", "x")
    for cid in (a, long):
        assert len(cid) <= 36 and CLIENT_ORDER_ID_RE.match(cid)


def test_market_info_rounding():
    assert MARKET.floor_qty(1.23456) == 1.234
    assert MARKET.tradable_qty(0.0009, 0.05) == 0.0  # below min qty
    assert MARKET.tradable_qty(0.0019, 0.05) == 0.0  # notional 0.00005 < 0.0001
    assert MARKET.tradable_qty(0.0029, 0.05) == 0.002


def test_build_exchange_defaults_to_paper():
    ex = build_exchange(ExchangeConfig(symbols=[ETH, "XRP/USDT"]))
    assert isinstance(ex, PaperExchange)
    markets = ex.load_markets()
    assert markets["XRP/USDT"].min_notional == 5.0
    assert markets[ETH].step_size == 0.0001
    with pytest.raises(ValueError, match="unknown exchange kind"):
        build_exchange(ExchangeConfig(kind="nope"))


def test_closed_candles_drops_the_forming_one():
    candles = [Candle(t, 1.0, 1.0, 1.0, 1.0, 1.0) for t in (0, 300_000, 600_000)]
    assert closed_candles(candles, 300_000, 899_999) == candles[:2]
    assert closed_candles(candles, 300_000, 900_000) == candles
