"""Simulated spot exchange: fills against the latest fed price, deterministic under a seed."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .exchange import (
    Balance,
    Candle,
    DuplicateOrder,
    ExchangeAdapter,
    ExchangeConfig,
    InsufficientFunds,
    InvalidOrder,
    MarketInfo,
    OrderNotFound,
    OrderRequest,
    OrderResult,
    PaperSettings,
    TemporaryExchangeError,
    Ticker,
    check_reduce_only,
    client_order_id,
    floor_to_step,
    validate_order,
)

STABLE_QUOTES = frozenset({"USDT", "USDC", "FDUSD", "BUSD", "TUSD", "DAI", "EUR", "USD"})
CANDLES_KEPT = 1000
QTY_DECIMALS = 12


def _clean(qty: float) -> float:
    """Drop float noise from base quantities (steps are far coarser than 1e-12)."""
    return round(qty, QTY_DECIMALS) + 0.0


def default_market(symbol: str) -> MarketInfo:
    """Binance-like filters by quote asset: BTC-quoted alts, stablecoin pairs, the rest."""
    base, _, quote = symbol.partition("/")
    if not base or not quote:
        raise ValueError(f"symbol must look like 'BASE/QUOTE', got {symbol!r}")
    if quote in STABLE_QUOTES:
        return MarketInfo(symbol, base, quote, 0.00001, 0.00001, 5.0, 0.0001)
    if quote == "BTC":
        return MarketInfo(symbol, base, quote, 0.0001, 0.0001, 0.0001, 0.00000001)
    return MarketInfo(symbol, base, quote, 0.00001, 0.00001, 0.0, 0.00000001)


@dataclass
class _Order:
    id: str
    request: OrderRequest
    market: MarketInfo
    timestamp_ms: int
    latency_ms: int
    status: str = "open"
    filled: float = 0.0
    cost: float = 0.0
    fee: float = 0.0
    reserved: float = 0.0
    fills: list[tuple[float, float]] = field(default_factory=list)

    @property
    def remaining(self) -> float:
        return self.request.amount - self.filled

    def result(self) -> OrderResult:
        req = self.request
        return OrderResult(
            exchange_order_id=self.id,
            client_order_id=req.client_order_id,
            symbol=req.symbol,
            side=req.side,
            type=req.type,
            status=self.status,
            amount=req.amount,
            filled=self.filled,
            average=self.cost / self.filled if self.filled else None,
            fee=self.fee,
            fee_currency=self.market.quote,
            timestamp_ms=self.timestamp_ms,
            raw={"latency_ms": self.latency_ms, "fills": list(self.fills), "paper": True},
        )


class PaperExchange(ExchangeAdapter):
    """Spot paper trading. Fees are charged in the quote asset on both sides.

    Market orders fill at the last price moved against the taker by `slippage_bps` (+ a
    uniform random part up to `slippage_random_bps`). A marketable limit fills the same way
    but never beyond its limit; a resting limit fills at its limit when a later price or
    candle crosses it. With probability `partial_fill_probability` a fill covers only
    `partial_fill_fraction` of the remainder: a market order's rest is canceled, a limit's
    rest stays open. Client order ids are unique for the life of the exchange (stricter
    than Binance, which only refuses a duplicate among open orders).
    """

    name = "paper"

    def __init__(
        self,
        symbols: Sequence[str],
        settings: PaperSettings | None = None,
        *,
        markets: Mapping[str, MarketInfo] | None = None,
        clock_ms: Callable[[], int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.settings = settings or PaperSettings()
        given = dict(markets or {})
        self._markets = {s: given.get(s) or default_market(s) for s in symbols}
        self._markets.update(given)
        self._clock_ms = clock_ms
        self._sleep = sleep
        self._lock = threading.RLock()
        self._rng = random.Random(self.settings.seed)
        self._free: dict[str, float] = {
            k: float(v) for k, v in self.settings.starting_balances.items()
        }
        self._used: dict[str, float] = {}
        self._prices: dict[str, tuple[float, int]] = {}
        self._now_ms = 0
        self._positions: dict[str, float] = {}
        self._orders: dict[str, _Order] = {}
        self._by_client: dict[str, str] = {}
        self._candles: dict[str, deque[Candle]] = {}
        self._seq = 0

    @classmethod
    def from_config(cls, config: ExchangeConfig) -> PaperExchange:
        return cls(config.symbols, config.paper)

    # ------------------------------------------------------------------ market data feed

    def set_price(self, symbol: str, price: float, ts_ms: int) -> list[OrderResult]:
        """Move the price; resting limits it crosses fill at their limit. Returns those fills."""
        if not price > 0:
            raise ValueError(f"price must be positive, got {price!r}")
        with self._lock:
            self._market(symbol)
            self._prices[symbol] = (float(price), int(ts_ms))
            self._now_ms = max(self._now_ms, int(ts_ms))
            return self._match_resting(symbol, price, price)

    def on_candle(self, symbol: str, candle: Candle, ts_ms: int | None = None) -> list[OrderResult]:
        """Feed a closed candle: limits are matched against its low/high, then last = close."""
        with self._lock:
            self._market(symbol)
            candles = self._candles.setdefault(symbol, deque(maxlen=CANDLES_KEPT))
            candles.append(Candle(*candle))
            when = int(candle[0] if ts_ms is None else ts_ms)
            self._now_ms = max(self._now_ms, when)
            fills = self._match_resting(symbol, candle[3], candle[2])
            self._prices[symbol] = (float(candle[4]), when)
            return fills

    # ------------------------------------------------------------------ reads

    def load_markets(self, reload: bool = False) -> dict[str, MarketInfo]:
        return dict(self._markets)

    def fetch_time_ms(self) -> int:
        if self._clock_ms is not None:
            return int(self._clock_ms())
        with self._lock:
            return self._now_ms or int(time.time() * 1000)

    def fetch_ohlcv(
        self, symbol: str, timeframe: str, since_ms: int | None = None, limit: int = 500
    ) -> list[Candle]:
        with self._lock:
            self._market(symbol)
            candles = list(self._candles.get(symbol, ()))
        if since_ms is None:
            return candles[-limit:] if limit > 0 else []
        return [c for c in candles if c.open_time_ms >= since_ms][:limit]

    def fetch_ticker(self, symbol: str) -> Ticker:
        with self._lock:
            price, ts = self._price(symbol)
        return Ticker(symbol=symbol, last=price, bid=price, ask=price, timestamp_ms=ts)

    def fetch_balance(self) -> dict[str, Balance]:
        with self._lock:
            assets = sorted(set(self._free) | set(self._used))
            return {a: Balance(self._free.get(a, 0.0), self._used.get(a, 0.0)) for a in assets}

    def fetch_order_by_client_id(self, symbol: str, client_order_id: str) -> OrderResult | None:
        with self._lock:
            order_id = self._by_client.get(client_order_id)
            order = self._orders.get(order_id) if order_id else None
            if order is None or order.request.symbol != symbol:
                return None
            return order.result()

    def fetch_open_orders(self, symbol: str | None = None) -> list[OrderResult]:
        with self._lock:
            return [o.result() for o in self._open(symbol)]

    def positions(self, symbols: Sequence[str] | None = None) -> dict[str, float]:
        with self._lock:
            wanted = set(symbols) if symbols is not None else set(self._positions)
            return {s: q for s, q in self._positions.items() if s in wanted and q > 0}

    def can_withdraw(self) -> bool | None:
        return False

    @property
    def fills(self) -> list[tuple[str, str, float, float]]:
        """(client order id, side, qty, price) of every fill so far, in order."""
        with self._lock:
            rows = [
                (o.request.client_order_id, o.request.side, q, p)
                for o in self._orders.values()
                for q, p in o.fills
            ]
        return rows

    # ------------------------------------------------------------------ orders

    def test_order(self, request: OrderRequest) -> None:
        with self._lock:
            request = self._with_client_id(request)
            market, price = self._checked(request)
            self._check_funds(request, market, price)

    def create_order(self, request: OrderRequest) -> OrderResult:
        latency = self._draw_latency()
        if self.settings.real_sleep and latency:
            self._sleep(latency / 1000)
        with self._lock:
            request = self._with_client_id(request)
            market, price = self._checked(request)
            if request.client_order_id in self._by_client:
                raise DuplicateOrder(f"duplicate client order id {request.client_order_id!r}")
            self._check_funds(request, market, price)
            order = self._new_order(request, market, latency)
            if request.type == "market":
                self._fill_market(order, price)
            else:
                self._place_limit(order, price)
            return order.result()

    def cancel_order(self, symbol: str, order_id: str) -> OrderResult:
        with self._lock:
            order = self._orders.get(order_id)
            if order is None or order.request.symbol != symbol or order.status != "open":
                raise OrderNotFound(f"Unknown order sent: {symbol} {order_id}")
            self._cancel(order)
            return order.result()

    def cancel_all_orders(self, symbol: str) -> list[OrderResult]:
        with self._lock:
            self._market(symbol)
            canceled = []
            for order in self._open(symbol):
                self._cancel(order)
                canceled.append(order.result())
            return canceled

    # ------------------------------------------------------------------ internals

    def _market(self, symbol: str) -> MarketInfo:
        market = self._markets.get(symbol)
        if market is None:
            raise InvalidOrder(f"unknown symbol {symbol!r}")
        return market

    def _price(self, symbol: str) -> tuple[float, int]:
        self._market(symbol)
        if symbol not in self._prices:
            raise TemporaryExchangeError(f"no price for {symbol} yet")
        return self._prices[symbol]

    def _open(self, symbol: str | None) -> list[_Order]:
        return [
            o
            for o in self._orders.values()
            if o.status == "open" and (symbol is None or o.request.symbol == symbol)
        ]

    def _with_client_id(self, request: OrderRequest) -> OrderRequest:
        if request.client_order_id:
            return request
        self._seq += 1
        return replace(
            request, client_order_id=client_order_id("paper", self.settings.seed, self._seq)
        )

    def _checked(self, request: OrderRequest) -> tuple[MarketInfo, float]:
        market = self._markets.get(request.symbol)
        price = self._price(request.symbol)[0] if market is not None else 0.0
        reference = request.price if request.type == "limit" else price
        validate_order(replace(request, price=reference), market)
        assert market is not None
        check_reduce_only(request, self._positions.get(request.symbol, 0.0))
        return market, price

    def _fee(self, notional: float) -> float:
        return notional * self.settings.fee_bps / 10_000

    def _check_funds(self, request: OrderRequest, market: MarketInfo, price: float) -> None:
        if request.side == "sell":
            have, need, asset = self._free.get(market.base, 0.0), request.amount, market.base
        else:
            worst = self._slipped(price, "buy", random_part=self.settings.slippage_random_bps)
            if request.type == "limit":
                worst = request.price or worst
            notional = request.amount * worst
            have, need, asset = (
                self._free.get(market.quote, 0.0),
                notional + self._fee(notional),
                market.quote,
            )
        if need > have:
            raise InsufficientFunds(
                f"Account has insufficient balance for requested action: need {need:.10g} {asset}, free {have:.10g}"
            )

    def _draw_latency(self) -> int:
        with self._lock:
            jitter = self.settings.latency_jitter_ms
            return self.settings.latency_ms + (self._rng.randint(0, jitter) if jitter > 0 else 0)

    def _new_order(self, request: OrderRequest, market: MarketInfo, latency: int) -> _Order:
        self._seq += 1
        order = _Order(
            id=str(self._seq),
            request=request,
            market=market,
            timestamp_ms=self.fetch_time_ms() + latency,
            latency_ms=latency,
        )
        self._orders[order.id] = order
        self._by_client[request.client_order_id] = order.id
        return order

    def _slipped(self, price: float, side: str, random_part: float | None = None) -> float:
        bps = self.settings.slippage_bps
        if random_part is None:
            random_part = (
                self._rng.uniform(0, self.settings.slippage_random_bps)
                if self.settings.slippage_random_bps > 0
                else 0.0
            )
        bps += random_part
        sign = 1 if side == "buy" else -1
        return price * (1 + sign * bps / 10_000)

    def _fill_qty(self, order: _Order) -> float:
        remaining = order.remaining
        if self.settings.partial_fill_probability <= 0:
            return remaining
        if self._rng.random() >= self.settings.partial_fill_probability:
            return remaining
        part = floor_to_step(
            remaining * self.settings.partial_fill_fraction, order.market.step_size
        )
        return part if 0 < part < remaining and part >= order.market.min_qty else remaining

    def _fill_market(self, order: _Order, price: float) -> None:
        qty = self._fill_qty(order)
        self._apply_fill(order, qty, self._slipped(price, order.request.side))
        order.status = "closed" if order.remaining <= 0 else "canceled"

    def _place_limit(self, order: _Order, price: float) -> None:
        req, market = order.request, order.market
        limit = float(req.price or 0.0)
        if req.side == "buy":
            order.reserved = req.amount * limit + self._fee(req.amount * limit)
            self._move(market.quote, order.reserved)
        else:
            order.reserved = req.amount
            self._move(market.base, order.reserved)
        if (req.side == "buy" and limit >= price) or (req.side == "sell" and limit <= price):
            slipped = self._slipped(price, req.side)
            fill_price = min(slipped, limit) if req.side == "buy" else max(slipped, limit)
            self._apply_fill(order, self._fill_qty(order), fill_price)

    def _move(self, asset: str, amount: float) -> None:
        """free -> used (reserve) for a positive amount, used -> free for a negative one."""
        self._free[asset] = self._free.get(asset, 0.0) - amount
        self._used[asset] = self._used.get(asset, 0.0) + amount

    def _release(self, order: _Order, qty: float) -> None:
        if order.reserved <= 0 or order.remaining <= 0:
            return
        part = order.reserved * (qty / order.remaining)
        order.reserved -= part
        asset = order.market.quote if order.request.side == "buy" else order.market.base
        self._move(asset, -part)

    def _apply_fill(self, order: _Order, qty: float, price: float) -> None:
        if qty <= 0:
            return
        req, market = order.request, order.market
        self._release(order, qty)
        notional = qty * price
        fee = self._fee(notional)
        signed = qty if req.side == "buy" else -qty
        self._free[market.quote] = self._free.get(market.quote, 0.0) - signed * price - fee
        self._free[market.base] = _clean(self._free.get(market.base, 0.0) + signed)
        self._positions[req.symbol] = _clean(self._positions.get(req.symbol, 0.0) + signed)
        order.filled += qty
        order.cost += notional
        order.fee += fee
        order.fills.append((qty, price))
        if order.request.type == "limit" and order.remaining <= 0:
            order.status = "closed"

    def _cancel(self, order: _Order) -> None:
        self._release(order, order.remaining)
        order.status = "canceled"

    def _match_resting(self, symbol: str, low: float, high: float) -> list[OrderResult]:
        results = []
        for order in self._open(symbol):
            limit = float(order.request.price or 0.0)
            side = order.request.side
            if (side == "buy" and low <= limit) or (side == "sell" and high >= limit):
                self._apply_fill(order, self._fill_qty(order), limit)
                results.append(order.result())
        return results
