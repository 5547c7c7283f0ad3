"""A Binance-compatible spot REST stub on 127.0.0.1 (ephemeral port), for the real ccxt client.

Serves what ccxt's binance spot calls: /api/v3 time, exchangeInfo, klines, ticker/price,
ticker/24hr, order (POST/GET/DELETE), order/test, openOrders (GET/DELETE), account, and
/sapi/v1/account/apiRestrictions. Signed requests are checked (API key, HMAC-SHA256).
Market orders fill at once at the stub price; limit orders fill at once when marketable,
else rest. Balances are kept; fees are charged in the quote asset.

Fault injection, per (method, path), consumed one request at a time:
    stub.fail("GET", "/api/v3/time", status=500, times=2)
    stub.fail("POST", "/api/v3/order", status=400, code=-2010, msg="...")
    stub.fail("GET", "/api/v3/account", status=429, retry_after=1)
    stub.timeout("GET", "/api/v3/klines")            # reply after the client gave up
    stub.accept_then_timeout()                       # order placed, reply too late
plus `stub.delay_s` added to every request and `stub.log` / `stub.count(method, path)`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_KEY = "stub-key"
API_SECRET = "stub-secret"


class BinanceReject(Exception):
    def __init__(self, status: int, code: int, msg: str):
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg


@dataclass(frozen=True)
class StubMarket:
    symbol: str
    base: str
    quote: str
    price: float
    min_qty: str = "0.0001"
    step_size: str = "0.0001"
    tick_size: str = "0.000001"
    min_notional: str = "0.0001"


@dataclass
class Fault:
    kind: str  # "http", "timeout", "accept_then_timeout"
    status: int = 500
    body: dict[str, Any] | str | None = None
    retry_after: float | None = None


@dataclass
class LoggedRequest:
    method: str
    path: str
    params: dict[str, str]
    status: int = 0
    at: float = field(default_factory=time.monotonic)


@dataclass
class StubOrder:
    order_id: int
    client_order_id: str
    symbol: str
    side: str
    type: str
    orig_qty: Decimal
    price: Decimal
    time_ms: int
    status: str = "NEW"
    executed_qty: Decimal = Decimal(0)
    quote_qty: Decimal = Decimal(0)
    fills: list[dict[str, str]] = field(default_factory=list)


DEFAULT_MARKETS = (
    StubMarket("ETHBTC", "ETH", "BTC", 0.05, "0.0001", "0.0001", "0.00001", "0.0001"),
    StubMarket("LTCBTC", "LTC", "BTC", 0.0015, "0.001", "0.001", "0.000001", "0.0001"),
    StubMarket("BTCUSDT", "BTC", "USDT", 60000.0, "0.00001", "0.00001", "0.01", "5"),
)


def _fmt(value: Decimal | float) -> str:
    return format(Decimal(str(value)).normalize(), "f")


class BinanceStub:
    def __init__(
        self,
        markets: Iterable[StubMarket] = DEFAULT_MARKETS,
        balances: dict[str, float] | None = None,
        fee_bps: float = 10.0,
        timeout_sleep_s: float = 1.5,
    ):
        self.markets = {m.symbol: m for m in markets}
        self.prices = {s: Decimal(str(m.price)) for s, m in self.markets.items()}
        start = balances if balances is not None else {"BTC": 1.0, "USDT": 10_000.0}
        self.free: dict[str, Decimal] = defaultdict(
            Decimal, {a: Decimal(str(v)) for a, v in start.items()}
        )
        self.locked: dict[str, Decimal] = defaultdict(Decimal)
        self.fee = Decimal(str(fee_bps)) / Decimal(10_000)
        self.timeout_sleep_s = timeout_sleep_s
        self.delay_s = 0.0
        self.can_withdraw = False
        self.klines: dict[str, list[list[Any]]] = {}
        self.orders: dict[int, StubOrder] = {}
        self.log: list[LoggedRequest] = []
        self._faults: dict[tuple[str, str], deque[Fault]] = defaultdict(deque)
        self._ids = itertools.count(1000)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BinanceStub:
        handler = type("Handler", (_Handler,), {"stub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="binance-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> BinanceStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "stub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ test controls

    def fail(
        self,
        method: str,
        path: str,
        *,
        status: int = 500,
        code: int | None = None,
        msg: str | None = None,
        times: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next `times` requests to (method, path) with this error."""
        body: dict[str, Any] | str | None
        body = (
            {"code": code, "msg": msg or ""} if code is not None else (msg or "<html>error</html>")
        )
        for _ in range(times):
            self._faults[(method, path)].append(Fault("http", status, body, retry_after))

    def timeout(self, method: str, path: str, times: int = 1) -> None:
        """Do not process; hold the next `times` requests past the client timeout."""
        for _ in range(times):
            self._faults[(method, path)].append(Fault("timeout"))

    def accept_then_timeout(
        self, method: str = "POST", path: str = "/api/v3/order", times: int = 1
    ) -> None:
        """Process the next requests (default: order placements) but reply only after the
        client gave up."""
        for _ in range(times):
            self._faults[(method, path)].append(Fault("accept_then_timeout"))

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.log if r.method == method and r.path == path)

    def set_price(self, symbol: str, price: float) -> None:
        with self._lock:
            self.prices[symbol] = Decimal(str(price))

    def set_balance(self, asset: str, free: float) -> None:
        with self._lock:
            self.free[asset] = Decimal(str(free))

    def balance(self, asset: str) -> tuple[Decimal, Decimal]:
        with self._lock:
            return self.free[asset], self.locked[asset]

    def open_orders(self, symbol: str | None = None) -> list[StubOrder]:
        with self._lock:
            return [
                o for o in self.orders.values() if o.status == "NEW" and symbol in (None, o.symbol)
            ]

    # ------------------------------------------------------------------ dispatch

    def next_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get((method, path))
            return queue.popleft() if queue else None

    def handle(self, method: str, path: str, params: dict[str, str], headers: Any) -> Any:
        route = ROUTES.get((method, path))
        if route is None:
            raise BinanceReject(404, -1000, f"stub has no route {method} {path}")
        func, signed = route
        if signed:
            self._check_signature(params, headers)
        with self._lock:
            return func(self, params)

    def _check_signature(self, params: dict[str, str], headers: Any) -> None:
        if headers.get("X-MBX-APIKEY") != API_KEY:
            raise BinanceReject(401, -2015, "Invalid API-key, IP, or permissions for action.")
        query = params.pop("__query__", "")
        payload, _, signature = query.rpartition("&signature=")
        expected = hmac.new(API_SECRET.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            raise BinanceReject(400, -1022, "Signature for this request is not valid.")
        params.pop("signature", None)

    # ------------------------------------------------------------------ public endpoints

    def ep_time(self, params: dict[str, str]) -> Any:
        return {"serverTime": int(time.time() * 1000)}

    def ep_exchange_info(self, params: dict[str, str]) -> Any:
        return {
            "timezone": "UTC",
            "serverTime": int(time.time() * 1000),
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": 6000,
                },
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
            ],
            "exchangeFilters": [],
            "symbols": [_symbol_info(m) for m in self.markets.values()],
        }

    def ep_klines(self, params: dict[str, str]) -> Any:
        symbol = self._symbol(params)
        rows = self.klines.get(symbol.symbol, [])
        start = int(params.get("startTime", 0))
        end = int(params.get("endTime", 2**62))
        limit = int(params.get("limit", 500))
        picked = [r for r in rows if start <= r[0] <= end]
        return picked[:limit] if "startTime" in params else picked[-limit:]

    def ep_ticker_price(self, params: dict[str, str]) -> Any:
        market = self._symbol(params)
        return {"symbol": market.symbol, "price": _fmt(self.prices[market.symbol])}

    def ep_ticker_24hr(self, params: dict[str, str]) -> Any:
        market = self._symbol(params)
        price = _fmt(self.prices[market.symbol])
        now = int(time.time() * 1000)
        return {
            "symbol": market.symbol, "priceChange": "0", "priceChangePercent": "0",
            "weightedAvgPrice": price, "prevClosePrice": price, "lastPrice": price,
            "lastQty": "1", "bidPrice": price, "bidQty": "1", "askPrice": price, "askQty": "1",
            "openPrice": price, "highPrice": price, "lowPrice": price, "volume": "0",
            "quoteVolume": "0", "openTime": now - 86_400_000, "closeTime": now,
            "firstId": 0, "lastId": 0, "count": 0,
        }  # fmt: skip

    # ------------------------------------------------------------------ signed endpoints

    def ep_account(self, params: dict[str, str]) -> Any:
        assets = sorted(set(self.free) | set(self.locked))
        return {
            "makerCommission": 10, "takerCommission": 10, "buyerCommission": 0,
            "sellerCommission": 0, "canTrade": True, "canWithdraw": self.can_withdraw,
            "canDeposit": True, "brokered": False, "requireSelfTradePrevention": False,
            "updateTime": int(time.time() * 1000), "accountType": "SPOT",
            "balances": [
                {"asset": a, "free": _fmt(self.free[a]), "locked": _fmt(self.locked[a])} for a in assets
            ],
            "permissions": ["SPOT"],
        }  # fmt: skip

    def ep_api_restrictions(self, params: dict[str, str]) -> Any:
        return {
            "ipRestrict": False, "createTime": 1_600_000_000_000, "enableReading": True,
            "enableSpotAndMarginTrading": True, "enableWithdrawals": self.can_withdraw,
            "enableInternalTransfer": False, "enableMargin": False, "enableFutures": False,
            "permitsUniversalTransfer": False, "enableVanillaOptions": False,
        }  # fmt: skip

    def ep_order_test(self, params: dict[str, str]) -> Any:
        self._validate_new_order(params)
        return {}

    def ep_new_order(self, params: dict[str, str]) -> Any:
        market, side, type_, qty, price = self._validate_new_order(params)
        client_id = params.get("newClientOrderId") or f"stub{next(self._ids)}"
        if any(o.client_order_id == client_id for o in self.open_orders()):
            raise BinanceReject(400, -2010, "Duplicate order sent.")
        last = self.prices[market.symbol]
        marketable = (
            type_ == "MARKET"
            or (side == "BUY" and price >= last)
            or (side == "SELL" and price <= last)
        )
        self._check_funds(market, side, qty, price if type_ == "LIMIT" else last)
        order = StubOrder(
            next(self._ids), client_id, market.symbol, side, type_, qty,
            price if type_ == "LIMIT" else Decimal(0), int(time.time() * 1000),
        )  # fmt: skip
        self.orders[order.order_id] = order
        if marketable:
            self._fill(order, market, last)
        else:
            self._lock_funds(market, side, qty, price)
        return {**_order_json(order), "transactTime": order.time_ms, "fills": order.fills}

    def ep_get_order(self, params: dict[str, str]) -> Any:
        return _order_json(self._find_order(params, -2013, "Order does not exist."))

    def ep_cancel_order(self, params: dict[str, str]) -> Any:
        order = self._find_order(params, -2011, "Unknown order sent.")
        if order.status != "NEW":
            raise BinanceReject(400, -2011, "Unknown order sent.")
        self._cancel(order)
        return _cancel_json(order)

    def ep_my_trades(self, params: dict[str, str]) -> Any:
        """The account's trades of one order (``orderId``) or of the symbol."""
        market = self._symbol(params)
        wanted = params.get("orderId")
        return [
            {
                "symbol": o.symbol,
                "id": f["tradeId"],
                "orderId": o.order_id,
                "orderListId": -1,
                "price": f["price"],
                "qty": f["qty"],
                "quoteQty": _fmt(Decimal(f["price"]) * Decimal(f["qty"])),
                "commission": f["commission"],
                "commissionAsset": f["commissionAsset"],
                "time": o.time_ms,
                "isBuyer": o.side == "BUY",
                "isMaker": False,
                "isBestMatch": True,
            }  # fmt: skip
            for o in self.orders.values()
            if o.symbol == market.symbol and wanted in (None, str(o.order_id))
            for f in o.fills
        ]

    def ep_open_orders(self, params: dict[str, str]) -> Any:
        symbol = params.get("symbol")
        return [_order_json(o) for o in self.open_orders(symbol)]

    def ep_cancel_open_orders(self, params: dict[str, str]) -> Any:
        market = self._symbol(params)
        orders = self.open_orders(market.symbol)
        if not orders:
            raise BinanceReject(400, -2011, "Unknown order sent.")
        for order in orders:
            self._cancel(order)
        return [_cancel_json(o) for o in orders]

    # ------------------------------------------------------------------ matching engine

    def _symbol(self, params: dict[str, str]) -> StubMarket:
        market = self.markets.get(params.get("symbol", ""))
        if market is None:
            raise BinanceReject(400, -1121, "Invalid symbol.")
        return market

    def _validate_new_order(
        self, params: dict[str, str]
    ) -> tuple[StubMarket, str, str, Decimal, Decimal]:
        market = self._symbol(params)
        side, type_ = params.get("side", ""), params.get("type", "")
        if side not in ("BUY", "SELL") or type_ not in ("MARKET", "LIMIT"):
            raise BinanceReject(400, -1116, "Invalid orderType.")
        if "quantity" not in params:
            raise BinanceReject(400, -1102, "Mandatory parameter 'quantity' was not sent.")
        qty = Decimal(params["quantity"])
        price = Decimal(params.get("price", "0"))
        if type_ == "LIMIT" and (price <= 0 or price % Decimal(market.tick_size) != 0):
            raise BinanceReject(400, -1013, "Filter failure: PRICE_FILTER")
        if qty < Decimal(market.min_qty) or qty % Decimal(market.step_size) != 0:
            raise BinanceReject(400, -1013, "Filter failure: LOT_SIZE")
        notional = qty * (price if type_ == "LIMIT" else self.prices[market.symbol])
        if notional < Decimal(market.min_notional):
            raise BinanceReject(400, -1013, "Filter failure: NOTIONAL")
        return market, side, type_, qty, price

    def _check_funds(self, market: StubMarket, side: str, qty: Decimal, price: Decimal) -> None:
        if side == "BUY":
            need, asset = qty * price * (1 + self.fee), market.quote
        else:
            need, asset = qty, market.base
        if self.free[asset] < need:
            raise BinanceReject(
                400, -2010, "Account has insufficient balance for requested action."
            )

    def _lock_funds(
        self, market: StubMarket, side: str, qty: Decimal, price: Decimal, sign: int = 1
    ) -> None:
        asset, amount = (
            (market.quote, qty * price * (1 + self.fee)) if side == "BUY" else (market.base, qty)
        )
        self.free[asset] -= sign * amount
        self.locked[asset] += sign * amount

    def _fill(self, order: StubOrder, market: StubMarket, price: Decimal) -> None:
        if order.type == "LIMIT":
            price = min(price, order.price) if order.side == "BUY" else max(price, order.price)
        qty = order.orig_qty - order.executed_qty
        quote = qty * price
        fee = quote * self.fee
        if order.side == "BUY":
            self.free[market.quote] -= quote + fee
            self.free[market.base] += qty
        else:
            self.free[market.base] -= qty
            self.free[market.quote] += quote - fee
        order.executed_qty += qty
        order.quote_qty += quote
        order.status = "FILLED"
        order.fills.append(
            {"price": _fmt(price), "qty": _fmt(qty), "commission": _fmt(fee),
             "commissionAsset": market.quote, "tradeId": next(self._ids)}
        )  # fmt: skip

    def _cancel(self, order: StubOrder) -> None:
        market = self.markets[order.symbol]
        self._lock_funds(
            market, order.side, order.orig_qty - order.executed_qty, order.price, sign=-1
        )
        order.status = "CANCELED"

    def _find_order(self, params: dict[str, str], code: int, msg: str) -> StubOrder:
        market = self._symbol(params)
        for order in self.orders.values():
            if order.symbol != market.symbol:
                continue
            if str(order.order_id) == params.get("orderId") or order.client_order_id == params.get(
                "origClientOrderId"
            ):
                return order
        raise BinanceReject(400, code, msg)

    def load_klines(
        self,
        symbol: str,
        rows: Iterable[tuple[int, float, float, float, float, float]],
        interval_ms: int,
    ) -> None:
        """Serve these candles (open time ms, o, h, l, c, v) for `symbol`."""
        self.klines[symbol] = [
            [
                int(t),
                _fmt(o),
                _fmt(h),
                _fmt(lo),
                _fmt(c),
                _fmt(v),
                int(t) + interval_ms - 1,
                "0",
                1,
                "0",
                "0",
                "0",
            ]
            for t, o, h, lo, c, v in rows
        ]


def _symbol_info(m: StubMarket) -> dict[str, Any]:
    return {
        "symbol": m.symbol, "status": "TRADING", "baseAsset": m.base, "baseAssetPrecision": 8,
        "quoteAsset": m.quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8, "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True, "ocoAllowed": True, "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True, "cancelReplaceAllowed": True,
        "isSpotTradingAllowed": True, "isMarginTradingAllowed": False,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": m.tick_size, "maxPrice": "1000000", "tickSize": m.tick_size},
            {"filterType": "LOT_SIZE", "minQty": m.min_qty, "maxQty": "100000", "stepSize": m.step_size},
            {"filterType": "NOTIONAL", "minNotional": m.min_notional, "applyMinToMarket": True,
             "maxNotional": "9000000", "applyMaxToMarket": False, "avgPriceMins": 5},
        ],
        "permissions": [], "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }  # fmt: skip


def _order_json(o: StubOrder) -> dict[str, Any]:
    return {
        "symbol": o.symbol, "orderId": o.order_id, "orderListId": -1,
        "clientOrderId": o.client_order_id, "price": _fmt(o.price), "origQty": _fmt(o.orig_qty),
        "executedQty": _fmt(o.executed_qty), "cummulativeQuoteQty": _fmt(o.quote_qty),
        "status": o.status, "timeInForce": "GTC", "type": o.type, "side": o.side,
        "stopPrice": "0", "icebergQty": "0", "time": o.time_ms, "updateTime": o.time_ms,
        "isWorking": True, "workingTime": o.time_ms, "origQuoteOrderQty": "0",
        "selfTradePreventionMode": "NONE",
    }  # fmt: skip


def _cancel_json(o: StubOrder) -> dict[str, Any]:
    """A cancel's reply, as Binance's: the order's own id is origClientOrderId, and
    clientOrderId is the id of the cancel request (a new one when none was given)."""
    body = _order_json(o)
    return {**body, "origClientOrderId": o.client_order_id, "clientOrderId": f"cancel{o.order_id}x"}


ROUTES: dict[tuple[str, str], tuple[Any, bool]] = {
    ("GET", "/api/v3/ping"): (lambda stub, params: {}, False),
    ("GET", "/api/v3/time"): (BinanceStub.ep_time, False),
    ("GET", "/api/v3/exchangeInfo"): (BinanceStub.ep_exchange_info, False),
    ("GET", "/api/v3/klines"): (BinanceStub.ep_klines, False),
    ("GET", "/api/v3/ticker/price"): (BinanceStub.ep_ticker_price, False),
    ("GET", "/api/v3/ticker/24hr"): (BinanceStub.ep_ticker_24hr, False),
    ("GET", "/api/v3/account"): (BinanceStub.ep_account, True),
    ("GET", "/sapi/v1/account/apiRestrictions"): (BinanceStub.ep_api_restrictions, True),
    ("POST", "/api/v3/order/test"): (BinanceStub.ep_order_test, True),
    ("POST", "/api/v3/order"): (BinanceStub.ep_new_order, True),
    ("GET", "/api/v3/order"): (BinanceStub.ep_get_order, True),
    ("DELETE", "/api/v3/order"): (BinanceStub.ep_cancel_order, True),
    ("GET", "/api/v3/openOrders"): (BinanceStub.ep_open_orders, True),
    ("GET", "/api/v3/myTrades"): (BinanceStub.ep_my_trades, True),
    ("DELETE", "/api/v3/openOrders"): (BinanceStub.ep_cancel_open_orders, True),
}


class _Handler(BaseHTTPRequestHandler):
    stub: BinanceStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _read(self) -> tuple[str, dict[str, str]]:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        query = "&".join(q for q in (parts.query, body) if q)
        params = dict(parse_qsl(query, keep_blank_values=True))
        params["__query__"] = query
        return parts.path, params

    def _serve(self, method: str) -> None:
        path, params = self._read()
        stub = self.stub
        entry = LoggedRequest(method, path, {k: v for k, v in params.items() if k != "__query__"})
        with stub._lock:
            stub.log.append(entry)
        if stub.delay_s:
            time.sleep(stub.delay_s)
        fault = stub.next_fault(method, path)
        if fault is not None and fault.kind == "timeout":
            time.sleep(stub.timeout_sleep_s)
            entry.status = 504
            return self._reply(
                504, {"code": -1007, "msg": "Timeout waiting for response from backend server."}
            )
        if fault is not None and fault.kind == "http":
            entry.status = fault.status
            headers = (
                {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            )
            return self._reply(fault.status, fault.body, headers)
        try:
            status, payload = 200, stub.handle(method, path, params, self.headers)
        except BinanceReject as reject:
            status, payload = reject.status, {"code": reject.code, "msg": reject.msg}
        if fault is not None and fault.kind == "accept_then_timeout":
            time.sleep(stub.timeout_sleep_s)
        entry.status = status
        self._reply(status, payload)

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header(
                "Content-Type", "application/json" if not isinstance(payload, str) else "text/html"
            )
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
