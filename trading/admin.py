"""Admin: read-only desk views of market data, deployments, signals, orders, fills,
positions, equity and reconciliation. Changes go through services (and their audit)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from . import portfolio, reconcile
from .models import (
    Candle,
    Deployment,
    EquitySnapshot,
    Fill,
    MarketStream,
    Order,
    Position,
    ReconciliationReport,
    Signal,
)

VIEW = "audit.view_desk"
RECONCILE = "audit.handle_alerts"


class DeskAdmin(admin.ModelAdmin):
    """Visible with view_desk; read-only."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(VIEW)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(VIEW)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Deployment)
class DeploymentAdmin(DeskAdmin):
    list_display = (
        "name",
        "exchange",
        "timeframe",
        "allocation",
        "kill_switch",
        "cash",
        "equity",
        "signals_enabled",
    )
    actions = ["reconcile_now"]

    @admin.display(description="equity")
    def equity(self, obj: Deployment) -> str:
        return f"{portfolio.deployment_equity(obj.pk).equity:.8g} {obj.quote_currency}"

    def has_reconcile_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(RECONCILE)

    @admin.action(description="Reconcile with the exchange now", permissions=["reconcile"])
    def reconcile_now(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        for deployment in queryset:
            report = reconcile.reconcile_deployment(deployment=deployment)
            level = messages.SUCCESS if report.ok else messages.WARNING
            text = "in line" if report.ok else f"{len(report.differences)} difference(s)"
            self.message_user(request, f"{deployment.name}: {text}", level)


@admin.register(Signal)
class SignalAdmin(DeskAdmin):
    list_display = (
        "created_at",
        "deployment",
        "symbol",
        "side",
        "score",
        "entry",
        "stop",
        "target",
    )
    list_filter = ("deployment", "symbol", "side", "score")
    list_select_related = ("deployment",)


class FillInline(admin.TabularInline):
    model = Fill
    extra = 0
    can_delete = False
    readonly_fields = ("qty", "price", "fee", "ts")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Order)
class OrderAdmin(DeskAdmin):
    list_display = (
        "created_at",
        "deployment",
        "purpose",
        "symbol",
        "side",
        "requested_qty",
        "filled_qty",
        "avg_fill_price",
        "slippage_bps",
        "latency_ms",
        "status",
        "critical",
    )
    list_filter = ("status", "purpose", "critical", "deployment", "symbol")
    search_fields = ("client_order_id", "exchange_order_id")
    list_select_related = ("deployment",)
    inlines = [FillInline]


@admin.register(Position)
class PositionAdmin(DeskAdmin):
    list_display = ("deployment", "symbol", "qty", "avg_entry", "last_price", "realised_pnl")
    list_select_related = ("deployment",)

    @admin.display(description="unrealised")
    def unrealised(self, obj: Position) -> float:
        return obj.unrealised_pnl


@admin.register(EquitySnapshot)
class EquitySnapshotAdmin(DeskAdmin):
    list_display = ("ts", "deployment", "cash", "positions_value", "equity", "peak", "drawdown_pct")
    list_filter = ("deployment",)
    date_hierarchy = "ts"


@admin.register(ReconciliationReport)
class ReconciliationReportAdmin(DeskAdmin):
    list_display = ("created_at", "deployment", "ok")
    list_filter = ("ok", "deployment")


@admin.register(MarketStream)
class MarketStreamAdmin(DeskAdmin):
    list_display = (
        "exchange",
        "symbol",
        "timeframe",
        "last_open_time_ms",
        "last_received_at",
        "candles_received",
    )


@admin.register(Candle)
class CandleAdmin(DeskAdmin):
    list_display = (
        "exchange",
        "symbol",
        "timeframe",
        "open_time_ms",
        "close",
        "volume",
        "source",
        "late",
    )
    list_filter = ("exchange", "symbol", "timeframe", "source", "late")
