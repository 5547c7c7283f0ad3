"""Real venues through ccxt (default Binance spot). The only module that imports ccxt.

Errors are translated at this boundary into the project's exchange errors. Reads and
cancels are retried with exponential backoff; order placement never is: a placement whose
reply was lost is looked up by its client order id instead (see `create_order`).
"""

from __future__ import annotations

import email.utils
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import ccxt
from ccxt.base.decimal_to_precision import TICK_SIZE

from .exchange import (
    AuthenticationError,
    Balance,
    Candle,
    DuplicateOrder,
    ExchangeAdapter,
    ExchangeConfig,
    ExchangeError,
    InsufficientFunds,
    InvalidOrder,
    MarketInfo,
    OrderNotFound,
    OrderRequest,
    OrderResult,
    OrderStatusUnknown,
    PermanentExchangeError,
    RateLimited,
    TemporaryExchangeError,
    Ticker,
    check_reduce_only,
    client_order_id,
    validate_order,
)

T = TypeVar("T")
R = TypeVar("R")

# Binance codes that are filter/precision failures of an order (ccxt calls some BadRequest).
INVALID_ORDER_CODES = frozenset({-1013, -1111, -1112, -1114, -1115, -1116, -1117, -1121, -2010})
STATUSES = {"open", "closed", "canceled", "rejected", "expired"}
RECV_WINDOW_MS = 5_000
_CODE_RE = re.compile(r'"code"\s*:\s*(-?\d+)')

BINANCE_OPTIONS: dict[str, Any] = {
    "defaultType": "spot",
    "fetchCurrencies": False,  # /sapi/v1/capital/config/getall: not needed to trade
    "fetchMarkets": {"types": ["spot"]},
    "fetchMargins": False,
    "warnOnFetchOpenOrdersWithoutSymbol": False,
    "adjustForTimeDifference": False,
    "recvWindow": RECV_WINDOW_MS,
    "newOrderRespType": {"market": "FULL", "limit": "FULL"},
}


def _binance_code(exc: BaseException) -> int | None:
    match = _CODE_RE.search(str(exc))
    return int(match.group(1)) if match else None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP date (RFC 9110)."""
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def response_headers(exc: BaseException) -> Mapping[str, str] | None:
    """The headers of the HTTP reply that caused `exc`: ccxt raises its errors while
    handling the HTTP library's error, which carries the response. Unlike the client's
    `last_response_headers`, they belong to this request even when threads share it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        headers = getattr(response, "headers", None)
        if headers is not None:
            return headers
        current = current.__cause__ or current.__context__
    return None


def translate_error(exc: ccxt.BaseError, headers: Mapping[str, str] | None = None) -> ExchangeError:
    """Map a ccxt error onto the project's exchange errors."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ccxt.RateLimitExceeded | ccxt.DDoSProtection):
        return RateLimited(message, retry_after_s=_retry_after(headers))
    if isinstance(exc, ccxt.OperationFailed):  # NetworkError, timeouts, maintenance, bad replies
        return TemporaryExchangeError(message)
    if isinstance(exc, ccxt.InsufficientFunds):
        return InsufficientFunds(message)
    if isinstance(exc, ccxt.OrderNotFound):
        return OrderNotFound(message)
    if isinstance(exc, ccxt.DuplicateOrderId) or "Duplicate order sent" in str(exc):
        return DuplicateOrder(message)
    if isinstance(exc, ccxt.InvalidOrder | ccxt.BadSymbol):
        return InvalidOrder(message)
    if isinstance(exc, ccxt.AuthenticationError):
        return AuthenticationError(message)
    if _binance_code(exc) in INVALID_ORDER_CODES:
        return InvalidOrder(message)
    return PermanentExchangeError(message)


def rebase_urls(api_urls: Any, base_url: str) -> Any:
    """Point every REST endpoint of a ccxt `urls['api']` at `base_url`, keeping paths."""
    base = base_url.rstrip("/")
    if isinstance(api_urls, str):
        parts = urlsplit(api_urls)
        return base + parts.path + (f"?{parts.query}" if parts.query else "")
    if isinstance(api_urls, dict):
        return {key: rebase_urls(value, base) for key, value in api_urls.items()}
    return api_urls


class _Pacer:
    """Spaces calls at least 1/rate apart across threads (Binance spot: 10 orders/s)."""

    def __init__(
        self, per_second: float, clock: Callable[[], float], sleep: Callable[[float], None]
    ):
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self._sleep(slot - now)

    def defer(self, seconds: float) -> None:
        """No call before `seconds` from now (the exchange's Retry-After)."""
        with self._lock:
            self._next = max(self._next, self._clock() + max(seconds, 0.0))


def _order_fee(raw: Mapping[str, Any]) -> tuple[float, str | None]:
    fees = [f for f in (raw.get("fees") or []) if f and f.get("cost") is not None]
    if not fees and raw.get("fee") and raw["fee"].get("cost") is not None:
        fees = [raw["fee"]]
    if not fees:
        return 0.0, None
    currency = fees[0].get("currency")
    return sum(float(f["cost"]) for f in fees if f.get("currency") == currency), currency


class CcxtExchange(ExchangeAdapter):
    """ccxt-backed spot adapter.

    `base_url` rewrites every REST URL of the exchange to that host (tests point it at the
    Binance stub). `sleep` and `clock` are injectable so retry tests run instantly.
    Positions are the base holdings (free + locked) of `symbols`; use a dedicated account.
    """

    def __init__(
        self,
        exchange_id: str = "binance",
        *,
        api_key: str = "",
        secret: str = "",
        sandbox: bool = False,
        base_url: str | None = None,
        timeout_ms: int = 10_000,
        symbols: Sequence[str] = (),
        max_retries: int = 3,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        max_retry_wait_s: float = 30.0,
        lookup_attempts: int = 4,
        not_found_grace_s: float | None = None,
        orders_per_second: float = 8.0,
        max_workers: int = 4,
        options: Mapping[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = f"ccxt:{exchange_id}"
        self.symbols = list(symbols)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_wait_s = max_retry_wait_s
        self.lookup_attempts = max(1, lookup_attempts)
        # "Order does not exist" is only trusted once the request can no longer be accepted:
        # Binance refuses a request older than recvWindow when it reaches the engine.
        self.not_found_grace_s = (
            RECV_WINDOW_MS / 1000 + 1.0 if not_found_grace_s is None else not_found_grace_s
        )
        self.max_workers = max_workers
        self._sleep, self._clock = sleep, clock
        self._pacer = _Pacer(orders_per_second, clock, sleep)
        self._markets: dict[str, MarketInfo] | None = None
        self._markets_lock = threading.Lock()
        self.client = self._build_client(exchange_id, api_key, secret, timeout_ms, options)
        if sandbox:
            self.client.set_sandbox_mode(True)
        if base_url:
            self.client.urls["api"] = rebase_urls(self.client.urls["api"], base_url)

    @staticmethod
    def _build_client(
        exchange_id: str,
        api_key: str,
        secret: str,
        timeout_ms: int,
        options: Mapping[str, Any] | None,
    ) -> ccxt.Exchange:
        klass = getattr(ccxt, exchange_id, None)
        if klass is None:
            raise ValueError(f"ccxt has no exchange {exchange_id!r}")
        merged = (
            dict(BINANCE_OPTIONS) if exchange_id.startswith("binance") else {"defaultType": "spot"}
        )
        merged.update(options or {})
        return klass(
            {
                "apiKey": api_key,
                "secret": secret,
                "enableRateLimit": True,
                "timeout": timeout_ms,
                "options": merged,
            }
        )

    @classmethod
    def from_config(cls, config: ExchangeConfig) -> CcxtExchange:
        return cls(
            config.exchange_id,
            api_key=config.api_key,
            secret=config.api_secret,
            sandbox=config.sandbox,
            base_url=config.base_url,
            timeout_ms=config.timeout_ms,
            symbols=config.symbols,
            max_retries=config.max_retries,
            orders_per_second=config.orders_per_second,
            max_workers=config.max_workers,
            not_found_grace_s=config.not_found_grace_s,
        )

    # ------------------------------------------------------------------ plumbing

    def _translate(self, exc: ccxt.BaseError) -> ExchangeError:
        headers = response_headers(exc)
        if headers is None:
            headers = getattr(self.client, "last_response_headers", None)
        return translate_error(exc, headers)

    def _delay(self, error: ExchangeError, attempt: int) -> float | None:
        """Seconds to wait before retry number `attempt + 1`; None: do not retry."""
        delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
        retry_after = getattr(error, "retry_after_s", None)
        if retry_after is not None:
            if retry_after > self.max_retry_wait_s:
                return None
            delay = max(delay, retry_after)
        return delay

    def _call(self, fn: Callable[..., T], *args: Any, retry: bool = True) -> T:
        """Call ccxt; retry temporary errors of idempotent calls with exponential backoff."""
        attempt = 0
        while True:
            try:
                return fn(*args)
            except ccxt.BaseError as exc:
                error = self._translate(exc)
                delay = self._delay(error, attempt)
                last = attempt >= self.max_retries
                if (
                    not retry
                    or not isinstance(error, TemporaryExchangeError)
                    or last
                    or delay is None
                ):
                    raise error from exc
            self._sleep(delay)
            attempt += 1

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if self.max_workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            return list(pool.map(fn, items))

    def _result(self, raw: Mapping[str, Any], request: OrderRequest | None = None) -> OrderResult:
        fee, fee_currency = _order_fee(raw)
        status = raw.get("status")
        average = raw.get("average")
        info = raw.get("info") if isinstance(raw.get("info"), Mapping) else {}
        return OrderResult(
            exchange_order_id=str(raw.get("id") or ""),
            # a cancel's reply names the order's own id origClientOrderId; its clientOrderId
            # (which ccxt keeps) is the cancel request's
            client_order_id=info.get("origClientOrderId")
            or raw.get("clientOrderId")
            or (request.client_order_id if request else ""),
            symbol=raw.get("symbol") or (request.symbol if request else ""),
            side=raw.get("side") or (request.side if request else ""),
            type=raw.get("type") or (request.type if request else ""),
            status=status if status in STATUSES else "open",
            amount=float(raw.get("amount") or (request.amount if request else 0.0)),
            filled=float(raw.get("filled") or 0.0),
            average=float(average) if average else None,
            fee=fee,
            fee_currency=fee_currency,
            timestamp_ms=raw.get("timestamp"),
            raw=raw.get("info"),
        )

    # ------------------------------------------------------------------ reads

    def load_markets(self, reload: bool = False) -> dict[str, MarketInfo]:
        with self._markets_lock:
            if self._markets is None or reload:
                raw = self._call(self.client.load_markets, reload)
                self._markets = {
                    s: self._market_info(m) for s, m in raw.items() if m.get("spot", True)
                }
            return dict(self._markets)

    def _market_info(self, m: Mapping[str, Any]) -> MarketInfo:
        def step(value: Any) -> float:
            if value is None:
                return 0.0
            return float(value) if self.client.precisionMode == TICK_SIZE else 10.0 ** -float(value)

        limits = m.get("limits") or {}
        amount_limits = limits.get("amount") or {}
        cost_limits = limits.get("cost") or {}
        return MarketInfo(
            symbol=m["symbol"],
            base=m["base"],
            quote=m["quote"],
            min_qty=float(amount_limits.get("min") or 0.0),
            step_size=step((m.get("precision") or {}).get("amount")),
            min_notional=float(cost_limits.get("min") or 0.0),
            tick_size=step((m.get("precision") or {}).get("price")),
            max_qty=float(amount_limits["max"]) if amount_limits.get("max") else None,
        )

    def fetch_time_ms(self) -> int:
        return int(self._call(self.client.fetch_time))

    def fetch_ohlcv(
        self, symbol: str, timeframe: str, since_ms: int | None = None, limit: int = 500
    ) -> list[Candle]:
        rows = self._call(self.client.fetch_ohlcv, symbol, timeframe, since_ms, limit)
        return [
            Candle(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5]))
            for r in rows
        ]

    def fetch_ticker(self, symbol: str) -> Ticker:
        raw = self._call(self.client.fetch_ticker, symbol)

        def num(key: str) -> float | None:
            return float(raw[key]) if raw.get(key) is not None else None

        last = num("last") or num("close") or 0.0
        return Ticker(symbol, last, num("bid"), num("ask"), raw.get("timestamp"))

    def fetch_balance(self) -> dict[str, Balance]:
        raw = self._call(self.client.fetch_balance)
        free, used = raw.get("free") or {}, raw.get("used") or {}
        out = {}
        for asset in sorted(set(free) | set(used)):
            balance = Balance(float(free.get(asset) or 0.0), float(used.get(asset) or 0.0))
            if balance.total:
                out[asset] = balance
        return out

    def fetch_order_by_client_id(self, symbol: str, client_order_id: str) -> OrderResult | None:
        raw = self._call(self._lookup_raw, symbol, client_order_id)
        return self._result(raw) if raw is not None else None

    def _lookup_raw(self, symbol: str, client_order_id: str) -> dict[str, Any] | None:
        """The order by its client id. Binance's order query carries no commission (only an
        order's placing reply does): a filled order's fees are read from its trades, or an
        order found after a lost reply would be recorded free of fees (on a buy charged in
        the base asset, a position larger than the holding)."""
        try:
            raw = self.client.fetch_order(None, symbol, {"origClientOrderId": client_order_id})
        except ccxt.OrderNotFound:
            return None
        if float(raw.get("filled") or 0.0) > 0 and _order_fee(raw)[1] is None and raw.get("id"):
            trades = self.client.fetch_order_trades(raw["id"], symbol)
            raw = {**raw, "fees": [t["fee"] for t in trades if t.get("fee")]}
        return raw

    def fetch_open_orders(self, symbol: str | None = None) -> list[OrderResult]:
        return [self._result(o) for o in self._call(self.client.fetch_open_orders, symbol)]

    def positions(self, symbols: Sequence[str] | None = None) -> dict[str, float]:
        wanted = list(symbols) if symbols is not None else self.symbols
        markets = self.load_markets()
        balances = self.fetch_balance()
        held: dict[str, float] = {}
        seen_bases: set[str] = set()
        for symbol in wanted:
            market = markets.get(symbol)
            if market is None or market.base in seen_bases:
                continue
            seen_bases.add(market.base)
            qty = balances.get(market.base, Balance(0.0)).total
            if qty > 0:
                held[symbol] = qty
        return held

    def can_withdraw(self) -> bool | None:
        """Binance: the API key's `enableWithdrawals`, else the account's `canWithdraw`."""
        if hasattr(self.client, "sapiGetAccountApiRestrictions"):
            try:
                raw = self._call(self.client.sapiGetAccountApiRestrictions)
                return bool(raw["enableWithdrawals"])
            except (ExchangeError, KeyError, TypeError):
                pass
        try:
            info = self._call(self.client.fetch_balance).get("info") or {}
        except ExchangeError:
            return None
        value = info.get("canWithdraw")
        return bool(value) if value is not None else None

    # ------------------------------------------------------------------ orders

    def _prepare(self, request: OrderRequest) -> OrderRequest:
        if not request.client_order_id:
            request = replace(
                request, client_order_id=client_order_id("auto", time.time_ns(), id(request))
            )
        validate_order(request, self.load_markets().get(request.symbol))
        return request

    def _ccxt_args(self, request: OrderRequest, **extra: Any) -> tuple[Any, ...]:
        price = request.price if request.type == "limit" else None
        params = {"clientOrderId": request.client_order_id, **extra}
        return request.symbol, request.type, request.side, request.amount, price, params

    def test_order(self, request: OrderRequest) -> None:
        request = self._prepare(request)
        self._call(self.client.create_order, *self._ccxt_args(request, test=True))

    def create_order(self, request: OrderRequest) -> OrderResult:
        """Send the order once, never blindly again.

        A TemporaryExchangeError raised here always has `placed=False`: the order was not
        sent, was refused by a rate limit, or a lookup by client order id confirmed it does
        not exist. After a timeout/5xx the order is looked up: found -> returned as the
        result. OrderStatusUnknown when even the lookups fail (fail closed).
        """
        try:
            request = self._prepare(request)
            if request.reduce_only:
                check_reduce_only(
                    request, self.positions([request.symbol]).get(request.symbol, 0.0)
                )
        except TemporaryExchangeError as error:
            error.placed = False
            raise
        return self._place(request)

    def _place(self, request: OrderRequest) -> OrderResult:
        self._pacer.wait()
        sent_at = self._clock()
        try:
            raw = self.client.create_order(*self._ccxt_args(request))
        except ccxt.BaseError as exc:
            error = self._translate(exc)
            if isinstance(error, RateLimited):  # Binance refuses before processing
                error.placed = False
                if error.retry_after_s is not None:  # the next order waits it out
                    self._pacer.defer(min(error.retry_after_s, self.max_retry_wait_s))
            if not isinstance(error, TemporaryExchangeError) or error.placed is False:
                raise error from exc
            return self._resolve(request, error, sent_at)
        return self._result(raw, request)

    def _resolve(
        self, request: OrderRequest, cause: TemporaryExchangeError, sent_at: float
    ) -> OrderResult:
        symbol, cid = request.symbol, request.client_order_id
        error: ExchangeError = cause
        backoff = False
        for attempt in range(self.lookup_attempts):
            if backoff:
                self._sleep(self._delay(error, attempt - 1) or self.max_backoff_s)
            try:
                raw = self._lookup_raw(symbol, cid)
            except ccxt.BaseError as exc:
                error, backoff = self._translate(exc), True
                continue
            if raw is not None:
                return self._result(raw, request)
            wait = self.not_found_grace_s - (self._clock() - sent_at)
            if wait <= 0:
                raise TemporaryExchangeError(
                    f"order {cid} was not placed ({cause})", placed=False
                ) from cause
            self._sleep(wait)
            backoff = False
        raise OrderStatusUnknown(
            f"outcome of order {cid} on {symbol} unknown after {self.lookup_attempts} lookups: {error}",
            symbol=symbol,
            client_order_id=cid,
        ) from cause

    def cancel_order(self, symbol: str, order_id: str) -> OrderResult:
        """Cancel; an order that is already canceled or filled is returned as it is (so a
        cancel retried after a lost reply is not an error). Unknown ids raise OrderNotFound."""
        try:
            return self._result(self._call(self.client.cancel_order, order_id, symbol))
        except OrderNotFound:
            raw = self._call(self._fetch_by_id, symbol, order_id)
            if raw is None or self._result(raw).status == "open":
                raise
            return self._result(raw)

    def _fetch_by_id(self, symbol: str, order_id: str) -> dict[str, Any] | None:
        try:
            return self.client.fetch_order(order_id, symbol)
        except ccxt.OrderNotFound:
            return None

    def cancel_all_orders(self, symbol: str) -> list[OrderResult]:
        try:
            raw = self._call(self.client.cancel_all_orders, symbol)
        except OrderNotFound:  # Binance answers -2011 when nothing is open
            return []
        return [self._result(o) for o in raw if isinstance(o, dict)]

    def close_all(self, symbols: Sequence[str], *, tag: str | None = None):  # type: ignore[override]
        self.load_markets()
        return super().close_all(symbols, tag=tag)

    def _submit_close(self, request: OrderRequest) -> OrderResult:
        # The amount was just computed from fresh holdings: skip create_order's extra balance read.
        return self._place(self._prepare(request))
