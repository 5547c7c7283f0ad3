"""REST API of the alerts app (token or session auth). Views only call services and
selectors; a refused action answers 403 and is recorded in the audit trail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import selectors, services
from .models import Alert, AlertRule, Delivery, Silence

VIEW = "audit.view_desk"


class AlertSerializer(serializers.ModelSerializer):
    class Meta:
        model = Alert
        fields = [
            "id",
            "source",
            "exchange",
            "symbol",
            "timeframe",
            "detector",
            "direction",
            "value",
            "severity",
            "message",
            "payload",
            "event_ms",
            "suppressed",
            "decision",
            "suppressed_reason",
            "candle_close_at",
            "ingested_at",
            "detected_at",
            "acknowledged_at",
            "acknowledged_by",
        ]


class DeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = Delivery
        fields = ["id", "channel", "recipient", "status", "attempts", "error", "sent_at"]


class SilenceSerializer(serializers.ModelSerializer):
    author = serializers.CharField(source="author.username", read_only=True)

    class Meta:
        model = Silence
        fields = ["id", "symbol", "detector", "reason", "author", "created_at", "expires_at"]
        read_only_fields = fields


class RuleSerializer(serializers.ModelSerializer):
    class Meta:
        model = AlertRule
        fields = [
            "id",
            "detector",
            "params",
            "symbol",
            "timeframe",
            "enabled",
            "severity",
            "rate_limit_s",
            "updated_at",
        ]
        read_only_fields = ["id", "updated_at"]
        validators: list = []


def _run(call: Callable[[], Any], ok: Callable[[Any], Response]) -> Response:
    """Call a service; map its refusals and validation errors to HTTP answers."""
    try:
        result = call()
    except services.AlertActionDenied as err:
        return Response({"error": str(err)}, status=status.HTTP_403_FORBIDDEN)
    except ObjectDoesNotExist:
        return Response({"error": "not found"}, status=status.HTTP_404_NOT_FOUND)
    except ValidationError as err:
        errors = err.message_dict if hasattr(err, "message_dict") else {"error": err.messages}
        return Response({"errors": errors}, status=status.HTTP_400_BAD_REQUEST)
    return ok(result)


def _may_view(request: Request, op: str) -> Response | None:
    try:
        services.require_permission(request.user, VIEW, op, request)
    except services.AlertActionDenied as err:
        return Response({"error": str(err)}, status=status.HTTP_403_FORBIDDEN)
    return None


class AlertListView(APIView):
    def get(self, request: Request) -> Response:
        if refused := _may_view(request, "list alerts"):
            return refused
        qs = Alert.objects.all()
        for name in ("symbol", "detector", "severity", "source", "timeframe"):
            if value := request.query_params.get(name):
                qs = qs.filter(**{name: value})
        if request.query_params.get("unacknowledged") in ("1", "true"):
            qs = qs.filter(acknowledged_at__isnull=True)
        if (suppressed := request.query_params.get("suppressed")) in ("0", "1", "true", "false"):
            qs = qs.filter(suppressed=suppressed in ("1", "true"))
        try:
            limit = max(1, min(500, int(request.query_params.get("limit", 50))))
        except ValueError:
            return Response({"errors": {"limit": ["must be an integer"]}}, status=400)
        return Response({"results": AlertSerializer(qs[:limit], many=True).data})


class AlertDetailView(APIView):
    def get(self, request: Request, pk: int) -> Response:
        if refused := _may_view(request, "view alert"):
            return refused
        alert = Alert.objects.filter(pk=pk).first()
        if alert is None:
            return Response({"error": "not found"}, status=status.HTTP_404_NOT_FOUND)
        data = AlertSerializer(alert).data
        data["deliveries"] = DeliverySerializer(alert.deliveries.order_by("pk"), many=True).data
        data["comments"] = [
            {"author": c.author.username, "text": c.text, "created_at": c.created_at}
            for c in alert.comments.select_related("author")
        ]
        return Response(data)


class AlertAckView(APIView):
    def post(self, request: Request, pk: int) -> Response:
        return _run(
            lambda: services.alert_acknowledge(alert_id=pk, actor=request.user, request=request),
            lambda alert: Response(AlertSerializer(alert).data),
        )


class AlertCommentView(APIView):
    def post(self, request: Request, pk: int) -> Response:
        text = request.data.get("text", "") if isinstance(request.data, dict) else ""
        return _run(
            lambda: services.alert_comment(
                alert_id=pk, actor=request.user, text=str(text), request=request
            ),
            lambda c: Response({"id": c.pk, "alert": c.alert_id}, status=201),
        )


class SilenceListView(APIView):
    def get(self, request: Request) -> Response:
        if refused := _may_view(request, "list silences"):
            return refused
        active = Silence.objects.filter(ended_at__isnull=True, expires_at__gt=timezone.now())
        qs = active.order_by("-created_at", "-id").select_related("author")
        return Response({"results": SilenceSerializer(qs[:200], many=True).data})

    def post(self, request: Request) -> Response:
        body = request.data if isinstance(request.data, dict) else {}
        return _run(
            lambda: services.silence_create(
                actor=request.user,
                symbol=str(body.get("symbol") or ""),
                detector=str(body.get("detector") or ""),
                reason=str(body.get("reason") or ""),
                duration_s=body.get("duration_s"),
                request=request,
            ),
            lambda s: Response(SilenceSerializer(s).data, status=201),
        )


class SilenceEndView(APIView):
    def post(self, request: Request, pk: int) -> Response:
        return _run(
            lambda: services.silence_end(silence_id=pk, actor=request.user, request=request),
            lambda s: Response(SilenceSerializer(s).data),
        )


class RuleListView(APIView):
    def get(self, request: Request) -> Response:
        if refused := _may_view(request, "list rules"):
            return refused
        return Response({"results": RuleSerializer(AlertRule.objects.all(), many=True).data})

    def post(self, request: Request) -> Response:
        serializer = RuleSerializer(data=request.data)
        if not serializer.is_valid():
            return Response({"errors": serializer.errors}, status=400)
        rule = AlertRule(**serializer.validated_data)
        return _run(
            lambda: services.rule_save(rule=rule, actor=request.user, request=request),
            lambda r: Response(RuleSerializer(r).data, status=201),
        )


class RuleDetailView(APIView):
    def patch(self, request: Request, pk: int) -> Response:
        rule = AlertRule.objects.filter(pk=pk).first()
        if rule is None:
            return Response({"error": "not found"}, status=status.HTTP_404_NOT_FOUND)
        serializer = RuleSerializer(rule, data=request.data, partial=True)
        if not serializer.is_valid():
            return Response({"errors": serializer.errors}, status=400)
        for name, value in serializer.validated_data.items():
            setattr(rule, name, value)
        return _run(
            lambda: services.rule_save(rule=rule, actor=request.user, request=request),
            lambda r: Response(RuleSerializer(r).data),
        )

    def delete(self, request: Request, pk: int) -> Response:
        rule = AlertRule.objects.filter(pk=pk).first()
        if rule is None:
            return Response({"error": "not found"}, status=status.HTTP_404_NOT_FOUND)
        return _run(
            lambda: services.rule_delete(rule=rule, actor=request.user, request=request),
            lambda _: Response(status=204),
        )


class LatencyView(APIView):
    def get(self, request: Request) -> Response:
        if refused := _may_view(request, "view latency"):
            return refused
        since = parse_datetime(request.query_params.get("since", "") or "")
        channel = request.query_params.get("channel") or None
        return Response(selectors.latency_stats(since=since, channel=channel))
