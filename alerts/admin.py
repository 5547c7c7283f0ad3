"""Admin: rules (validated through the detectors' params), alerts with operator actions,
silences, deliveries. Every change goes through a service, which audits it."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from . import services
from .models import Alert, AlertComment, AlertRule, AlertSubscription, Delivery, Silence

VIEW = "audit.view_desk"
SILENCE_FROM_ADMIN_S = 3600.0


class _DeskAdmin(admin.ModelAdmin):
    """Visible with view_desk; read-only unless a subclass says otherwise."""

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

    def has_handle_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(services.HANDLE)


@admin.register(AlertRule)
class AlertRuleAdmin(_DeskAdmin):
    list_display = ("detector", "symbol", "timeframe", "enabled", "severity", "rate_limit_s")
    list_filter = ("detector", "enabled", "severity")

    def _manage(self, request: HttpRequest) -> bool:
        return request.user.has_perm(services.MANAGE_RULES)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self._manage(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._manage(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._manage(request)

    def save_model(self, request: HttpRequest, obj: AlertRule, form: Any, change: bool) -> None:
        services.rule_save(rule=obj, actor=request.user, request=request)

    def delete_model(self, request: HttpRequest, obj: AlertRule) -> None:
        services.rule_delete(rule=obj, actor=request.user, request=request)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for rule in queryset:
            services.rule_delete(rule=rule, actor=request.user, request=request)


class DeliveryInline(admin.TabularInline):
    model = Delivery
    extra = 0
    can_delete = False
    fields = ("channel", "recipient", "status", "attempts", "error", "sent_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class CommentInline(admin.TabularInline):
    model = AlertComment
    extra = 0
    can_delete = False
    fields = ("author", "text", "created_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _each(request: HttpRequest, queryset: QuerySet, modeladmin: Any, call: Any) -> None:
    done = 0
    for obj in queryset:
        try:
            call(obj)
            done += 1
        except (PermissionDenied, ValidationError) as err:
            modeladmin.message_user(request, f"{obj}: {err}", messages.ERROR)
    modeladmin.message_user(request, f"{done} done", messages.SUCCESS)


@admin.register(Alert)
class AlertAdmin(_DeskAdmin):
    list_display = (
        "id",
        "detected_at",
        "severity",
        "detector",
        "direction",
        "symbol",
        "timeframe",
        "value",
        "decision",
        "acknowledged_at",
    )
    list_filter = ("severity", "detector", "decision", "suppressed", "source")
    search_fields = ("symbol", "message")
    inlines = (DeliveryInline, CommentInline)
    actions = ("acknowledge", "silence_for_an_hour")

    @admin.action(description="Acknowledge", permissions=["handle"])
    def acknowledge(self, request: HttpRequest, queryset: QuerySet) -> None:
        _each(
            request,
            queryset,
            self,
            lambda a: services.alert_acknowledge(
                alert_id=a.pk, actor=request.user, request=request
            ),
        )

    @admin.action(description="Silence symbol + detector for 1 hour", permissions=["handle"])
    def silence_for_an_hour(self, request: HttpRequest, queryset: QuerySet) -> None:
        pairs = sorted({(a.symbol, a.detector) for a in queryset})
        _each(
            request,
            pairs,  # type: ignore[arg-type]
            self,
            lambda pair: services.silence_create(
                actor=request.user,
                symbol=pair[0],
                detector=pair[1],
                reason="silenced from the admin",
                duration_s=SILENCE_FROM_ADMIN_S,
                request=request,
            ),
        )


@admin.register(Silence)
class SilenceAdmin(_DeskAdmin):
    list_display = ("id", "symbol", "detector", "reason", "author", "expires_at", "ended_at")
    actions = ("end_silence",)

    @admin.action(description="Un-silence", permissions=["handle"])
    def end_silence(self, request: HttpRequest, queryset: QuerySet) -> None:
        _each(
            request,
            queryset,
            self,
            lambda s: services.silence_end(silence_id=s.pk, actor=request.user, request=request),
        )


@admin.register(Delivery)
class DeliveryAdmin(_DeskAdmin):
    list_display = ("id", "alert", "channel", "recipient", "status", "attempts", "sent_at")
    list_filter = ("channel", "status")


@admin.register(AlertSubscription)
class AlertSubscriptionAdmin(_DeskAdmin):
    list_display = ("user", "email", "min_severity")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self.has_handle_permission(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_handle_permission(request)

    def save_model(
        self, request: HttpRequest, obj: AlertSubscription, form: Any, change: bool
    ) -> None:
        services.subscription_save(subscription=obj, actor=request.user, request=request)
