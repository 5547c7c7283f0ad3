"""Reconciliation of local orders and positions with the exchange (the Binance stub through
CcxtExchange, and the paper exchange): reports, settlement of unknown orders, alerts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from alerts.models import Alert
from audit.models import AuditEvent
from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub
from tests.trading.test_execution import (  # noqa: F401 - fixtures
    ETH,
    _fresh_caches,
    buy,
    make_candle,
    make_deployment,
    switch,
)
from trading import execution, reconcile
from trading.exchange import OrderRequest
from trading.exchange_ccxt import CcxtExchange
from trading.models import Order, OrderStatus, Position, ReconciliationReport

ORDER = "/api/v3/order"


@pytest.fixture
def stub():
    with BinanceStub(timeout_sleep_s=1.0) as server:
        yield server


@pytest.fixture
def binance(stub):
    exchange = CcxtExchange(
        "binance",
        api_key=API_KEY,
        secret=API_SECRET,
        base_url=stub.base_url,
        timeout_ms=400,
        symbols=[ETH],
        sleep=lambda s: None,
        not_found_grace_s=0.0,
        lookup_attempts=2,
    )
    exchange.load_markets()
    return exchange


def stub_deployment():
    return make_deployment(exchange="binance", symbols=[ETH])


@pytest.mark.django_db
@pytest.mark.usefixtures("switch")
def test_paper_deployment_in_line_gives_a_clean_report():
    dep = make_deployment()
    buy(dep, make_candle())
    report = reconcile.reconcile_deployment(deployment=dep)
    assert report.ok and report.differences == []
    assert not AuditEvent.objects.filter(action__startswith="reconcile.").exists()
    assert not Alert.objects.exists()


@pytest.mark.django_db
@pytest.mark.usefixtures("switch")
def test_position_difference_is_recorded_and_alerted_once(binance, stub):
    dep = stub_deployment()
    execution.order_place(
        deployment=dep, symbol=ETH, side="buy", qty=2.0, client_order_id="b1",
        reference_price=0.05, exchange=binance,
    )  # fmt: skip
    Position.objects.filter(deployment=dep, symbol=ETH).update(qty=1.5)
    now = datetime(2024, 3, 1, 10, tzinfo=UTC)
    report = reconcile.reconcile_deployment(deployment=dep, now=now, exchange=binance)
    assert not report.ok
    assert report.differences == [
        {"kind": "position", "symbol": ETH, "exchange": 2.0, "local": 1.5, "diff": 0.5}
    ]
    alert = Alert.objects.get(source="reconcile")
    assert alert.severity == "critical"
    assert AuditEvent.objects.get(action="reconcile.differences").payload["report_id"] == report.pk
    reconcile.reconcile_deployment(deployment=dep, now=now + timedelta(minutes=1), exchange=binance)
    assert Alert.objects.filter(source="reconcile").count() == 1  # same differences, same day
    assert ReconciliationReport.objects.filter(ok=False).count() == 2


@pytest.mark.django_db
def test_without_alert_raise_the_alert_falls_back_to_the_audit_trail(binance, monkeypatch):
    import alerts.services

    monkeypatch.delattr(alerts.services, "alert_raise")
    dep = stub_deployment()
    Position.objects.create(deployment=dep, symbol=ETH, qty=3.0, avg_entry=0.05)
    reconcile.reconcile_deployment(deployment=dep, exchange=binance)
    event = AuditEvent.objects.get(action="reconcile.alert")
    assert event.payload["differences"][0]["kind"] == "position"
    assert not Alert.objects.exists()


@pytest.mark.django_db
def test_open_orders_unknown_to_either_side_are_differences(binance, stub):
    dep = stub_deployment()
    binance.create_order(
        OrderRequest(ETH, "buy", "limit", 1.0, price=0.04, client_order_id="foreign")
    )
    Order.objects.create(
        deployment=dep, client_order_id="gone", symbol=ETH, side="buy", type="limit",
        requested_qty=1.0, status=OrderStatus.OPEN, created_at=datetime.now(UTC),
    )  # fmt: skip
    stub.fail("GET", ORDER, status=400, code=-2013, msg="Order does not exist.", times=2)
    report = reconcile.reconcile_deployment(deployment=dep, exchange=binance)
    kinds = {(d["kind"], d["client_order_id"]) for d in report.differences}
    assert ("open_on_exchange_only", "foreign") in kinds
    assert ("open_locally_only", "gone") in kinds


@pytest.mark.django_db
@pytest.mark.usefixtures("switch")
def test_unknown_order_is_settled_and_the_block_lifted(binance, stub, settings):
    settings.TRADING_UNKNOWN_GRACE_S = 0.0
    dep = stub_deployment()
    stub.accept_then_timeout()
    stub.fail("GET", ORDER, status=503, times=2)
    dark = execution.order_place(
        deployment=dep, symbol=ETH, side="buy", qty=1.0, client_order_id="dark",
        reference_price=0.05, exchange=binance,
    )  # fmt: skip
    assert dark.status == OrderStatus.UNKNOWN
    assert reconcile.needs_reconcile(make_deployment(name="idle", allocation=0.0)) is False
    report = reconcile.reconcile_deployment(deployment=dep, exchange=binance)
    assert report.ok
    dark.refresh_from_db()
    assert dark.status == OrderStatus.FILLED and dark.critical
    resolved = AuditEvent.objects.get(action="reconcile.resolved").payload["resolved"]
    assert resolved == [{"client_order_id": "dark", "from": "UNKNOWN", "to": "FILLED"}]
    assert Position.objects.get(deployment=dep).qty == 1.0


@pytest.mark.django_db
def test_unreachable_exchange_is_a_difference(binance, stub):
    dep = stub_deployment()
    Position.objects.create(deployment=dep, symbol=ETH, qty=1.0, avg_entry=0.05)
    stub.fail("GET", "/api/v3/account", status=503, times=10)
    report = reconcile.reconcile_deployment(deployment=dep, exchange=binance)
    assert not report.ok and report.differences[0]["kind"] == "exchange_unreachable"


@pytest.mark.django_db
@pytest.mark.usefixtures("switch")
def test_reconcile_all_covers_trading_deployments_only():
    trading = make_deployment(name="trading")
    make_deployment(name="idle", allocation=0.0)
    reports = reconcile.reconcile_all()
    assert [r.deployment_id for r in reports] == [trading.pk]
