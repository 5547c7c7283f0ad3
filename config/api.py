"""API-wide pieces of /api/v1/: one error shape, query-filter helpers, the OpenAPI schema's
common error responses, the schema of the alerts and market views (declared here through
drf-spectacular view extensions, so their modules stay as they are), and the deliveries
read endpoint.

Every error answers ``{"error": "..."}`` plus, where they apply, ``field``/``reasons`` (a
refused action), ``fields`` (invalid input, per field) and DRF's ``detail``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from django.db import DataError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.defaults import page_not_found
from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import exceptions, serializers
from rest_framework.generics import ListAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from audit.permissions import CanViewDesk

from .parsers import NUL

logger = logging.getLogger(__name__)

# --- errors -------------------------------------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    error = serializers.CharField(required=False, help_text="what went wrong")
    detail = serializers.CharField(required=False)
    field = serializers.CharField(required=False, allow_null=True, help_text="the field at fault")
    reasons = serializers.ListField(child=serializers.CharField(), required=False)
    fields = serializers.JSONField(required=False, help_text="invalid input: field -> messages")
    errors = serializers.JSONField(required=False, help_text="invalid items or fields")
    conflicts = serializers.JSONField(required=False)

    class Meta:
        ref_name = "Error"


ERROR_TEXT = {
    400: "Invalid input, naming the field",
    401: "Not authenticated",
    403: "Permission denied (the refusal is recorded in the audit trail)",
    404: "Not found",
    409: "Refused in the current state (recorded in the audit trail)",
    429: "Throttled",
    503: "A dependency failed; nothing changed",
}


def error_responses(*codes: int) -> dict[int, OpenApiResponse]:
    return {code: OpenApiResponse(ErrorSerializer, description=ERROR_TEXT[code]) for code in codes}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, answering in the API's error shape. A value the database refuses
    (a NUL character, a time zone offset out of its range) is the client's input: 400."""
    if isinstance(exc, DataError):
        logger.warning("input refused by the database: %s", type(exc.__cause__).__name__)
        return Response({"error": "invalid input: a value the database cannot store"}, 400)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(exc, exceptions.ValidationError):
        fields = data if isinstance(data, Mapping) else {"non_field_errors": data}
        response.data = {"error": "invalid input", "fields": fields}
    elif isinstance(data, Mapping) and "detail" in data:
        response.data = {"error": str(data["detail"]), "detail": str(data["detail"])}
    return response


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler404: JSON under /api/ (an id that is not a number, an unknown path), the
    ordinary page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"error": "not found", "detail": "not found"}, status=404)
    return page_not_found(request, exception or Http404())


# --- query filters ------------------------------------------------------------------------


def filter_choice(params: Mapping[str, Any], name: str, choices: Iterable[str]) -> str | None:
    """The query parameter ``name`` if given; 400 naming it when not one of ``choices``."""
    value = params.get(name)
    if value in (None, ""):
        return None
    allowed = list(choices)
    if value not in allowed:
        raise exceptions.ValidationError({name: [f"must be one of: {', '.join(allowed)}"]})
    return str(value)


def filter_text(params: Mapping[str, Any], name: str, max_length: int = 200) -> str | None:
    value = params.get(name)
    if value in (None, ""):
        return None
    if NUL in value:
        raise exceptions.ValidationError({name: ["NUL characters are not allowed"]})
    if len(value) > max_length:
        raise exceptions.ValidationError({name: [f"at most {max_length} characters"]})
    return str(value)


def filter_int(params: Mapping[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise exceptions.ValidationError({name: ["must be an integer"]}) from None
    if not 0 <= number <= 2**63 - 1:
        raise exceptions.ValidationError({name: ["out of range"]})
    return number


# --- schema: common responses -------------------------------------------------------------

ERROR_REF = {"$ref": "#/components/schemas/Error"}
METHODS = ("get", "post", "put", "patch", "delete")


def add_common_responses(result: dict, generator: Any, request: Any, public: bool) -> dict:
    """Postprocessing hook: every authenticated operation documents 401, 403 and 429; an
    operation with parameters or a body documents 400, one on a path with an id 404."""
    for path, item in result.get("paths", {}).items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            codes = ["429"]
            if operation.get("security") != [{}]:
                codes += ["401", "403"]
            if operation.get("parameters") or operation.get("requestBody"):
                codes.append("400")
            if "{" in path:
                codes.append("404")
            responses = operation.setdefault("responses", {})
            for code in codes:
                responses.setdefault(
                    code,
                    {
                        "description": ERROR_TEXT[int(code)],
                        "content": {"application/json": {"schema": ERROR_REF}},
                    },
                )
    return result


# --- schema of the alerts and market views ------------------------------------------------


def _alert_serializers() -> tuple[Any, Any, Any, Any]:
    from alerts.api import AlertSerializer, DeliverySerializer, RuleSerializer, SilenceSerializer

    return AlertSerializer, DeliverySerializer, SilenceSerializer, RuleSerializer


def _results(name: str, item: Any) -> Any:
    return inline_serializer(name, fields={"results": item(many=True)})


def _alerts_schema(target: type) -> type:
    from alerts import api

    alert, delivery, silence, rule = _alert_serializers()
    detail = inline_serializer(
        "AlertDetail",
        fields={
            **{k: v for k, v in alert().get_fields().items()},
            "deliveries": delivery(many=True),
            "comments": inline_serializer(
                "AlertComment",
                fields={
                    "author": serializers.CharField(),
                    "text": serializers.CharField(),
                    "created_at": serializers.DateTimeField(),
                },
                many=True,
            ),
        },
    )
    silence_input = inline_serializer(
        "SilenceInput",
        fields={
            "symbol": serializers.CharField(required=False, help_text="blank: every symbol"),
            "detector": serializers.CharField(required=False, help_text="blank: every detector"),
            "reason": serializers.CharField(),
            "duration_s": serializers.FloatField(help_text="how long, in seconds"),
        },
    )
    schemas: dict[type, dict[str, Any]] = {
        api.AlertListView: {
            "get": extend_schema(
                summary="Alerts, newest first, filtered",
                operation_id="alerts_list",
                parameters=[
                    *(
                        OpenApiParameter(name, str)
                        for name in ("symbol", "detector", "severity", "source", "timeframe")
                    ),
                    OpenApiParameter("unacknowledged", bool),
                    OpenApiParameter("suppressed", bool),
                    OpenApiParameter("limit", int, description="1..500, default 50"),
                ],
                responses={200: _results("AlertList", alert), **error_responses(400, 403)},
            )
        },
        api.AlertDetailView: {
            "get": extend_schema(
                summary="One alert with its deliveries and comments",
                responses={200: detail, **error_responses(403, 404)},
            )
        },
        api.AlertAckView: {
            "post": extend_schema(
                summary="Acknowledge an alert (needs audit.handle_alerts)",
                request=None,
                responses={200: alert, **error_responses(400, 403, 404)},
            )
        },
        api.AlertCommentView: {
            "post": extend_schema(
                summary="Comment on an alert (needs audit.handle_alerts)",
                request=inline_serializer("CommentInput", fields={"text": serializers.CharField()}),
                responses={
                    201: inline_serializer(
                        "CommentCreated",
                        fields={
                            "id": serializers.IntegerField(),
                            "alert": serializers.IntegerField(),
                        },
                    ),
                    **error_responses(400, 403, 404),
                },
            )
        },
        api.SilenceListView: {
            "get": extend_schema(
                summary="Active silences",
                responses={200: _results("SilenceList", silence), **error_responses(403)},
            ),
            "post": extend_schema(
                summary="Silence a symbol and/or detector (needs audit.handle_alerts)",
                request=silence_input,
                responses={201: silence, **error_responses(400, 403)},
            ),
        },
        api.SilenceEndView: {
            "post": extend_schema(
                summary="End a silence (needs audit.handle_alerts)",
                request=None,
                responses={200: silence, **error_responses(400, 403, 404)},
            )
        },
        api.RuleListView: {
            "get": extend_schema(
                summary="Alert rules",
                responses={200: _results("RuleList", rule), **error_responses(403)},
            ),
            "post": extend_schema(
                summary="Add an alert rule (needs audit.manage_rules)",
                request=rule,
                responses={201: rule, **error_responses(400, 403)},
            ),
        },
        api.RuleDetailView: {
            "patch": extend_schema(
                summary="Change an alert rule (needs audit.manage_rules)",
                request=rule,
                responses={200: rule, **error_responses(400, 403, 404)},
            ),
            "delete": extend_schema(
                summary="Delete an alert rule (needs audit.manage_rules)",
                responses={204: None, **error_responses(403, 404)},
            ),
        },
        api.LatencyView: {
            "get": extend_schema(
                summary="Alert delivery latency statistics",
                parameters=[
                    OpenApiParameter("since", OpenApiTypes.DATETIME),
                    OpenApiParameter("channel", str),
                ],
                responses={200: OpenApiTypes.OBJECT, **error_responses(403)},
            )
        },
    }
    return extend_schema_view(**schemas[target])(type(target.__name__, (target,), {}))


def _candles_schema(target: type) -> type:
    from django.conf import settings

    candle = inline_serializer(
        "CandleInput",
        fields={
            "exchange": serializers.CharField(max_length=40),
            "symbol": serializers.CharField(max_length=40),
            "timeframe": serializers.ChoiceField(choices=settings.MARKET_TIMEFRAMES),
            "open_time_ms": serializers.IntegerField(min_value=0),
            "open": serializers.FloatField(),
            "high": serializers.FloatField(),
            "low": serializers.FloatField(),
            "close": serializers.FloatField(),
            "volume": serializers.FloatField(),
        },
        many=True,
    )
    result = inline_serializer(
        "CandlesIngested",
        fields={
            "created": serializers.IntegerField(),
            "duplicates": serializers.IntegerField(),
            "late": serializers.IntegerField(),
            "ids": serializers.ListField(child=serializers.IntegerField()),
        },
    )
    schema = extend_schema(
        summary="Ingest a batch of closed candles",
        description='A JSON array of candles, or {"candles": [...]}; at most '
        f"{settings.MAX_CANDLES_PER_BATCH}. 201 when any was stored, 200 when all were "
        "duplicates; 400 (nothing stored) lists each offending item; 409 (nothing stored, "
        "recorded) when a key is already stored with other values.",
        request=candle,
        responses={
            201: result,
            200: result,
            **error_responses(400, 403, 409),
        },
    )
    return extend_schema_view(post=schema)(type(target.__name__, (target,), {}))


def _extension(target: str, build: Any) -> type[OpenApiViewExtension]:
    def view_replacement(self: OpenApiViewExtension) -> type:
        return build(self.target_class)

    name = "Schema" + target.rsplit(".", 1)[-1]
    return type(
        name,
        (OpenApiViewExtension,),
        {"target_class": target, "view_replacement": view_replacement},
    )


SCHEMA_EXTENSIONS = [
    _extension(f"alerts.api.{name}", _alerts_schema)
    for name in (
        "AlertListView",
        "AlertDetailView",
        "AlertAckView",
        "AlertCommentView",
        "SilenceListView",
        "SilenceEndView",
        "RuleListView",
        "RuleDetailView",
        "LatencyView",
    )
] + [_extension("trading.api.CandleIngestView", _candles_schema)]


# --- deliveries ---------------------------------------------------------------------------


def _delivery_serializer() -> type[serializers.ModelSerializer]:
    from alerts.models import Delivery

    class DeliveryRowSerializer(serializers.ModelSerializer):
        class Meta:
            model = Delivery
            fields = [
                "id",
                "alert",
                "channel",
                "recipient",
                "status",
                "attempts",
                "error",
                "created_at",
                "sent_at",
            ]
            read_only_fields = fields

    return DeliveryRowSerializer


DeliveryRowSerializer = _delivery_serializer()


def _delivery_choices() -> tuple[list[str], list[str]]:
    from alerts.models import Delivery

    return (
        [str(c) for c, _ in Delivery._meta.get_field("channel").choices or []],
        [str(c) for c, _ in Delivery._meta.get_field("status").choices or []],
    )


CHANNELS, DELIVERY_STATUSES = _delivery_choices()


@extend_schema_view(
    get=extend_schema(
        summary="Alert deliveries, newest first, filtered",
        parameters=[
            OpenApiParameter("alert", int),
            OpenApiParameter("channel", str, enum=CHANNELS),
            OpenApiParameter("status", str, enum=DELIVERY_STATUSES),
        ],
        responses={200: DeliveryRowSerializer(many=True), **error_responses(400, 403)},
    )
)
class DeliveryListView(ListAPIView):
    """Every delivery of every alert (recipient addresses are the subscribers' own)."""

    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = DeliveryRowSerializer

    def get_queryset(self) -> QuerySet[Any]:
        from alerts.models import Delivery

        params = self.request.query_params
        qs = Delivery.objects.order_by("-created_at", "-id")
        if (alert := filter_int(params, "alert")) is not None:
            qs = qs.filter(alert_id=alert)
        if (channel := filter_choice(params, "channel", CHANNELS)) is not None:
            qs = qs.filter(channel=channel)
        if (state := filter_choice(params, "status", DELIVERY_STATUSES)) is not None:
            qs = qs.filter(status=state)
        return qs
