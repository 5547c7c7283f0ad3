"""REST API of the audit trail: filter, export (JSON lines or CSV, streamed), verify.
Reading it needs ``audit.view_desk``; nothing here writes but a refusal's record."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import CommandError
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.generics import ListAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.api import error_responses, filter_int, filter_text

from .management.commands.audit_export import (
    FIELDS,
    iter_rows,
    parse_instant,
    select_events,
    write_csv,
    write_jsonl,
)
from .models import AuditEvent
from .permissions import CanViewDesk
from .services import audit_verify

EXPORT_FORMATS = {"jsonl": "application/x-ndjson", "csv": "text/csv"}


class AuditEventSerializer(serializers.ModelSerializer):
    actor_user = serializers.IntegerField(source="actor_user_id", allow_null=True, read_only=True)

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "seq",
            "created_at",
            "actor",
            "actor_user",
            "action",
            "target_type",
            "target_id",
            "payload",
            "ip",
            "user_agent",
            "prev_hash",
            "hash",
        ]
        read_only_fields = fields


class ChainStateSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    events = serializers.IntegerField()
    head_seq = serializers.IntegerField()
    head_hash = serializers.CharField()
    first_break = serializers.DictField(allow_null=True, help_text="seq, event_id, reason")


WINDOW_PARAMS = [
    OpenApiParameter("since", OpenApiTypes.DATETIME, description="created_at >= (ISO 8601)"),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="created_at < (ISO 8601)"),
    OpenApiParameter("action", str, description="exactly this action, e.g. rollout.promote"),
]
FILTER_PARAMS = [
    *WINDOW_PARAMS,
    OpenApiParameter("action_prefix", str, description="actions starting with, e.g. rollout."),
    OpenApiParameter("actor", str, description="exactly this actor (username or component)"),
    OpenApiParameter("target_type", str, description="e.g. canary.Rollout"),
    OpenApiParameter("target_id", str),
    OpenApiParameter("after_seq", int, description="only events with seq > this"),
]


def _instant(params: Mapping[str, Any], name: str) -> datetime | None:
    value = params.get(name)
    if not value:
        return None
    try:
        return parse_instant(name, str(value)[:64]).astimezone(UTC)
    except (CommandError, OverflowError, ValueError) as exc:
        raise exceptions.ValidationError({name: [str(exc)]}) from None


def _window(params: Mapping[str, Any]) -> QuerySet[AuditEvent]:
    since, until = _instant(params, "since"), _instant(params, "until")
    if since and until and since >= until:
        raise exceptions.ValidationError({"until": ["must be later than since"]})
    return select_events(since=since, until=until, action=filter_text(params, "action"))


def filtered_events(params: Mapping[str, Any]) -> QuerySet[AuditEvent]:
    qs = _window(params)
    for name in ("actor", "target_type", "target_id"):
        if value := filter_text(params, name):
            qs = qs.filter(**{name: value})
    if prefix := filter_text(params, "action_prefix"):
        qs = qs.filter(action__startswith=prefix)
    if (after := filter_int(params, "after_seq")) is not None:
        qs = qs.filter(seq__gt=after)
    return qs


class AuditEventListView(ListAPIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = AuditEventSerializer

    def get_queryset(self) -> QuerySet[AuditEvent]:
        return filtered_events(self.request.query_params)

    @extend_schema(
        summary="Audit events in seq order, filtered",
        parameters=FILTER_PARAMS,
        responses={200: AuditEventSerializer(many=True), **error_responses(400, 403)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class _Buffer:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def take(self) -> str:
        text, self.parts = "".join(self.parts), []
        return text


def _stream(rows: Iterator[dict[str, Any]], fmt: str) -> Iterator[str]:
    """The audit_export command's writers, a chunk of rows at a time."""
    buffer = _Buffer()
    if fmt == "csv":
        write_csv(iter(()), buffer)
        yield buffer.take()
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= 500:
            yield _render(chunk, fmt, buffer)
            chunk = []
    if chunk:
        yield _render(chunk, fmt, buffer)


def _render(rows: list[dict[str, Any]], fmt: str, buffer: _Buffer) -> str:
    if fmt == "jsonl":
        write_jsonl(iter(rows), buffer)
        return buffer.take()
    write_csv(iter(rows), buffer)
    header, _, body = buffer.take().partition("\n")
    return body


class AuditExportView(APIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    throttle_scope = "export"

    @extend_schema(
        summary="Export audit events in seq order (streamed JSON lines or CSV)",
        description="Each line carries every field (" + ", ".join(FIELDS) + "), enough to "
        "re-hash the chain independently.",
        parameters=[
            *FILTER_PARAMS,
            OpenApiParameter("output", str, enum=list(EXPORT_FORMATS), default="jsonl"),
        ],
        responses={
            (200, "application/x-ndjson"): OpenApiResponse(OpenApiTypes.STR),
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR),
            **error_responses(400, 403),
        },
    )
    def get(self, request: Request) -> StreamingHttpResponse | Response:
        fmt = request.query_params.get("output") or "jsonl"
        if fmt not in EXPORT_FORMATS:
            raise exceptions.ValidationError({"output": ["must be one of: jsonl, csv"]})
        rows = iter_rows(filtered_events(request.query_params))
        response = StreamingHttpResponse(_stream(rows, fmt), content_type=EXPORT_FORMATS[fmt])
        response["Content-Disposition"] = f'attachment; filename="audit.{fmt}"'
        return response


class AuditVerifyView(APIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    throttle_scope = "export"

    @extend_schema(
        summary="Verify the hash chain: the first break, if any",
        responses={200: ChainStateSerializer, **error_responses(403)},
    )
    def get(self, request: Request) -> Response:
        from .models import AuditChainHead

        found = audit_verify()
        head = AuditChainHead.objects.filter(id=1).first()
        return Response(
            {
                "ok": found is None,
                "events": AuditEvent.objects.count(),
                "head_seq": head.seq if head else 0,
                "head_hash": head.hash if head else "0" * 64,
                "first_break": None
                if found is None
                else {"seq": found.seq, "event_id": found.event_id, "reason": found.reason},
            }
        )
