"""Close-all (rollback stage 1) while the exchange misbehaves: the real ccxt client against
the Binance stub answering 5xx, timing out (before and after processing the order) and
rate limiting with 429 + Retry-After, on orders, cancels, lookups, balances and tickers.

Positions must still end flat with exactly one filled closing sell per symbol, no client
order id sent twice, and the database's closing orders matching the exchange's.
(Single-order faults through the router: tests/trading/test_execution.py test_stub_*;
a worker killed in stage 1: tests/safety/test_rollback_worker.py.)
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import pytest

from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub, StubMarket

pytestmark = [pytest.mark.django_db(transaction=True)]

BASES = ["F0", "F1", "F2", "F3"]
SYMBOLS = [f"{b}/BTC" for b in BASES]
HELD = 3.0
ORDER = ("POST", "/api/v3/order")
RETRY_AFTER_S = 2.0


@pytest.fixture
def stub():
    markets = [
        StubMarket(f"{b}BTC", b, "BTC", 0.002 * (n + 1), "0.01", "0.01", "0.000001", "0.0001")
        for n, b in enumerate(BASES)
    ]
    with BinanceStub(markets, balances={"BTC": 1.0}, timeout_sleep_s=1.2) as server:
        for base in BASES:
            server.set_balance(base, HELD)
        yield server


@pytest.fixture
def faulty(stub, settings, safety_tmp, deployment_factory, redis_url):
    """A binance deployment holding every symbol, its stage 1 pointed at the stub."""
    from canary import killswitch
    from trading.models import KillSwitch, Position

    settings.SAFETY_EXCHANGE_OVERRIDE = {
        "kind": "ccxt", "exchange_id": "binance", "base_url": stub.base_url,
        "api_key": API_KEY, "api_secret": API_SECRET, "timeout_ms": 800,
    }  # fmt: skip
    settings.SAFETY_ORDER_GRACE_S = 0.5
    settings.TRADING_UNKNOWN_GRACE_S = 0.0
    deployment = deployment_factory(symbols=tuple(SYMBOLS), exchange="binance")
    for n, symbol in enumerate(SYMBOLS):
        price = 0.002 * (n + 1)
        Position.objects.create(
            deployment=deployment, symbol=symbol, qty=HELD, avg_entry=price, last_price=price
        )
    killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
    return deployment


def _inject(stub: BinanceStub) -> None:
    stub.fail(*ORDER, status=500)
    stub.fail(*ORDER, status=429, retry_after=RETRY_AFTER_S)
    stub.timeout(*ORDER)  # never processed; the client gives up
    stub.accept_then_timeout()  # processed; the reply comes too late
    stub.fail("GET", "/api/v3/order", status=503)
    stub.fail("DELETE", "/api/v3/openOrders", status=502)
    stub.fail("GET", "/api/v3/account", status=429, retry_after=1)
    stub.fail("GET", "/api/v3/ticker/24hr", status=500)


def test_close_all_ends_flat_without_a_duplicate_order(faulty, stub):
    from canary.models import Rollback, RollbackState
    from canary.rollback import rollback_request
    from trading.models import Order

    _inject(stub)
    rollback = rollback_request(
        deployment=faulty, trigger="gate", cause="exchange faults", actor="monitor"
    )
    rollback = Rollback.objects.get(pk=rollback.pk)

    assert rollback.state == RollbackState.COMPLETED, rollback.report
    assert all(stub.balance(b) == (Decimal(0), Decimal(0)) for b in BASES)
    posts = [r for r in stub.log if (r.method, r.path) == ORDER]
    assert {r.status for r in posts} >= {500, 429, 504}, "a fault was not consumed"
    sent = [r.params["newClientOrderId"] for r in posts]
    assert len(sent) == len(set(sent)), "a client order id was sent twice"
    filled = [o for o in stub.orders.values() if o.executed_qty > 0]
    assert Counter(o.symbol for o in filled) == Counter(f"{b}BTC" for b in BASES)
    assert all(o.side == "SELL" for o in stub.orders.values())
    closes = Order.objects.filter(deployment=faulty, purpose="flatten")
    recorded = {o.client_order_id: o.status for o in closes}
    assert {cid for cid, status in recorded.items() if status == "FILLED"} == {
        o.client_order_id for o in filled
    }
    assert set(recorded.values()) <= {"FILLED", "ERROR"}, recorded
    print(
        f"\nclose-all under faults: {len(posts)} order requests for {len(BASES)} symbols, "
        f"{len(stub.log)} requests in all, statuses {Counter(r.status for r in posts)}, "
        f"stage 1 {rollback.report['stage1']['run_s']} s"
    )


def test_close_all_waits_out_a_retry_after(faulty, stub):
    from canary.rollback import rollback_request

    stub.fail(*ORDER, status=429, retry_after=RETRY_AFTER_S)
    rollback_request(deployment=faulty, trigger="gate", cause="rate limited", actor="monitor")
    posts = sorted((r for r in stub.log if (r.method, r.path) == ORDER), key=lambda r: r.at)
    [limited] = [r for r in posts if r.status == 429]
    symbol = limited.params["symbol"]
    retry = next(
        r.at - limited.at for r in posts if r.at > limited.at and r.params["symbol"] == symbol
    )
    assert all(stub.balance(b) == (Decimal(0), Decimal(0)) for b in BASES)
    assert retry >= RETRY_AFTER_S, f"{symbol} sent again {retry:.2f} s after its 429"
