"""Reconciliation: the exchange's view of a deployment against the local records.

``reconcile_deployment`` (a beat task every TRADING_RECONCILE_INTERVAL_S for every
deployment that trades or has unsettled orders):

1. settles unsettled local orders (PENDING older than the grace, UNKNOWN, OPEN, PARTIAL)
   by client order id (``execution.order_resolve``): fills found are recorded; an order
   the exchange does not know after TRADING_UNKNOWN_GRACE_S is marked ERROR (never
   placed). This is what lifts the router's UNKNOWN block;
2. compares open orders: open on the exchange but not locally, and the reverse;
3. compares positions: the exchange's holding vs ``Position.qty`` per symbol, beyond half
   a lot step;
4. stores a ReconciliationReport and, when anything differs, audits it and raises a
   critical alert (``alerts.services.alert_raise``, source "reconcile"; an audit record
   ``reconcile.alert`` when that is unavailable), deduplicated per deployment, day and set
   of differences.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record

from . import execution
from .exchange import ExchangeAdapter, ExchangeError
from .models import Deployment, Order, OrderStatus, Position, ReconciliationReport

log = logging.getLogger(__name__)

ACTOR = "reconcile"
LOCAL_OPEN = (OrderStatus.OPEN, OrderStatus.PARTIAL)


def _unsettled(deployment: Deployment, now: datetime) -> list[Order]:
    grace = now - timedelta(seconds=settings.TRADING_UNKNOWN_GRACE_S)
    orders = Order.objects.filter(deployment_id=deployment.pk, status__in=execution.UNSETTLED)
    return [o for o in orders if o.status != OrderStatus.PENDING or o.created_at <= grace]


def _settle(
    deployment: Deployment, adapter: ExchangeAdapter, now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    resolved, differences = [], []
    for order in _unsettled(deployment, now):
        before = order.status
        try:
            after = execution.order_resolve(order=order, now=now, exchange=adapter)
        except ExchangeError as exc:
            differences.append(
                {
                    "kind": "lookup_failed",
                    "client_order_id": order.client_order_id,
                    "error": str(exc),
                }
            )
            continue
        if after.status != before:
            resolved.append(
                {"client_order_id": order.client_order_id, "from": before, "to": after.status}
            )
        elif after.status == OrderStatus.UNKNOWN:
            differences.append({"kind": "unknown_order", "client_order_id": order.client_order_id})
    return resolved, differences


def _open_orders(
    deployment: Deployment, adapter: ExchangeAdapter, symbols: list[str]
) -> list[dict[str, Any]]:
    remote: dict[str, str] = {}
    for symbol in symbols:
        for result in adapter.fetch_open_orders(symbol):
            remote[result.client_order_id] = symbol
    local = dict(
        Order.objects.filter(deployment_id=deployment.pk, status__in=LOCAL_OPEN).values_list(
            "client_order_id", "symbol"
        )
    )
    ours = set(
        Order.objects.filter(
            deployment_id=deployment.pk, client_order_id__in=list(remote)
        ).values_list("client_order_id", flat=True)
    )
    diffs = [
        {
            "kind": "open_on_exchange_only",
            "client_order_id": cid,
            "symbol": symbol,
            "ours": cid in ours,
        }
        for cid, symbol in sorted(remote.items())
        if cid not in local
    ]
    diffs += [
        {"kind": "open_locally_only", "client_order_id": cid, "symbol": symbol}
        for cid, symbol in sorted(local.items())
        if cid not in remote
    ]
    return diffs


def _tolerance(adapter: ExchangeAdapter, symbol: str) -> float:
    try:
        step = adapter.market(symbol).step_size
    except ExchangeError:
        step = 0.0
    return max(step / 2, 1e-9)


def _positions(
    deployment: Deployment, adapter: ExchangeAdapter, symbols: list[str]
) -> list[dict[str, Any]]:
    remote = adapter.positions(symbols)
    local = dict(
        Position.objects.filter(deployment_id=deployment.pk, symbol__in=symbols).values_list(
            "symbol", "qty"
        )
    )
    diffs = []
    for symbol in symbols:
        have, ours = remote.get(symbol, 0.0), local.get(symbol, 0.0)
        if abs(have - ours) > _tolerance(adapter, symbol):
            diffs.append(
                {
                    "kind": "position",
                    "symbol": symbol,
                    "exchange": have,
                    "local": ours,
                    "diff": have - ours,
                }
            )
    return diffs


def _symbols(deployment: Deployment) -> list[str]:
    held = Position.objects.filter(deployment_id=deployment.pk).exclude(qty=0)
    return list(
        dict.fromkeys([*(deployment.symbols or []), *held.values_list("symbol", flat=True)])
    )


def _compare(deployment: Deployment, adapter: ExchangeAdapter, now: datetime):
    resolved, differences = _settle(deployment, adapter, now)
    symbols = _symbols(deployment)
    try:
        differences += _open_orders(deployment, adapter, symbols)
        differences += _positions(deployment, adapter, symbols)
    except ExchangeError as exc:
        differences.append({"kind": "exchange_unreachable", "error": str(exc)})
    return resolved, differences


def _digest(differences: list[dict[str, Any]]) -> str:
    stable = [{k: v for k, v in d.items() if k != "error"} for d in differences]
    text = json.dumps(stable, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def reconcile_deployment(
    *,
    deployment: Deployment,
    now: datetime | None = None,
    exchange: ExchangeAdapter | None = None,
) -> ReconciliationReport:
    """Compare, store the report, audit and alert on differences (see the module doc)."""
    now = now or timezone.now()
    try:
        adapter = exchange or execution.get_exchange(deployment)
        execution.paper_refresh(adapter, deployment)
        resolved, differences = _compare(deployment, adapter, now)
    except ExchangeError as exc:
        resolved, differences = [], [{"kind": "exchange_unreachable", "error": str(exc)}]
    with transaction.atomic():
        report = ReconciliationReport.objects.create(
            deployment=deployment, created_at=now, ok=not differences, differences=differences
        )
        if resolved or differences:
            audit_record(
                action="reconcile.differences" if differences else "reconcile.resolved",
                actor=ACTOR,
                target=deployment,
                payload={"report_id": report.pk, "resolved": resolved, "differences": differences},
            )
        if differences:
            _alert(deployment, report, now)
    return report


def _alert(deployment: Deployment, report: ReconciliationReport, now: datetime) -> None:
    kinds = sorted({d["kind"] for d in report.differences})
    execution.notify_critical(
        source="reconcile",
        key=f"deployment-{deployment.pk}:{now:%Y-%m-%d}:{_digest(report.differences)}",
        message=f"Reconciliation of {deployment.name}: {len(report.differences)} "
        f"difference(s) ({', '.join(kinds)})",
        payload={
            "deployment_id": deployment.pk,
            "report_id": report.pk,
            "differences": report.differences[:20],
        },
    )


def needs_reconcile(deployment: Deployment) -> bool:
    if deployment.allocation > 0:
        return True
    if Position.objects.filter(deployment=deployment).exclude(qty=0).exists():
        return True
    return Order.objects.filter(deployment=deployment, status__in=execution.UNSETTLED).exists()


def reconcile_all(*, now: datetime | None = None) -> list[ReconciliationReport]:
    """Beat task body: every deployment that trades, holds or has unsettled orders."""
    reports = []
    for deployment in Deployment.objects.order_by("pk"):
        if not needs_reconcile(deployment):
            continue
        try:
            reports.append(reconcile_deployment(deployment=deployment, now=now))
        except Exception:
            log.exception("reconciliation of deployment %s failed", deployment.pk)
    return reports
