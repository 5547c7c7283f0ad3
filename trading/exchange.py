"""The one exchange interface of the project, its data types and its errors.

Pure Python: no Django, no ccxt. Adapters: `exchange_paper.PaperExchange` (simulated) and
`exchange_ccxt.CcxtExchange` (real venues through ccxt). Pick one with `build_exchange`.
"""

from __future__ import annotations

import hashlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, NamedTuple, TypeVar

Side = Literal["buy", "sell"]
OrderType = Literal["market", "limit"]
OrderStatus = Literal["open", "closed", "canceled", "rejected", "expired"]

SIDES: tuple[str, ...] = ("buy", "sell")
ORDER_TYPES: tuple[str, ...] = ("market", "limit")
FINAL_STATUSES: frozenset[str] = frozenset({"closed", "canceled", "rejected", "expired"})
CLIENT_ORDER_ID_RE = re.compile(r"^[\.A-Z\:/a-z0-9_-]{1,36}$")
CLIENT_ORDER_ID_MAX = 36


# --------------------------------------------------------------------------- errors


class ExchangeError(Exception):
    """Base of every error an adapter raises."""


class TemporaryExchangeError(ExchangeError):
    """Network trouble, timeout, 5xx, maintenance: the same call may succeed later.

    `placed` is set by `create_order` only: False when the exchange confirmed (by a lookup
    of the client order id) that the order does not exist, so it is safe to send again.
    """

    def __init__(self, message: str = "", *, placed: bool | None = None):
        super().__init__(message)
        self.placed = placed


class RateLimited(TemporaryExchangeError):
    """HTTP 429/418 or a Binance rate-limit code. Back off at least `retry_after_s`."""

    def __init__(
        self, message: str = "", *, retry_after_s: float | None = None, placed: bool | None = None
    ):
        super().__init__(message, placed=placed)
        self.retry_after_s = retry_after_s


class PermanentExchangeError(ExchangeError):
    """The exchange refused the request; repeating it unchanged will fail again."""


class InsufficientFunds(PermanentExchangeError):
    pass


class InvalidOrder(PermanentExchangeError):
    """Filter failures (LOT_SIZE, PRICE_FILTER, NOTIONAL), bad size, unknown symbol..."""


class DuplicateOrder(InvalidOrder):
    """An order with this client order id already exists."""


class OrderNotFound(InvalidOrder):
    """Cancel or lookup of an order the exchange does not know."""


class AuthenticationError(PermanentExchangeError):
    """Bad key, bad signature, or the key lacks the permission."""


class OrderStatusUnknown(ExchangeError):
    """A placement whose outcome could not be determined, even after looking it up.

    Fail closed: treat the order as possibly live and reconcile before trading on.
    """

    def __init__(self, message: str, *, symbol: str, client_order_id: str):
        super().__init__(message)
        self.symbol = symbol
        self.client_order_id = client_order_id


class CloseAllIncomplete(ExchangeError):
    """close_all could not flatten every symbol; `result` holds what was done."""

    def __init__(self, result: CloseAllResult):
        failed = ", ".join(f"{s}: {e}" for s, e in result.errors.items())
        super().__init__(f"close_all incomplete: {failed}")
        self.result = result


# --------------------------------------------------------------------------- data


class Candle(NamedTuple):
    open_time_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float


def _decimal(value: float) -> Decimal:
    return Decimal(repr(float(value)))


def is_multiple(value: float, step: float) -> bool:
    """Exact decimal check that `value` is a whole number of `step`s (step <= 0: no rule)."""
    if step <= 0:
        return True
    return _decimal(value) % _decimal(step) == 0


def floor_to_step(value: float, step: float) -> float:
    if step <= 0:
        return float(value)
    d_step = _decimal(step)
    return float((_decimal(value) // d_step) * d_step)


@dataclass(frozen=True)
class MarketInfo:
    symbol: str
    base: str
    quote: str
    min_qty: float = 0.0
    step_size: float = 0.0
    min_notional: float = 0.0
    tick_size: float = 0.0
    max_qty: float | None = None

    def floor_qty(self, qty: float) -> float:
        return floor_to_step(qty, self.step_size)

    def floor_price(self, price: float) -> float:
        return floor_to_step(price, self.tick_size)

    def tradable_qty(self, qty: float, price: float | None) -> float:
        """`qty` rounded down to the step, or 0.0 when that is below min qty / min notional."""
        rounded = self.floor_qty(qty)
        if rounded <= 0 or rounded < self.min_qty:
            return 0.0
        if price is not None and rounded * price < self.min_notional:
            return 0.0
        return rounded


@dataclass(frozen=True)
class Balance:
    free: float
    used: float = 0.0

    @property
    def total(self) -> float:
        return self.free + self.used


@dataclass(frozen=True)
class Ticker:
    symbol: str
    last: float
    bid: float | None = None
    ask: float | None = None
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class OrderRequest:
    """What to send. For a market order `price` is only a reference price used to check the
    minimum notional; it is never sent to the exchange."""

    symbol: str
    side: str
    type: str
    amount: float
    price: float | None = None
    client_order_id: str = ""
    reduce_only: bool = False


@dataclass(frozen=True)
class OrderResult:
    exchange_order_id: str
    client_order_id: str
    symbol: str
    side: str
    type: str
    status: str
    amount: float
    filled: float
    average: float | None
    fee: float
    fee_currency: str | None
    timestamp_ms: int | None
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def remaining(self) -> float:
        return max(self.amount - self.filled, 0.0)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class CloseAllResult(list[OrderResult]):
    """The close orders sent by close_all, plus what could not be sold.

    `dust`: symbol -> base quantity left because it is below the step, min qty or min
    notional. `errors`: symbol -> the error that stopped its close (close_all raises
    CloseAllIncomplete when this is not empty).
    """

    def __init__(self, orders: Iterable[OrderResult] = ()):
        super().__init__(orders)
        self.dust: dict[str, float] = {}
        self.errors: dict[str, ExchangeError] = {}
        self.canceled: list[OrderResult] = []


@dataclass(frozen=True)
class PaperSettings:
    starting_balances: Mapping[str, float] = field(default_factory=lambda: {"BTC": 1.0})
    fee_bps: float = 10.0
    slippage_bps: float = 2.0
    slippage_random_bps: float = 0.0
    latency_ms: int = 0
    latency_jitter_ms: int = 0
    partial_fill_probability: float = 0.0
    partial_fill_fraction: float = 0.5
    seed: int = 0
    real_sleep: bool = False


@dataclass(frozen=True)
class ExchangeConfig:
    """How to build the adapter. Secrets are passed in by the caller (read from env there)."""

    kind: str = "paper"
    symbols: Sequence[str] = ("ETH/BTC",)
    exchange_id: str = "binance"
    api_key: str = ""
    api_secret: str = ""
    sandbox: bool = False
    base_url: str | None = None
    timeout_ms: int = 10_000
    max_retries: int = 3
    orders_per_second: float = 8.0
    max_workers: int = 4
    not_found_grace_s: float | None = None  # ccxt: None = recvWindow + 1 s
    paper: PaperSettings = field(default_factory=PaperSettings)


# --------------------------------------------------------------------------- helpers


def client_order_id(prefix: str, *parts: object) -> str:
    """Deterministic Binance-valid client order id: `prefix-<sha1 of parts>`, <= 36 chars.

    The same prefix and parts always give the same id, so a retried intent cannot create a
    second order. The prefix is cleaned to allowed characters and cut to 12 chars.
    """
    clean = re.sub(r"[^A-Za-z0-9_-]", "", prefix)[:12] or "x"
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"{clean}-{digest}"[:CLIENT_ORDER_ID_MAX]


def _basic_errors(request: OrderRequest) -> str | None:
    if request.side not in SIDES:
        return f"side must be one of {SIDES}, got {request.side!r}"
    if request.type not in ORDER_TYPES:
        return f"type must be one of {ORDER_TYPES}, got {request.type!r}"
    amount = request.amount
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
        return f"amount must be a finite number, got {amount!r}"
    if amount <= 0:
        return f"amount must be positive, got {amount}"
    price = request.price
    if price is not None and (not math.isfinite(price) or price <= 0):
        return f"price must be a positive finite number, got {price!r}"
    if request.type == "limit" and price is None:
        return "a limit order needs a price"
    if request.client_order_id and not CLIENT_ORDER_ID_RE.match(request.client_order_id):
        return f"client order id {request.client_order_id!r} does not match {CLIENT_ORDER_ID_RE.pattern}"
    return None


def _filter_errors(request: OrderRequest, market: MarketInfo) -> str | None:
    amount = request.amount
    if amount < market.min_qty:
        return f"amount {amount} is below the minimum quantity {market.min_qty} of {market.symbol}"
    if market.max_qty is not None and amount > market.max_qty:
        return f"amount {amount} is above the maximum quantity {market.max_qty} of {market.symbol}"
    if not is_multiple(amount, market.step_size):
        return f"amount {amount} is not a multiple of the step size {market.step_size} of {market.symbol}"
    if request.type == "limit" and not is_multiple(request.price or 0.0, market.tick_size):
        return f"price {request.price} is not a multiple of the tick size {market.tick_size} of {market.symbol}"
    if request.price is not None and amount * request.price < market.min_notional:
        notional = amount * request.price
        return f"notional {notional:.10g} is below the minimum notional {market.min_notional} of {market.symbol}"
    return None


def validate_order(request: OrderRequest, market: MarketInfo | None) -> None:
    """Raise InvalidOrder with a clear reason if `request` cannot pass the market's filters.

    The min-notional rule needs a price: the limit price, or for a market order the
    reference price in `request.price` (skipped when absent).
    """
    reason = _basic_errors(request)
    if reason is None and (market is None or market.symbol != request.symbol):
        reason = f"unknown symbol {request.symbol!r}"
    if reason is None and market is not None:
        reason = _filter_errors(request, market)
    if reason is not None:
        raise InvalidOrder(reason)


def closed_candles(candles: Iterable[Candle], timeframe_ms: int, now_ms: int) -> list[Candle]:
    """Drop candles still forming at `now_ms`: exchanges return the current one too, and a
    SignalEngine ignores a second candle with the same open time."""
    return [c for c in candles if c.open_time_ms + timeframe_ms <= now_ms]


def check_reduce_only(request: OrderRequest, held: float) -> None:
    """Spot has no shorts: a reduce-only order must be a sell of at most the holding."""
    if not request.reduce_only:
        return
    if request.side != "sell":
        raise InvalidOrder("a reduce-only order on spot must be a sell")
    if request.amount > held * (1 + 1e-12):
        raise InvalidOrder(f"reduce-only sell of {request.amount} exceeds the holding {held}")


T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------- interface


class ExchangeAdapter(ABC):
    """Spot exchange as the control plane sees it. Every method may raise ExchangeError."""

    name: str = "exchange"

    @abstractmethod
    def load_markets(self, reload: bool = False) -> dict[str, MarketInfo]: ...

    @abstractmethod
    def fetch_time_ms(self) -> int: ...

    @abstractmethod
    def fetch_ohlcv(
        self, symbol: str, timeframe: str, since_ms: int | None = None, limit: int = 500
    ) -> list[Candle]: ...

    @abstractmethod
    def fetch_ticker(self, symbol: str) -> Ticker: ...

    @abstractmethod
    def fetch_balance(self) -> dict[str, Balance]: ...

    @abstractmethod
    def create_order(self, request: OrderRequest) -> OrderResult:
        """Validate, then place once. Raises PermanentExchangeError subclasses on refusal,
        TemporaryExchangeError with `placed=False` when it is safe to send the same request
        again, OrderStatusUnknown when the order may or may not exist."""

    @abstractmethod
    def test_order(self, request: OrderRequest) -> None:
        """Validate as create_order would, without executing. Raises on refusal."""

    @abstractmethod
    def fetch_order_by_client_id(self, symbol: str, client_order_id: str) -> OrderResult | None: ...

    @abstractmethod
    def fetch_open_orders(self, symbol: str | None = None) -> list[OrderResult]: ...

    @abstractmethod
    def cancel_order(self, symbol: str, order_id: str) -> OrderResult: ...

    @abstractmethod
    def cancel_all_orders(self, symbol: str) -> list[OrderResult]: ...

    @abstractmethod
    def positions(self, symbols: Sequence[str] | None = None) -> dict[str, float]:
        """Spot: symbol -> net base quantity held (only non-zero entries)."""

    @abstractmethod
    def can_withdraw(self) -> bool | None:
        """Whether these credentials can withdraw funds (None: could not tell)."""

    # ----------------------------------------------------------------- shared close_all

    def market(self, symbol: str) -> MarketInfo:
        market = self.load_markets().get(symbol)
        if market is None:
            raise InvalidOrder(f"unknown symbol {symbol!r}")
        return market

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Apply `fn` to each item; adapters may run this concurrently."""
        return [fn(item) for item in items]

    def close_all(self, symbols: Sequence[str], *, tag: str | None = None) -> CloseAllResult:
        """Cancel open orders of `symbols`, then sell every positive holding at market.

        Sizes are rounded down to the step; what is below min qty / min notional is left and
        reported in `result.dust`. Each close uses the deterministic client id
        `client_order_id("close", tag, symbol)` (default tag: exchange time in ms), so a
        timed-out close is found by lookup instead of being sent twice. Calling close_all
        again is safe: it re-reads holdings. Raises CloseAllIncomplete if any symbol failed.
        """
        symbols = list(dict.fromkeys(symbols))
        tag = tag if tag is not None else str(self.fetch_time_ms())
        result = CloseAllResult()
        cancel_outcomes = self._map(lambda s: _attempt(lambda: self.cancel_all_orders(s)), symbols)
        for symbol, (canceled, error) in zip(symbols, cancel_outcomes, strict=True):
            if error is not None:
                result.errors[symbol] = error
            else:
                result.canceled.extend(canceled or [])
        held = self.positions(symbols)
        todo = [s for s in symbols if held.get(s, 0.0) > 0 and s not in result.errors]
        outcomes = self._map(lambda s: _attempt(lambda: self._close_one(s, held[s], tag)), todo)
        for symbol, (order, error) in zip(todo, outcomes, strict=True):
            if error is not None:
                result.errors[symbol] = error
            elif order is None:
                result.dust[symbol] = held[symbol]
            else:
                result.append(order)
                if order.remaining > 0:
                    result.dust[symbol] = held[symbol] - order.filled
        if result.errors:
            raise CloseAllIncomplete(result)
        return result

    def _close_one(self, symbol: str, qty: float, tag: str) -> OrderResult | None:
        market = self.market(symbol)
        price = self.fetch_ticker(symbol).last
        amount = market.tradable_qty(qty, price)
        if amount <= 0:
            return None
        request = OrderRequest(
            symbol=symbol,
            side="sell",
            type="market",
            amount=amount,
            price=price,
            client_order_id=client_order_id("close", tag, symbol),
            reduce_only=True,
        )
        return self._submit_close(request)

    def _submit_close(self, request: OrderRequest) -> OrderResult:
        return self.create_order(request)


def _attempt(fn: Callable[[], T]) -> tuple[T | None, ExchangeError | None]:
    try:
        return fn(), None
    except ExchangeError as exc:
        return None, exc


def build_exchange(config: ExchangeConfig) -> ExchangeAdapter:
    """ "paper" (default) or "ccxt". Imports the chosen adapter only."""
    if config.kind == "paper":
        from .exchange_paper import PaperExchange

        return PaperExchange.from_config(config)
    if config.kind == "ccxt":
        from .exchange_ccxt import CcxtExchange

        return CcxtExchange.from_config(config)
    raise ValueError(f"unknown exchange kind {config.kind!r}; use 'paper' or 'ccxt'")
