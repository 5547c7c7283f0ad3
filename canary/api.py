"""REST API of the rollout lifecycle, pre-flight, rollbacks and backups (token or session
auth). Views call services (``canary.services``, ``canary.actions``) only.

Reads need ``audit.view_desk``; each action needs its own permission (``canary.actions
.OPERATIONS``), checked by the service. A refused action answers 403 (permission), 400
(bad input) or 409 (state, gate, evidence), with ``{"error", "field", "reasons"}``, and is
recorded in the audit trail; so is a read refused for want of ``view_desk``.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView, RetrieveAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.permissions import CanViewDesk
from config.api import error_responses, filter_choice, filter_int, filter_text
from trading.models import Deployment

from . import actions, services
from .models import (
    Approval,
    ApprovalRole,
    Backup,
    GateEvaluation,
    Phase,
    PreflightRun,
    Rollback,
    RollbackState,
    RollbackStep,
    Rollout,
    RolloutState,
)

VIEW = "audit.view_desk"
ERROR_STATUS = actions.ERROR_STATUS
ACTION_OPS = ("start", "promote", "pause", "resume", "rollback")

# --- serializers --------------------------------------------------------------------------


class RolloutSerializer(serializers.ModelSerializer):
    class Meta:
        model = Rollout
        fields = [
            "id",
            "name",
            "deployment",
            "state",
            "state_reason",
            "current_phase",
            "config_version",
            "rehearsal",
            "plan",
            "thresholds",
            "strategy_params",
            "created_at",
            "started_at",
            "ended_at",
        ]
        read_only_fields = fields


class PhaseSerializer(serializers.ModelSerializer):
    class Meta:
        model = Phase
        fields = [
            "index",
            "allocation",
            "started_at",
            "ends_at",
            "ended_at",
            "extensions",
            "outcome",
        ]
        read_only_fields = fields


class GateSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    problems = serializers.ListField(child=serializers.CharField())
    preflight = serializers.IntegerField(allow_null=True)
    alpha_approval = serializers.IntegerField(allow_null=True)
    planner_approval = serializers.IntegerField(allow_null=True)


class RolloutDetailSerializer(RolloutSerializer):
    phases = PhaseSerializer(many=True, read_only=True)
    gate = serializers.SerializerMethodField()

    class Meta(RolloutSerializer.Meta):
        fields = [*RolloutSerializer.Meta.fields, "phases", "gate"]
        read_only_fields = fields

    @extend_schema_field(GateSerializer)
    def get_gate(self, rollout: Rollout) -> dict[str, Any]:
        return services.gate1_check(rollout=rollout).to_dict()


class RolloutActionResultSerializer(RolloutSerializer):
    rollback = serializers.IntegerField(
        required=False, help_text="the rollback started or joined (rollback only)"
    )

    class Meta(RolloutSerializer.Meta):
        fields = [*RolloutSerializer.Meta.fields, "rollback"]
        read_only_fields = fields


class ApprovalSerializer(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username", read_only=True)
    valid = serializers.SerializerMethodField()

    class Meta:
        model = Approval
        fields = [
            "id",
            "role",
            "user",
            "evidence",
            "comment",
            "config_version",
            "valid",
            "created_at",
        ]
        read_only_fields = fields

    def get_valid(self, approval: Approval) -> bool:
        return approval.config_version == approval.rollout.config_version


class EvidenceSerializer(serializers.Serializer):
    smc_alignment_pct = serializers.FloatField(help_text="SMC alignment, >= 80 to pass")
    reward_risk = serializers.FloatField(help_text="reward:risk, > 3 to pass")
    liquidation_sweep_errors = serializers.IntegerField(help_text="must be 0")


class ApprovalInput(serializers.Serializer):
    role = serializers.CharField(
        max_length=20, help_text=f"one of: {', '.join(ApprovalRole.values)}"
    )
    evidence = serializers.JSONField(
        required=False,
        default=dict,
        help_text="Alpha: the signal validation "
        '{"smc_alignment_pct", "reward_risk", "liquidation_sweep_errors"}',
    )
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=2000)


class ReasonInput(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=300)


class EvaluationSerializer(serializers.ModelSerializer):
    phase = serializers.IntegerField(source="phase.index", read_only=True, allow_null=True)

    class Meta:
        model = GateEvaluation
        fields = ["id", "evaluated_at", "phase", "verdict", "action", "reasons", "metrics"]
        read_only_fields = fields


class PreflightRunSerializer(serializers.ModelSerializer):
    class Meta:
        model = PreflightRun
        fields = ["id", "started_at", "ended_at", "decision", "actor", "report_path", "checks"]
        read_only_fields = fields


class PreflightInput(serializers.Serializer):
    deployment = serializers.PrimaryKeyRelatedField(
        queryset=Deployment.objects.all(),
        required=False,
        allow_null=True,
        help_text="the deployment to check; default: the only one",
    )
    checks = serializers.ListField(
        child=serializers.CharField(max_length=40),
        required=False,
        allow_empty=False,
        max_length=20,
        help_text="run only these checks (default: all)",
    )

    def validate_checks(self, value: list[str]) -> list[str]:
        from .preflight import REGISTRY

        unknown = sorted(set(value) - set(REGISTRY))
        if unknown:
            raise serializers.ValidationError(
                f"unknown check(s): {', '.join(unknown)}; known: {', '.join(REGISTRY)}"
            )
        return list(dict.fromkeys(value))


class RollbackStepSerializer(serializers.ModelSerializer):
    class Meta:
        model = RollbackStep
        fields = ["stage", "name", "started_at", "ended_at", "outcome", "detail"]
        read_only_fields = fields


class RollbackSerializer(serializers.ModelSerializer):
    class Meta:
        model = Rollback
        fields = [
            "id",
            "deployment",
            "rollout",
            "trigger",
            "cause",
            "reasons",
            "requested_by",
            "state",
            "started_at",
            "stage1_ended_at",
            "ended_at",
        ]
        read_only_fields = fields


class RollbackDetailSerializer(RollbackSerializer):
    steps = RollbackStepSerializer(many=True, read_only=True)

    class Meta(RollbackSerializer.Meta):
        fields = [*RollbackSerializer.Meta.fields, "report", "steps"]
        read_only_fields = fields


class RestoreInput(serializers.Serializer):
    backup = serializers.PrimaryKeyRelatedField(queryset=Backup.objects.all())
    reason = serializers.CharField(max_length=300)


class BackupSerializer(serializers.ModelSerializer):
    file = serializers.SerializerMethodField()

    class Meta:
        model = Backup
        fields = [
            "id",
            "created_at",
            "engine",
            "file",
            "size_bytes",
            "sha256",
            "verified_at",
            "verified_ok",
            "note",
        ]
        read_only_fields = fields

    def get_file(self, backup: Backup) -> str:
        return backup.path.rsplit("/", 1)[-1]


# --- helpers ------------------------------------------------------------------------------


def refused(exc: services.RolloutError | actions.ActionRefused) -> Response:
    if isinstance(exc, services.RolloutError):
        exc = actions.ActionRefused.of(exc)
    return Response(exc.as_dict(), status=exc.status)


def _input(serializer_class: type[serializers.Serializer], request: Request) -> dict | Response:
    serializer = serializer_class(data=request.data)
    if not serializer.is_valid():
        return Response({"error": "invalid input", "fields": serializer.errors}, status=400)
    return dict(serializer.validated_data)


class DeskView(APIView):
    permission_classes = [IsAuthenticated, CanViewDesk]


# --- rollouts -----------------------------------------------------------------------------

ROLLOUT_FILTERS = [
    OpenApiParameter("state", str, enum=RolloutState.values, description="only this state"),
    OpenApiParameter("deployment", int, description="only this deployment's rollouts"),
    OpenApiParameter("rehearsal", bool, description="rehearsals only (true) or none (false)"),
]


@extend_schema_view(
    get=extend_schema(
        summary="Rollouts, newest first",
        parameters=ROLLOUT_FILTERS,
        responses={200: RolloutSerializer(many=True), **error_responses(400, 403)},
    )
)
class RolloutListView(ListAPIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = RolloutSerializer

    def get_queryset(self) -> QuerySet[Rollout]:
        params = self.request.query_params
        qs = Rollout.objects.order_by("-created_at", "-id")
        if (state := filter_choice(params, "state", RolloutState.values)) is not None:
            qs = qs.filter(state=state)
        if (deployment := filter_int(params, "deployment")) is not None:
            qs = qs.filter(deployment_id=deployment)
        if (rehearsal := filter_choice(params, "rehearsal", ["true", "false"])) is not None:
            qs = qs.filter(rehearsal=rehearsal == "true")
        return qs


@extend_schema_view(
    get=extend_schema(
        summary="One rollout with its phases and gate #1",
        responses={200: RolloutDetailSerializer, **error_responses(403, 404)},
    )
)
class RolloutDetailView(RetrieveAPIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = RolloutDetailSerializer
    queryset = Rollout.objects.prefetch_related("phases")


class RolloutStatusView(DeskView):
    @extend_schema(
        summary="Live status: phase clock, each metric against its bounds, verdicts, alerts",
        responses={200: OpenApiTypes.OBJECT, **error_responses(403, 404)},
    )
    def get(self, request: Request, pk: int) -> Response:
        rollout = get_object_or_404(Rollout.objects.select_related("deployment"), pk=pk)
        return Response(services.rollout_status(rollout=rollout))


class RolloutExportView(DeskView):
    throttle_scope = "export"

    @extend_schema(
        summary="Metrics export: the rollout, approvals, each phase's metrics and "
        "evaluations, the people's actions and the rollbacks, as one JSON document",
        responses={200: OpenApiTypes.OBJECT, **error_responses(403, 404)},
    )
    def get(self, request: Request, pk: int) -> Response:
        rollout = get_object_or_404(Rollout, pk=pk)
        response = Response(services.rollout_export(rollout=rollout))
        response["Content-Disposition"] = f'attachment; filename="rollout-{rollout.pk}.json"'
        return response


@extend_schema_view(
    get=extend_schema(
        summary="Gate evaluations of a rollout, newest first",
        parameters=[
            OpenApiParameter("verdict", str, enum=["PASS", "WARNING", "FAIL", "INCONCLUSIVE"]),
            OpenApiParameter("action", str, description="only this decision"),
        ],
        responses={200: EvaluationSerializer(many=True), **error_responses(400, 403, 404)},
    )
)
class EvaluationListView(ListAPIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = EvaluationSerializer

    def get_queryset(self) -> QuerySet[GateEvaluation]:
        rollout = get_object_or_404(Rollout, pk=self.kwargs["pk"])
        params = self.request.query_params
        qs = rollout.evaluations.select_related("phase").order_by("-evaluated_at", "-id")
        verdict = filter_choice(params, "verdict", ["PASS", "WARNING", "FAIL", "INCONCLUSIVE"])
        if verdict is not None:
            qs = qs.filter(verdict=verdict)
        if action := filter_text(params, "action", max_length=20):
            qs = qs.filter(action=action)
        return qs


class ApprovalView(APIView):
    permission_classes = [IsAuthenticated]
    throttle_scope = "actions"

    def get_permissions(self) -> list[Any]:
        if self.request.method == "POST":
            return [IsAuthenticated()]
        return [IsAuthenticated(), CanViewDesk()]

    @extend_schema(
        summary="Approvals of a rollout (valid: given for its current configuration)",
        responses={200: ApprovalSerializer(many=True), **error_responses(403, 404)},
    )
    def get(self, request: Request, pk: int) -> Response:
        rollout = get_object_or_404(Rollout, pk=pk)
        approvals = rollout.approvals.select_related("user", "rollout").order_by("created_at")
        return Response(ApprovalSerializer(approvals, many=True).data)

    @extend_schema(
        summary="Approve the go-live (gate #1) as Alpha trader or Planner",
        description="Alpha needs audit.approve_alpha and the signal validation as evidence "
        "(SMC alignment >= 80 %, reward:risk > 3, no liquidation-sweep errors); Planner "
        "needs audit.approve_planner. Never the same person twice. Refusals are recorded.",
        request=ApprovalInput,
        responses={201: ApprovalSerializer, **error_responses(400, 403, 404, 409)},
    )
    def post(self, request: Request, pk: int) -> Response:
        rollout = get_object_or_404(Rollout, pk=pk)
        data = _input(ApprovalInput, request)
        if isinstance(data, Response):
            return data
        try:
            approval = services.approval_record(
                rollout=rollout,
                role=data["role"],
                evidence=data["evidence"],
                comment=data["comment"],
                actor=request.user,
                request=request,
            )
        except services.RolloutError as exc:
            return refused(exc)
        return Response(ApprovalSerializer(approval).data, status=status.HTTP_201_CREATED)


ACTIONS = {op: actions.OPERATIONS[op] for op in ACTION_OPS}


class RolloutActionView(APIView):
    """POST /rollouts/<id>/<start|promote|pause|resume|rollback> {"reason": "..."}"""

    permission_classes = [IsAuthenticated]
    throttle_scope = "actions"
    op = ""

    @extend_schema(
        request=ReasonInput,
        responses={200: RolloutActionResultSerializer, **error_responses(400, 403, 404, 409)},
    )
    def post(self, request: Request, pk: int) -> Response:
        rollout = get_object_or_404(Rollout.objects.select_related("deployment"), pk=pk)
        data = _input(ReasonInput, request)
        if isinstance(data, Response):
            return data
        try:
            result = actions.rollout_act(
                op=self.op,
                rollout=rollout,
                actor=request.user,
                reason=data["reason"],
                request=request,
            )
        except actions.ActionRefused as exc:
            return refused(exc)
        rollout.refresh_from_db()
        body = RolloutSerializer(rollout).data
        if isinstance(result, Rollback):
            body["rollback"] = result.pk
        return Response(body)


def action_view(op: str) -> Any:
    operation = actions.OPERATIONS[op]
    view_class = type(f"Rollout{op.title()}View", (RolloutActionView,), {"op": op})
    return extend_schema_view(
        post=extend_schema(
            summary=f"{operation.label} (needs {operation.permission})",
            operation_id=f"rollouts_{op}",
        )
    )(view_class).as_view()


# --- pre-flight ---------------------------------------------------------------------------


class PreflightListView(ListAPIView):
    permission_classes = [IsAuthenticated]
    serializer_class = PreflightRunSerializer

    def get_permissions(self) -> list[Any]:
        if self.request.method == "POST":
            return [IsAuthenticated()]
        return [IsAuthenticated(), CanViewDesk()]

    def get_queryset(self) -> QuerySet[PreflightRun]:
        qs = PreflightRun.objects.order_by("-started_at", "-id")
        decision = filter_choice(self.request.query_params, "decision", ["GO", "NO-GO"])
        return qs.filter(decision=decision) if decision is not None else qs

    @extend_schema(
        summary="Pre-flight runs, newest first",
        parameters=[OpenApiParameter("decision", str, enum=["GO", "NO-GO"])],
        responses={200: PreflightRunSerializer(many=True), **error_responses(400, 403)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary=f"Run the pre-flight checks now (needs {actions.OPERATIONS['preflight'].permission})",
        request=PreflightInput,
        responses={201: PreflightRunSerializer, **error_responses(400, 403)},
    )
    def post(self, request: Request) -> Response:
        serializer = PreflightInput(data=request.data)
        if not serializer.is_valid():
            return Response({"error": "invalid input", "fields": serializer.errors}, status=400)
        data = serializer.validated_data
        try:
            run = actions.preflight_act(
                actor=request.user,
                deployment=data.get("deployment"),
                names=data.get("checks"),
                request=request,
            )
        except actions.ActionRefused as exc:
            return refused(exc)
        return Response(PreflightRunSerializer(run).data, status=status.HTTP_201_CREATED)


@extend_schema_view(
    get=extend_schema(
        summary="One pre-flight run with each check's result",
        responses={200: PreflightRunSerializer, **error_responses(403, 404)},
    )
)
class PreflightDetailView(RetrieveAPIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = PreflightRunSerializer
    queryset = PreflightRun.objects.all()


# --- rollbacks and backups ----------------------------------------------------------------


@extend_schema_view(
    get=extend_schema(
        summary="Rollbacks, newest first",
        parameters=[
            OpenApiParameter("state", str, enum=RollbackState.values),
            OpenApiParameter("trigger", str, enum=["gate", "watchdog", "person"]),
            OpenApiParameter("deployment", int),
            OpenApiParameter("rollout", int),
        ],
        responses={200: RollbackSerializer(many=True), **error_responses(400, 403)},
    )
)
class RollbackListView(ListAPIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = RollbackSerializer

    def get_queryset(self) -> QuerySet[Rollback]:
        params = self.request.query_params
        qs = Rollback.objects.order_by("-started_at", "-id")
        if (state := filter_choice(params, "state", RollbackState.values)) is not None:
            qs = qs.filter(state=state)
        trigger = filter_choice(params, "trigger", ["gate", "watchdog", "person"])
        if trigger is not None:
            qs = qs.filter(trigger=trigger)
        for name in ("deployment", "rollout"):
            if (value := filter_int(params, name)) is not None:
                qs = qs.filter(**{f"{name}_id": value})
        return qs


@extend_schema_view(
    get=extend_schema(
        summary="One rollback with its report and steps",
        responses={200: RollbackDetailSerializer, **error_responses(403, 404)},
    )
)
class RollbackDetailView(RetrieveAPIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = RollbackDetailSerializer
    queryset = Rollback.objects.prefetch_related("steps")


class RollbackRestoreView(APIView):
    permission_classes = [IsAuthenticated]
    throttle_scope = "actions"

    @extend_schema(
        summary="Stage 3: restore a backup over the database and verify it "
        "(needs audit.restore_database)",
        request=RestoreInput,
        responses={200: RollbackDetailSerializer, **error_responses(400, 403, 404, 409, 503)},
    )
    def post(self, request: Request, pk: int) -> Response:
        rollback = get_object_or_404(Rollback, pk=pk)
        try:
            actions.check(op="restore", actor=request.user, target=rollback, request=request)
        except actions.ActionRefused as exc:
            return refused(exc)
        data = _input(RestoreInput, request)
        if isinstance(data, Response):
            return data
        try:
            restored = actions.rollback_restore_act(
                rollback=rollback,
                backup=data["backup"],
                actor=request.user,
                reason=data["reason"],
                request=request,
            )
        except actions.ActionRefused as exc:
            return refused(exc)
        return Response(RollbackDetailSerializer(restored).data)


@extend_schema_view(
    get=extend_schema(
        summary="Database backups, newest first",
        parameters=[OpenApiParameter("verified_ok", bool)],
        responses={200: BackupSerializer(many=True), **error_responses(400, 403)},
    )
)
class BackupListView(ListAPIView):
    permission_classes = [IsAuthenticated, CanViewDesk]
    serializer_class = BackupSerializer

    def get_queryset(self) -> QuerySet[Backup]:
        qs = Backup.objects.order_by("-created_at", "-id")
        verified = filter_choice(self.request.query_params, "verified_ok", ["true", "false"])
        return qs.filter(verified_ok=verified == "true") if verified is not None else qs
