"""The order router: sizes, gates, persists, places and records orders.

Every order follows the same path:

1. **Idempotency**: an order with the same client order id already exists -> it is
   returned, nothing is sent again (retried tasks, retried flattens).
2. **Gate** (fail closed, no row written, ``OrderRefused`` raised and audited): the kill
   switch is unreadable or does not allow the order; an entry with allocation 0; an order
   of the deployment is UNKNOWN (until reconciled); a signal older than
   TRADING_SIGNAL_MAX_AGE_S. ``flatten`` skips the gate: it only reduces and is what a
   halted deployment needs.
3. **Validation** against the market's filters (``exchange.validate_order``): non-positive
   size, unknown symbol, below min quantity / notional, off the step -> an Order row with
   status REJECTED, the reason in ``error`` and ``submitted_at`` empty (never sent).
4. **Persist** the Order (PENDING, deterministic client order id), committed, before any
   exchange call (one INSERT; a sent order is audited once, with its outcome).
5. **Place** through the adapter, outside any transaction. The adapter never retries a
   placement blindly: after a timeout/5xx it looks the order up by client order id.
   ``OrderStatusUnknown`` -> status UNKNOWN, ``critical=True``, a critical alert, and this
   deployment places nothing more until ``order_resolve``/reconciliation settles it.
6. **Record** in one transaction: status, fills (``Fill`` rows), position, cash, an equity
   snapshot when something filled, and the audit record. On PostgreSQL the common case (a
   fill, the position row as read before the order) is a single statement that commits
   on its own (``portfolio.fill_record_claimed``): the order path is three statements.

What an Order row holds (for metrics): ``requested_qty``, ``filled_qty``,
``reference_price`` (the signal's close for entries, the ticker for closes),
``avg_fill_price``, ``slippage_bps`` (signed: positive = against us), ``fee`` (quote
currency), ``submitted_at``/``acked_at`` (the caller's clock: the candle clock in a replay,
the wall clock live; ``acked_at = submitted_at + latency``), ``latency_ms`` (measured
around the adapter call), ``status``, ``error``, ``critical``. ``submitted_at`` is empty
exactly when the order never reached the exchange.

Paper trading state (``get_exchange``): one ``PaperExchange`` per deployment per process,
built from the database: quote balance = ``Deployment.cash``, holdings = ``Position`` rows
(replayed as zero-fee buys at their average entry), prices = the latest stored candle of
each symbol. Before each use it is compared with the database and rebuilt when another
process traded in between, so it survives worker restarts and several worker processes:
the database is the record, the paper exchange a cache of it (used as last known when the
database is unreachable, e.g. by a rollback that flattens with the database down).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone

from audit.services import audit_event, audit_record
from canary.killswitch import KillSwitchUnreadable, allows, read_state

from . import portfolio
from .exchange import (
    ExchangeAdapter,
    ExchangeConfig,
    ExchangeError,
    InvalidOrder,
    MarketInfo,
    OrderRequest,
    OrderResult,
    OrderStatusUnknown,
    PaperSettings,
    PermanentExchangeError,
    TemporaryExchangeError,
    build_exchange,
    client_order_id,
    validate_order,
)
from .models import Deployment, KillSwitch, Order, OrderStatus, Position, Signal
from .rows import ModelRows, fetchall_prepared, insert_row, update_rows

log = logging.getLogger(__name__)

PAPER = "paper"
ENTRY, EXIT, FLATTEN = "entry", "exit", "flatten"
ACTOR = "order-router"
UNSETTLED = (OrderStatus.PENDING, OrderStatus.UNKNOWN, OrderStatus.OPEN, OrderStatus.PARTIAL)
QTY_EPS = 1e-12
RECORDED_FIELDS = [
    "submitted_at", "acked_at", "latency_ms", "status", "error", "critical",
    "exchange_order_id", "filled_qty", "avg_fill_price", "fee", "slippage_bps",
]  # fmt: skip
_COLUMNS = {name: Order._meta.get_field(name).column for name in RECORDED_FIELDS}
MAX_FLATTEN_ATTEMPTS = 20


class OrderRefused(Exception):
    """The router refused before writing an order (gate closed). Audited."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FlattenIncomplete(Exception):
    """Some symbols could not be flattened; ``orders`` holds what was sent."""

    def __init__(self, orders: list[Order], errors: dict[str, str]):
        super().__init__("flatten incomplete: " + "; ".join(f"{s}: {e}" for s, e in errors.items()))
        self.orders = orders
        self.errors = errors


# --------------------------------------------------------------------------- boundaries


def read_killswitch(deployment_id: int) -> KillSwitch:
    """The authoritative kill switch (Redis). Raises KillSwitchUnreadable."""
    return read_state(deployment_id)


def market_exchange_of(deployment: Deployment) -> str:
    """The ``Candle.exchange`` whose candles drive this deployment (paper deployments
    trade on TRADING_PAPER_MARKET_EXCHANGE's candles: "paper" = the CSV replay)."""
    if deployment.exchange == PAPER:
        return settings.TRADING_PAPER_MARKET_EXCHANGE
    return deployment.exchange


@dataclass
class _Cached:
    adapter: ExchangeAdapter
    key: tuple[Any, ...]


_adapters: dict[int, _Cached] = {}
_adapters_lock = threading.Lock()


def reset_exchanges() -> None:
    """Forget every cached adapter (tests; settings changes)."""
    with _adapters_lock:
        _adapters.clear()


def get_exchange(deployment: Deployment, *, fresh: bool = False) -> ExchangeAdapter:
    """The adapter of ``deployment``: a process-wide PaperExchange kept in line with the
    database for "paper", else a CcxtExchange built from the TRADING_EXCHANGE_* settings.
    ``fresh``: the deployment row was just read (its cash is trusted, one query less; read
    by ``_fresh``, its holdings too: no query)."""
    if deployment.exchange == PAPER:
        if not fresh:
            return _paper_exchange(deployment)
        held = getattr(deployment, "held", None)
        if held is None:
            return _paper_exchange(deployment, deployment.cash)
        return _paper_exchange(deployment, deployment.cash, {s: q for s, (q, _) in held.items()})
    key = (
        deployment.created_at,
        deployment.exchange,
        settings.TRADING_EXCHANGE_BASE_URL,
        settings.TRADING_EXCHANGE_API_KEY,
        tuple(deployment.symbols or ()),
    )
    with _adapters_lock:
        cached = _adapters.get(deployment.pk)
        if cached is None or cached.key != key:
            config = ExchangeConfig(
                kind="ccxt",
                symbols=tuple(deployment.symbols or ()),
                exchange_id=deployment.exchange,
                api_key=settings.TRADING_EXCHANGE_API_KEY,
                api_secret=settings.TRADING_EXCHANGE_API_SECRET,
                sandbox=settings.TRADING_EXCHANGE_SANDBOX,
                base_url=settings.TRADING_EXCHANGE_BASE_URL or None,
                timeout_ms=settings.TRADING_EXCHANGE_TIMEOUT_MS,
            )
            cached = _Cached(build_exchange(config), key)
            _adapters[deployment.pk] = cached
        return cached.adapter


def _db_state(deployment: Deployment, cash: float | None) -> tuple[float, dict[str, float]]:
    if cash is None:
        cash = Deployment.objects.filter(pk=deployment.pk).values_list("cash", flat=True).get()
    held = dict(
        Position.objects.filter(deployment_id=deployment.pk)
        .exclude(qty=0)
        .values_list("symbol", "qty")
    )
    return cash, held


def _paper_key(deployment: Deployment, cash: float, held: dict[str, float]) -> tuple[Any, ...]:
    shape = (deployment.created_at, tuple(deployment.symbols or ()), deployment.quote_currency)
    return (shape, cash, sorted(held.items()))


def _paper_matches(
    adapter: ExchangeAdapter, quote: str, cash: float, held: dict[str, float]
) -> bool:
    balance = adapter.fetch_balance().get(quote)
    if balance is None or not portfolio.isclose(balance.total, cash):
        return False
    have = adapter.positions()
    symbols = set(have) | set(held)
    return all(portfolio.isclose(have.get(s, 0.0), held.get(s, 0.0)) for s in symbols)


def _paper_exchange(
    deployment: Deployment, cash: float | None = None, held: dict[str, float] | None = None
) -> ExchangeAdapter:
    try:
        if cash is None or held is None:
            cash, held = _db_state(deployment, cash)
    except DatabaseError:
        with _adapters_lock:
            cached = _adapters.get(deployment.pk)
        if cached is None:
            raise
        log.warning("deployment %s: database unavailable, paper state as last known", deployment.pk)
        return cached.adapter
    key = _paper_key(deployment, cash, held)
    with _adapters_lock:
        cached = _adapters.get(deployment.pk)
        if cached is not None and cached.key == key:
            return cached.adapter
        same_shape = cached is not None and cached.key[0] == key[0]
        if same_shape and _paper_matches(cached.adapter, deployment.quote_currency, cash, held):
            cached.key = key
            return cached.adapter
        adapter = _paper_build(deployment, cash, held)
        _adapters[deployment.pk] = _Cached(adapter, key)
        return adapter


def _paper_settings(deployment: Deployment, balances: dict[str, float]) -> PaperSettings:
    return PaperSettings(
        starting_balances=balances,
        fee_bps=settings.TRADING_PAPER_FEE_BPS,
        slippage_bps=settings.TRADING_PAPER_SLIPPAGE_BPS,
        seed=deployment.pk,
    )


def _paper_build(deployment: Deployment, cash: float, held: dict[str, float]) -> ExchangeAdapter:
    from .exchange_paper import PaperExchange

    symbols = list(dict.fromkeys([*(deployment.symbols or []), *held]))
    avg = dict(
        Position.objects.filter(deployment_id=deployment.pk, symbol__in=list(held)).values_list(
            "symbol", "avg_entry"
        )
    )
    seed_cost = sum(qty * avg.get(s, 0.0) for s, qty in held.items() if qty > 0)
    quote = deployment.quote_currency
    paper = PaperExchange(symbols, _paper_settings(deployment, {quote: cash + seed_cost}))
    closes = portfolio.latest_closes(deployment, market_exchange_of(deployment))
    normal = paper.settings
    paper.settings = replace(normal, fee_bps=0.0, slippage_bps=0.0, slippage_random_bps=0.0)
    try:
        for symbol, qty in held.items():
            _paper_seed(paper, symbol, qty, avg.get(symbol, 0.0))
    finally:
        paper.settings = normal
    for symbol, (close, close_ms) in closes.items():
        if symbol in symbols:
            paper.set_price(symbol, close, close_ms)
    return paper


def _paper_seed(paper: Any, symbol: str, qty: float, price: float) -> None:
    """Re-create a holding as a zero-fee buy at its average entry."""
    if qty <= 0 or price <= 0:
        return
    paper.set_price(symbol, price, 0)
    try:
        paper.create_order(
            OrderRequest(symbol, "buy", "market", qty, client_order_id=f"seed-{symbol}"[:36])
        )
    except ExchangeError as exc:
        log.warning("paper: could not restore %s %s: %s", qty, symbol, exc)


def paper_feed(adapter: ExchangeAdapter, candle: Any) -> None:
    """Set a paper adapter's price to a candle's close (a trading.Candle being processed);
    no-op for real venues."""
    set_price = getattr(adapter, "set_price", None)
    if set_price is not None and adapter.name == PAPER:
        set_price(candle.symbol, candle.close, candle.close_time_ms)


def exchange_for(deployment: Deployment, candle: Any) -> ExchangeAdapter:
    """``get_exchange`` for an order decision on ``candle``: the paper state checked against
    the database in one query, and a paper adapter priced at the candle's close."""
    adapter = get_exchange(_fresh(deployment.pk), fresh=True)
    paper_feed(adapter, candle)
    return adapter


def paper_refresh(adapter: ExchangeAdapter, deployment: Deployment) -> None:
    """Set a paper adapter's prices to the latest stored candles (flatten, reconcile)."""
    set_price = getattr(adapter, "set_price", None)
    if set_price is None or adapter.name != PAPER:
        return
    known = set(adapter.load_markets())
    for symbol, (close, close_ms) in portfolio.latest_closes(
        deployment, market_exchange_of(deployment)
    ).items():
        if symbol in known:
            set_price(symbol, close, close_ms)


# --------------------------------------------------------------------------- alerts


def notify_critical(*, source: str, key: str, message: str, payload: dict[str, Any]) -> None:
    """A critical alert through alerts.services.alert_raise when it exists; otherwise (or
    if raising fails) an audit record ``<source>.alert`` so nothing is lost."""
    try:
        from alerts.services import alert_raise
    except ImportError:
        alert_raise = None
    if alert_raise is not None:
        try:
            with transaction.atomic():
                alert_raise(
                    source=source, key=key, severity="critical", message=message, payload=payload
                )
            return
        except Exception:
            log.exception("alert_raise failed for %s:%s; recording an audit event", source, key)
    audit_record(
        action=f"{source}.alert",
        actor=ACTOR,
        target_type="trading.Deployment",
        target_id=payload.get("deployment_id", ""),
        payload={"key": key, "message": message, **payload},
    )


# --------------------------------------------------------------------------- gate


def _refuse(deployment: Deployment, reason: str, payload: dict[str, Any]) -> OrderRefused:
    with transaction.atomic():
        audit_record(
            action="order.refused",
            actor=ACTOR,
            target=deployment,
            payload={"reason": reason, **payload},
        )
    return OrderRefused(reason)


# Read before every order: one fixed statement, raw SQL to spare the ORM compiling its
# subqueries and join each time. One row per position (or one row of NULLs).
_DEPLOYMENT_ROWS = ModelRows(Deployment, "d")
_FRESH_SQL = """
SELECT {columns},
       (SELECT u.client_order_id FROM {order} u
        WHERE u.deployment_id = d.id AND u.status = %s LIMIT 1) AS unknown_order,
       (SELECT q.client_order_id FROM {order} q
        WHERE q.deployment_id = d.id AND q.status = %s AND q.purpose = %s AND q.symbol = %s
        LIMIT 1) AS pending_entry,
       (SELECT e.id FROM {order} e WHERE e.client_order_id = %s) AS existing_order,
       p.symbol AS p_symbol, p.qty AS p_qty, p.avg_entry AS p_avg_entry,
       p.realised_pnl AS p_realised, p.last_price AS p_last
FROM {deployment} d
LEFT JOIN {position} p ON p.deployment_id = d.id
WHERE d.id = %s
"""


def _fresh(
    deployment_id: int, client_id: str | None = None, entry_symbol: str | None = None
) -> Deployment:
    """The deployment as it is now, in one query, with ``unknown_order`` (the client id of
    one of its UNKNOWN orders, None when there is none), ``pending_entry`` (the client id
    of a PENDING entry order on ``entry_symbol``: sent or being sent, its outcome not
    recorded yet; None when there is none), ``existing_order`` (the id of the
    order with ``client_id``, None when there is none), ``held`` (symbol -> (qty, last
    price) of its non-zero positions) and ``books`` (symbol -> ``portfolio.Book`` of each
    position row, for ``portfolio.fill_record``'s conditional update)."""
    deployments = _DEPLOYMENT_ROWS
    sql = _FRESH_SQL.format(
        columns=deployments.columns(connection),
        order=Order._meta.db_table,
        deployment=Deployment._meta.db_table,
        position=Position._meta.db_table,
    )
    params = [
        OrderStatus.UNKNOWN.value,
        OrderStatus.PENDING.value,
        ENTRY,
        entry_symbol,
        client_id,
        deployment_id,
    ]
    rows = fetchall_prepared(sql, params)
    if not rows:
        raise Deployment.DoesNotExist(f"deployment {deployment_id} does not exist")
    n = len(deployments.fields)
    deployment = deployments.instance(connection, rows[0][:n])
    unknown, pending, existing = rows[0][n : n + 3]
    deployment.unknown_order, deployment.pending_entry = unknown, pending  # type: ignore[attr-defined]
    deployment.existing_order = existing  # type: ignore[attr-defined]
    mine = [row[n + 3 :] for row in rows if row[n + 3] is not None]
    deployment.held = {sym: (qty, last) for sym, qty, _, _, last in mine if qty != 0}  # type: ignore[attr-defined]
    deployment.books = {  # type: ignore[attr-defined]
        sym: portfolio.Book(qty, avg, realised) for sym, qty, avg, realised, _ in mine
    }
    return deployment


def _existing_of(deployment: Deployment) -> Order | None:
    """The order ``_fresh`` found by client id (one more query only when there is one)."""
    order_id = getattr(deployment, "existing_order", None)
    return None if order_id is None else Order.objects.filter(pk=order_id).first()


def _gate(deployment: Deployment, *, reduce_only: bool, payload: dict[str, Any]) -> None:
    """Raise OrderRefused unless this order may be sent (``deployment`` from ``_fresh``)."""
    if not hasattr(deployment, "unknown_order"):
        deployment = _fresh(deployment.pk)
    try:
        state = read_killswitch(deployment.pk)
    except KillSwitchUnreadable as exc:
        raise _refuse(deployment, f"kill switch unreadable: {exc}", payload) from exc
    if not allows(state, reduce_only=reduce_only):
        raise _refuse(deployment, f"kill switch is {state.value}", payload)
    if not reduce_only and deployment.allocation <= 0:
        raise _refuse(deployment, "allocation is 0", payload)
    unknown = getattr(deployment, "unknown_order", None)
    if unknown is not None:
        raise _refuse(deployment, f"order {unknown} is UNKNOWN: reconcile first", payload)
    pending = getattr(deployment, "pending_entry", None)
    if not reduce_only and pending is not None:
        # Sent by a worker that may have died before recording the outcome: entering again
        # could double the position. The reconciliation settles it (or marks it UNKNOWN).
        raise _refuse(
            deployment, f"entry {pending} on this symbol is still PENDING: reconcile first", payload
        )


# --------------------------------------------------------------------------- submit


@dataclass(frozen=True)
class Intent:
    deployment: Deployment
    symbol: str
    side: str
    qty: float
    purpose: str
    client_order_id: str
    reference_price: float | None
    reduce_only: bool = False
    signal_id: int | None = None

    def request(self) -> OrderRequest:
        return OrderRequest(
            symbol=self.symbol,
            side=self.side,
            type="market",
            amount=self.qty,
            price=self.reference_price,
            client_order_id=self.client_order_id,
            reduce_only=self.reduce_only,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "client_order_id": self.client_order_id,
            "symbol": self.symbol,
            "side": self.side,
            "qty": self.qty,
            "purpose": self.purpose,
            "reference_price": self.reference_price,
            "signal_id": self.signal_id,
        }


@dataclass(frozen=True)
class Outcome:
    result: OrderResult | None = None
    status: str = ""
    error: str = ""
    critical: bool = False


def _existing(client_id: str) -> Order | None:
    return Order.objects.filter(client_order_id=client_id).first()


def _market(adapter: ExchangeAdapter, symbol: str) -> MarketInfo | None:
    """The market, None for an unknown symbol. Exchange trouble propagates."""
    try:
        return adapter.market(symbol)
    except InvalidOrder:
        return None


def _check(intent: Intent, adapter: ExchangeAdapter) -> tuple[str, str]:
    """(status, reason) of the pre-exchange validation: ("", "") when it passes."""
    try:
        validate_order(intent.request(), _market(adapter, intent.symbol))
    except InvalidOrder as exc:
        return OrderStatus.REJECTED, str(exc)
    except ExchangeError as exc:
        return OrderStatus.ERROR, f"market filters unavailable: {exc}"
    return "", ""


def _persist(intent: Intent, now: datetime, status: str, reason: str) -> tuple[Order, bool]:
    """The Order row and its audit record, committed; (order, False) when a concurrent
    caller created the same client order id first."""
    fields = {
        "deployment_id": intent.deployment.pk,
        "signal_id": intent.signal_id,
        "client_order_id": intent.client_order_id,
        "purpose": intent.purpose,
        "symbol": intent.symbol,
        "side": intent.side,
        "type": "market",
        "reduce_only": intent.reduce_only,
        "allocation": intent.deployment.allocation,
        "requested_qty": intent.qty,
        "reference_price": intent.reference_price,
        "status": status or OrderStatus.PENDING,
        "error": reason[:300],
        "created_at": now,
        "submitted_at": now if status == OrderStatus.ERROR else None,
    }
    try:
        if not status and not connection.in_atomic_block:  # one statement, committed
            return insert_row(Order(**fields)), True
        with transaction.atomic():
            order = Order.objects.create(**fields)
            if status:  # refused before the exchange: final now. A sent order is audited
                audit_record(  # once, when its outcome is recorded.
                    action=f"order.{status.lower()}",
                    actor=ACTOR,
                    target=order,
                    payload={**intent.summary(), "status": order.status, "error": order.error},
                )
    except IntegrityError:
        return Order.objects.get(client_order_id=intent.client_order_id), False
    return order, True


def _submit(intent: Intent, adapter: ExchangeAdapter, now: datetime) -> Order:
    status, reason = _check(intent, adapter)
    order, created = _persist(intent, now, status, reason)
    if not created or order.status != OrderStatus.PENDING:
        return order
    return _send(order, intent.request(), adapter, intent.deployment, now)


def _place(adapter: ExchangeAdapter, request: OrderRequest) -> Outcome:
    try:
        return Outcome(result=adapter.create_order(request))
    except OrderStatusUnknown as exc:
        return Outcome(status=OrderStatus.UNKNOWN, error=str(exc), critical=True)
    except TemporaryExchangeError as exc:
        if exc.placed is False:
            return Outcome(status=OrderStatus.ERROR, error=f"not placed: {exc}")
        return _lookup_after(adapter, request, exc)
    except PermanentExchangeError as exc:
        return Outcome(status=OrderStatus.REJECTED, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - unknown outcome: fail closed
        log.exception("order %s: unexpected adapter error", request.client_order_id)
        return Outcome(
            status=OrderStatus.UNKNOWN, error=f"{type(exc).__name__}: {exc}", critical=True
        )


def _lookup_after(adapter: ExchangeAdapter, request: OrderRequest, cause: Exception) -> Outcome:
    try:
        found = adapter.fetch_order_by_client_id(request.symbol, request.client_order_id)
    except ExchangeError as exc:
        return Outcome(
            status=OrderStatus.UNKNOWN, error=f"{cause}; lookup failed: {exc}", critical=True
        )
    if found is not None:
        return Outcome(result=found)
    return Outcome(status=OrderStatus.ERROR, error=f"not placed (lookup found nothing): {cause}")


def _send(
    order: Order,
    request: OrderRequest,
    adapter: ExchangeAdapter,
    deployment: Deployment,
    now: datetime,
) -> Order:
    started = time.perf_counter()
    outcome = _place(adapter, request)
    latency_ms = (time.perf_counter() - started) * 1000.0
    return _record_sent(order, outcome, deployment, now, latency_ms)


# --------------------------------------------------------------------------- record


def _status_of(result: OrderResult) -> str:
    if result.status == "closed":
        return OrderStatus.FILLED
    if result.status == "open":
        return OrderStatus.PARTIAL if result.filled > 0 else OrderStatus.OPEN
    if result.status == "rejected":
        return OrderStatus.REJECTED
    return OrderStatus.CANCELED


def _fee_quote(result: OrderResult, symbol: str, price: float) -> tuple[float, float]:
    """(fee valued in quote, fee charged in base) of the whole order so far. A fee in a
    third asset (BNB) is not valued (0) and shows up in reconciliation of the balance."""
    base, _, quote = symbol.partition("/")
    if result.fee_currency in (None, "", quote):
        return result.fee, 0.0
    if result.fee_currency == base:
        return result.fee * price, result.fee
    return 0.0, 0.0


def slippage_bps(side: str, reference: float | None, average: float | None) -> float | None:
    """Signed against us: a buy above / a sell below the reference is positive."""
    if not reference or not average:
        return None
    sign = 1.0 if side == "buy" else -1.0
    return sign * (average - reference) / reference * 10_000.0


@dataclass(frozen=True)
class _NewFill:
    qty: float
    price: float
    fee_quote: float
    base_fee: float


def _apply_result(order: Order, result: OrderResult) -> _NewFill | None:
    """The order's fields after ``result`` (in memory) and what filled since the last record."""
    fill = None
    delta = result.filled - order.filled_qty
    if delta > QTY_EPS:
        average = result.average or order.reference_price or 0.0
        prev_cost = (order.avg_fill_price or 0.0) * order.filled_qty
        price = (average * result.filled - prev_cost) / delta
        fee_total, base_fee_total = _fee_quote(result, order.symbol, average)
        if base_fee_total:
            # charged in the base asset: the order's fee so far is the base fee of its
            # fills so far valued at their average; this fill's part is the rest, valued
            # at this fill's own price (none of it is paid in quote)
            before = order.fee / order.avg_fill_price if order.avg_fill_price else 0.0
            base_delta = max(base_fee_total - before, 0.0)
            fee_delta = base_delta * price
        else:
            fee_delta, base_delta = max(fee_total - order.fee, 0.0), 0.0
        fill = _NewFill(delta, price, fee_delta, base_delta)
        order.filled_qty = result.filled
        order.avg_fill_price = average
        order.fee = fee_total
        order.slippage_bps = slippage_bps(order.side, order.reference_price, average)
    if result.exchange_order_id:
        order.exchange_order_id = result.exchange_order_id[:64]
    return fill


def _apply_outcome(
    order: Order, outcome: Outcome, submitted_at: datetime | None, latency_ms: float | None
) -> _NewFill | None:
    """Set the recorded fields of ``order`` (in memory) from ``outcome``."""
    if submitted_at is not None and order.submitted_at is None:
        order.submitted_at = submitted_at
        order.latency_ms = latency_ms
        order.acked_at = submitted_at + timedelta(milliseconds=latency_ms or 0.0)
    fill = None
    if outcome.result is not None:
        fill = _apply_result(order, outcome.result)
        order.status = _status_of(outcome.result)
        order.error = ""
    else:
        order.status = outcome.status
        order.error = outcome.error[:300]
    order.critical = order.critical or outcome.critical
    return fill


def _record_effects(
    order: Order, fill: _NewFill | None, deployment: Deployment | None, ts: datetime
) -> None:
    """What a recorded outcome writes besides the order row (in the caller's transaction):
    the fill, position and cash, an equity snapshot, the UNKNOWN alert, the audit record."""
    if fill is not None:
        books = getattr(deployment, "books", None) or {}
        portfolio.fill_record(
            order=order,
            qty=fill.qty,
            price=fill.price,
            fee_quote=fill.fee_quote,
            base_fee=fill.base_fee,
            ts=ts,
            known=books.get(order.symbol),
        )
    if fill is not None:
        dep = deployment if deployment is not None else Deployment(pk=order.deployment_id)
        portfolio.equity_snapshot_write(deployment=dep, ts=ts)
    if order.status == OrderStatus.UNKNOWN:
        _alert_unknown(order)
    # Last: the audit chain's head stays locked from here to the commit.
    audit_record(**_order_audit(order, fill.qty if fill is not None else 0.0))


def _order_audit(order: Order, filled: float) -> dict[str, Any]:
    return {
        "action": f"order.{order.status.lower()}",
        "actor": ACTOR,
        "target": order,
        "payload": _audit_payload(order, filled),
    }


def order_record(
    *,
    order_id: int,
    outcome: Outcome,
    deployment: Deployment | None = None,
    submitted_at: datetime | None = None,
    latency_ms: float | None = None,
    now: datetime | None = None,
) -> Order:
    """Record what the exchange said about an order, in one transaction: status, timing,
    fills, position, cash, an equity snapshot if anything filled, the audit record, and a
    critical alert for an UNKNOWN outcome."""
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order_id)
        fill = _apply_outcome(order, outcome, submitted_at, latency_ms)
        order.save(update_fields=RECORDED_FIELDS)
        _record_effects(order, fill, deployment, order.acked_at or now or timezone.now())
    return order


def _record_sent(
    order: Order,
    outcome: Outcome,
    deployment: Deployment,
    submitted_at: datetime,
    latency_ms: float,
) -> Order:
    """``order_record`` for the order this call persisted PENDING just before sending it:
    the row is claimed by a conditional update (still PENDING, never recorded) instead of
    a locking read. If anything recorded it meanwhile (a reconciliation), the locked path
    records this outcome over it, as ``order_record`` does."""
    fill = _apply_outcome(order, outcome, submitted_at, latency_ms)
    ts = order.acked_at or submitted_at
    known = (getattr(deployment, "books", None) or {}).get(order.symbol)
    if fill is not None and known is not None and connection.vendor == "postgresql":
        claim = portfolio.fill_record_claimed(
            order=order,
            pending=OrderStatus.PENDING,
            recorded={_COLUMNS[name]: getattr(order, name) for name in RECORDED_FIELDS},
            qty=fill.qty,
            price=fill.price,
            fee_quote=fill.fee_quote,
            base_fee=fill.base_fee,
            ts=ts,
            known=known,
            audit=audit_event(**_order_audit(order, fill.qty)),
        )
        if claim.written:
            return order
        # Not written: the position moved since it was read (its row is read locked
        # below), or the order was recorded meanwhile (the locked path records it again).
        deployment.books.pop(order.symbol, None)  # type: ignore[union-attr]
    with transaction.atomic():
        claimed = update_rows(
            Order,
            {"id": order.pk, "status": OrderStatus.PENDING, "submitted_at": None},
            {name: getattr(order, name) for name in RECORDED_FIELDS},
        )
        if claimed:
            _record_effects(order, fill, deployment, ts)
            return order
    return order_record(
        order_id=order.pk,
        outcome=outcome,
        deployment=deployment,
        submitted_at=submitted_at,
        latency_ms=latency_ms,
    )


def _audit_payload(order: Order, filled: float) -> dict[str, Any]:
    return {
        "client_order_id": order.client_order_id,
        "purpose": order.purpose,
        "symbol": order.symbol,
        "side": order.side,
        "signal_id": order.signal_id,
        "reference_price": order.reference_price,
        "status": order.status,
        "filled_now": filled,
        "filled_qty": order.filled_qty,
        "requested_qty": order.requested_qty,
        "avg_fill_price": order.avg_fill_price,
        "slippage_bps": order.slippage_bps,
        "latency_ms": order.latency_ms,
        "error": order.error,
    }


def _alert_unknown(order: Order) -> None:
    notify_critical(
        source="trading",
        key=f"order-unknown:{order.client_order_id}",
        message=f"Order {order.client_order_id} ({order.side} {order.requested_qty} "
        f"{order.symbol}) has an unknown outcome: trading halted for this deployment "
        "until reconciled",
        payload={"deployment_id": order.deployment_id, "order_id": order.pk, "error": order.error},
    )


# --------------------------------------------------------------------------- entry points


def _now(now: datetime | None) -> datetime:
    return now or timezone.now()


def order_place(
    *,
    deployment: Deployment,
    symbol: str,
    side: str,
    qty: float,
    client_order_id: str,
    purpose: str = ENTRY,
    reference_price: float | None = None,
    reduce_only: bool = False,
    signal: Signal | None = None,
    now: datetime | None = None,
    exchange: ExchangeAdapter | None = None,
) -> Order:
    """Place a market order of exactly ``qty`` (not rounded: filters are checked as is).

    Returns the Order (any status; REJECTED without ``submitted_at`` = refused before the
    exchange). Raises OrderRefused when the gate is closed (nothing written but an audit
    record). Idempotent by ``client_order_id``.
    """
    fresh = _fresh(deployment.pk, client_order_id)
    existing = _existing_of(fresh)
    if existing is not None:
        return existing
    now = _now(now)
    intent = Intent(
        fresh, symbol, side, qty, purpose, client_order_id, reference_price, reduce_only,
        signal.pk if signal is not None else None,
    )  # fmt: skip
    _gate(intent.deployment, reduce_only=reduce_only, payload=intent.summary())
    return _submit(intent, exchange or get_exchange(intent.deployment, fresh=True), now)


def entry_client_id(signal: Signal) -> str:
    return client_order_id("entry", signal.deployment_id, signal.pk)


def _signal_age_s(signal: Signal, now: datetime) -> float:
    """Seconds since the signal's candle closed (since it was made, without a candle)."""
    if signal.candle_id is None:
        return (now - signal.created_at).total_seconds()
    return now.timestamp() - (signal.candle.close_time_ms + 1) / 1000.0


def size_entry(deployment: Deployment, price: float, market: MarketInfo | None) -> float:
    """Full order size x the canary allocation, in base units, floored to the step (a size
    under one step is returned as is, for validation to refuse it with its reason)."""
    if not price or price <= 0 or not math.isfinite(price):
        return 0.0
    qty = deployment.full_order_notional * deployment.allocation / price
    floored = market.floor_qty(qty) if market is not None and qty > 0 else qty
    return floored if floored > 0 else qty  # below one step: refused as below the minimum


def order_for_signal(
    *, signal: Signal, now: datetime | None = None, exchange: ExchangeAdapter | None = None
) -> Order:
    """The router's entry point for a persisted buy Signal: one market buy of
    ``full_order_notional x allocation / signal.entry`` base units (floored to the step),
    client order id ``entry-<sha1(deployment, signal)>``. Spot: a sell signal never opens
    a short (OrderRefused); the strategy closes longs with ``order_close``."""
    client_id = entry_client_id(signal)
    deployment = _fresh(signal.deployment_id, client_id, entry_symbol=signal.symbol)
    existing = _existing_of(deployment)
    if existing is not None:
        return existing
    now = _now(now)
    payload = {"signal_id": signal.pk, "symbol": signal.symbol, "client_order_id": client_id}
    if signal.side != "buy":
        raise _refuse(deployment, "spot account: a sell signal opens no position", payload)
    _gate(deployment, reduce_only=False, payload=payload)
    age = _signal_age_s(signal, now)
    if age > settings.TRADING_SIGNAL_MAX_AGE_S:
        raise _refuse(deployment, f"stale signal: its candle closed {age:.0f} s ago", payload)
    adapter = exchange or get_exchange(deployment, fresh=True)
    market = _market_or_none(adapter, signal.symbol)
    qty = size_entry(deployment, signal.entry, market)
    intent = Intent(
        deployment, signal.symbol, "buy", qty, ENTRY, client_id, signal.entry, False, signal.pk
    )
    return _submit(intent, adapter, now)


def _market_or_none(adapter: ExchangeAdapter, symbol: str) -> MarketInfo | None:
    try:
        return _market(adapter, symbol)
    except ExchangeError:
        return None


def _reference(adapter: ExchangeAdapter, symbol: str, fallback: float | None) -> float | None:
    try:
        return adapter.fetch_ticker(symbol).last or fallback
    except ExchangeError:
        return fallback


def order_close(
    *,
    deployment: Deployment,
    symbol: str,
    key: str,
    purpose: str = EXIT,
    reference_price: float | None = None,
    signal: Signal | None = None,
    now: datetime | None = None,
    exchange: ExchangeAdapter | None = None,
) -> Order | None:
    """Close the deployment's long in ``symbol`` with a reduce-only market sell of the local
    position floored to the step (None when flat or only dust). Client order id
    ``exit-<sha1(deployment, symbol, key)>``; gated like any order (REDUCING allows it)."""
    client_id = exit_client_id(deployment.pk, symbol, key)
    deployment = _fresh(deployment.pk, client_id)
    existing = _existing_of(deployment)
    if existing is not None:
        return existing
    held, last_price = deployment.held.get(symbol, (0.0, None))  # type: ignore[attr-defined]
    if held <= 0:
        return None
    adapter = exchange or get_exchange(deployment, fresh=True)
    price = reference_price or _reference(adapter, symbol, last_price)
    market = _market_or_none(adapter, symbol)
    qty = market.tradable_qty(held, price) if market is not None else held
    if qty <= 0:
        return None
    now = _now(now)
    intent = Intent(
        deployment, symbol, "sell", qty, purpose, client_id, price, True,
        signal.pk if signal is not None else None,
    )  # fmt: skip
    _gate(deployment, reduce_only=True, payload=intent.summary())
    return _submit(intent, adapter, now)


# --------------------------------------------------------------------------- resolve


def _age_s(order: Order, now: datetime) -> float:
    return (now - (order.submitted_at or order.created_at)).total_seconds()


def order_resolve(
    *, order: Order, now: datetime | None = None, exchange: ExchangeAdapter | None = None
) -> Order:
    """Settle an order from the exchange's view, by client order id: found -> its status
    and fills are recorded; not found and older than TRADING_UNKNOWN_GRACE_S -> ERROR
    (never placed). Exchange errors propagate (ExchangeError); the order stays as it is."""
    now = _now(now)
    deployment = Deployment.objects.get(pk=order.deployment_id)
    adapter = exchange or get_exchange(deployment)
    found = adapter.fetch_order_by_client_id(order.symbol, order.client_order_id)
    if found is not None:
        return order_record(
            order_id=order.pk, outcome=Outcome(result=found), deployment=deployment, now=now
        )
    not_placed = order.status in (OrderStatus.PENDING, OrderStatus.UNKNOWN)
    if not_placed and _age_s(order, now) >= settings.TRADING_UNKNOWN_GRACE_S:
        outcome = Outcome(
            status=OrderStatus.ERROR,
            error=f"not found on the exchange after {settings.TRADING_UNKNOWN_GRACE_S:.0f} s: "
            f"never placed (was {order.status})",
        )
        return order_record(order_id=order.pk, outcome=outcome, deployment=deployment, now=now)
    return order


# --------------------------------------------------------------------------- flatten


def exit_client_id(deployment_id: int, symbol: str, key: str) -> str:
    """The client order id of ``order_close``'s exit for ``key`` (the strategy's:
    ``"<reason>:<candle id>"``)."""
    return client_order_id("exit", deployment_id, symbol, key)


def flatten_client_id(deployment: Deployment, key: str, symbol: str, attempt: int) -> str:
    return client_order_id("flat", deployment.pk, key, symbol, attempt)


def _cancel_open(
    deployment: Deployment, adapter: ExchangeAdapter, symbols: list[str], now: datetime
) -> dict[str, str]:
    errors: dict[str, str] = {}
    for symbol in symbols:
        try:
            canceled = adapter.cancel_all_orders(symbol)
        except ExchangeError as exc:
            errors[symbol] = f"cancel failed: {exc}"
            continue
        for result in canceled:
            local = Order.objects.filter(
                deployment_id=deployment.pk, client_order_id=result.client_order_id
            ).first()
            if local is not None:
                order_record(
                    order_id=local.pk,
                    outcome=Outcome(result=result),
                    deployment=deployment,
                    now=now,
                )
    return errors


def resolve_unsettled(
    deployment_id: int,
    adapter: ExchangeAdapter,
    symbols: Sequence[str],
    *,
    now: datetime | None = None,
    exclude: Iterable[str] = (),
) -> Iterator[tuple[Order, ExchangeError | None]]:
    """Each of the deployment's unsettled orders of ``symbols`` (but the client ids in
    ``exclude``) looked up by ``order_resolve``: the order as it is afterwards, and the
    exchange's error when the look-up failed (the order then as it was)."""
    orders = Order.objects.filter(
        deployment_id=deployment_id, symbol__in=symbols, status__in=UNSETTLED
    ).exclude(client_order_id__in=list(exclude))
    for order in orders:
        try:
            yield order_resolve(order=order, now=now, exchange=adapter), None
        except ExchangeError as exc:
            yield order, exc


def _settle(deployment: Deployment, adapter: ExchangeAdapter, symbols: list[str], now: datetime):
    errors: dict[str, str] = {}
    for order, error in resolve_unsettled(deployment.pk, adapter, symbols, now=now):
        if error is not None:
            errors[order.symbol] = f"could not settle {order.client_order_id}: {error}"
    return errors


def _last_attempt(deployment: Deployment, key: str, symbol: str) -> tuple[int, Order | None]:
    """The next attempt number and the latest existing attempt for (key, symbol)."""
    last = None
    for attempt in range(MAX_FLATTEN_ATTEMPTS):
        order = _existing(flatten_client_id(deployment, key, symbol, attempt))
        if order is None:
            return attempt, last
        last = order
    return MAX_FLATTEN_ATTEMPTS, last


def _flatten_symbol(
    deployment: Deployment,
    adapter: ExchangeAdapter,
    symbol: str,
    held: float,
    key: str,
    now: datetime,
) -> Order | None:
    attempt, last = _last_attempt(deployment, key, symbol)
    if last is not None and last.status in UNSETTLED:
        return last  # possibly live: never send a second close
    local = Position.objects.filter(deployment_id=deployment.pk, symbol=symbol).first()
    local_qty = local.qty if local is not None else 0.0
    qty_held = min(held, local_qty)
    if qty_held <= 0 or attempt >= MAX_FLATTEN_ATTEMPTS:
        return last
    price = _reference(adapter, symbol, local.last_price if local is not None else None)
    market = _market_or_none(adapter, symbol)
    qty = market.tradable_qty(qty_held, price) if market is not None else qty_held
    if qty <= 0:
        return last
    intent = Intent(
        deployment, symbol, "sell", qty, FLATTEN,
        flatten_client_id(deployment, key, symbol, attempt), price, True,
    )  # fmt: skip
    return _submit(intent, adapter, now)


def _flatten_symbols(deployment: Deployment) -> list[str]:
    held = Position.objects.filter(deployment_id=deployment.pk).exclude(qty=0)
    live = Order.objects.filter(deployment_id=deployment.pk, status__in=UNSETTLED)
    extra = [*held.values_list("symbol", flat=True), *live.values_list("symbol", flat=True)]
    return list(dict.fromkeys([*(deployment.symbols or []), *extra]))


def flatten(
    deployment: Deployment,
    *,
    reason: str,
    key: str | None = None,
    now: datetime | None = None,
    exchange: ExchangeAdapter | None = None,
) -> list[Order]:
    """Cancel the deployment's open orders and close every long with reduce-only market
    sells. Used by the rollback; skips the kill-switch gate (it only reduces).

    ``key`` (default: ``reason``) makes it idempotent: pass e.g. ``f"rollback-{id}-stage1"``.
    Close ids are ``flat-<sha1(deployment, key, symbol, attempt)>``: a retry finds the
    existing close by client id and never sends a second one while it may be live; a new
    attempt is made only when the previous one is final and a tradable holding remains.
    Sizes are min(exchange holding, local position) floored to the step (what cannot be
    traded stays as dust). Unsettled orders are resolved first. Returns the close orders
    (their own status says whether they filled); raises FlattenIncomplete when a cancel or a
    lookup failed (after doing the rest), ExchangeError when holdings cannot be read.
    """
    now = _now(now)
    key = key or reason
    adapter = exchange or get_exchange(deployment)
    paper_refresh(adapter, deployment)
    symbols = _flatten_symbols(deployment)
    errors = _cancel_open(deployment, adapter, symbols, now)
    errors.update(_settle(deployment, adapter, symbols, now))
    held = adapter.positions(symbols)
    orders = []
    for symbol in symbols:
        order = _flatten_symbol(deployment, adapter, symbol, held.get(symbol, 0.0), key, now)
        if order is not None:
            orders.append(order)
    with transaction.atomic():
        audit_record(
            action="trading.flatten",
            actor=ACTOR,
            target=deployment,
            payload={
                "reason": reason,
                "key": key,
                "orders": [o.client_order_id for o in orders],
                "statuses": [o.status for o in orders],
                "errors": errors,
            },
        )
    if errors:
        raise FlattenIncomplete(orders, errors)
    return orders
