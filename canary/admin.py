"""Rollouts, phases, gate evaluations, approvals, pre-flight runs, rollbacks and backups in
the admin.

Plan and thresholds are validated (``services.parse_plan``, ``Thresholds.from_dict``) and
saved through the services (a change bumps the configuration version, voiding earlier
approvals); they are frozen once the rollout has started. Approvals are added through
``services.approval_record`` (a refusal shows on the form and is recorded).

Lifecycle actions (approve as Alpha with the signal-validation evidence, approve as Planner,
start, promote, pause, resume, roll back; restore on a rollback; run pre-flight) each ask
for a reason on a confirmation page and call ``canary.actions`` (the same calls as the
API). An action is offered to the people holding its permission; one posted by anyone else
is refused (403) and the refusal recorded, as is every refusal by a service.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from audit.permissions import holds, permission_require
from trading.models import Deployment

from . import actions as canary_actions
from . import services
from .models import (
    Approval,
    Backup,
    GateEvaluation,
    Phase,
    PreflightRun,
    Rollback,
    RollbackStep,
    Rollout,
    RolloutState,
)

VIEW = "audit.view_desk"
CONFIG_FIELDS = ("plan", "thresholds", "strategy_params")
CONFIRM_TEMPLATE = "admin/canary/confirm_action.html"


def _pretty(value: Any) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True))


class _DeskReadable(admin.ModelAdmin):
    def has_module_permission(self, request: HttpRequest) -> bool:
        return super().has_module_permission(request) or request.user.has_perm(VIEW)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_view_permission(request, obj) or request.user.has_perm(VIEW)


class _ReadOnly(_DeskReadable):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class _OperatorActions(admin.ModelAdmin):
    """Admin actions named after ``canary.actions.OPERATIONS``: each is offered to holders
    of its permission (``has_<op>_permission``); a forged post of one by anyone else is
    refused with 403 and recorded."""

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if request.method == "POST":
            offered = self.get_actions(request)
            for name in request.POST.getlist("action"):
                if name in canary_actions.OPERATIONS and name not in offered:
                    op = canary_actions.OPERATIONS[name]
                    permission_require(
                        actor=request.user, perm=op.permission, op=name, request=request
                    )
        return super().changelist_view(request, extra_context)


def _holds_op(op: str) -> Callable[[Any, HttpRequest], bool]:
    def has_permission(self: Any, request: HttpRequest) -> bool:
        return holds(request.user, canary_actions.OPERATIONS[op].permission)

    has_permission.__name__ = f"has_{op}_permission"
    return has_permission


for _op in canary_actions.OPERATIONS:
    setattr(_OperatorActions, f"has_{_op}_permission", _holds_op(_op))


class ReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=300,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Recorded in the audit trail with the action.",
    )

    def evidence(self) -> dict[str, Any] | None:
        return None


class AlphaApprovalForm(ReasonForm):
    """The Alpha trader's signal validation; its bounds are the service's to judge."""

    smc_alignment_pct = forms.FloatField(label="SMC alignment (%)", help_text="needs >= 80")
    reward_risk = forms.FloatField(label="Reward:risk", help_text="needs > 3")
    liquidation_sweep_errors = forms.IntegerField(
        label="Liquidation-sweep errors", min_value=0, help_text="needs 0"
    )

    def evidence(self) -> dict[str, Any] | None:
        keys = ("smc_alignment_pct", "reward_risk", "liquidation_sweep_errors")
        return {key: self.cleaned_data[key] for key in keys}


class RestoreForm(ReasonForm):
    backup = forms.ModelChoiceField(
        queryset=Backup.objects.order_by("-created_at"),
        help_text="Verified in a scratch database before anything is overwritten.",
    )


class PreflightForm(forms.Form):
    deployment = forms.ModelChoiceField(
        queryset=Deployment.objects.order_by("name"),
        required=False,
        help_text="Default: the only deployment.",
    )
    checks = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Default: every check.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from .preflight import REGISTRY

        super().__init__(*args, **kwargs)
        self.fields["checks"].choices = [(name, name) for name in REGISTRY]  # type: ignore[attr-defined]


def _confirm_page(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    *,
    op: str,
    form: forms.Form,
    objects: list[Any],
) -> TemplateResponse:
    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": f"{canary_actions.OPERATIONS[op].label}: confirm",
        "operation": canary_actions.OPERATIONS[op],
        "action": op,
        "form": form,
        "objects": objects,
        "opts": opts,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "cancel_url": reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"),
    }
    return TemplateResponse(request, CONFIRM_TEMPLATE, context)


def _rollout_action(op: str) -> Callable[..., HttpResponse | None]:
    form_class = AlphaApprovalForm if op == "approve_alpha" else ReasonForm
    operation = canary_actions.OPERATIONS[op]

    def action(
        modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Rollout]
    ) -> HttpResponse | None:
        rollouts = list(queryset.select_related("deployment"))
        form = form_class(request.POST if "confirm" in request.POST else None)
        if not form.is_valid():
            return _confirm_page(modeladmin, request, op=op, form=form, objects=rollouts)
        for rollout in rollouts:
            try:
                canary_actions.rollout_act(
                    op=op,
                    rollout=rollout,
                    actor=request.user,
                    reason=form.cleaned_data["reason"],
                    evidence=form.evidence(),
                    request=request,
                )
            except canary_actions.ActionRefused as exc:
                modeladmin.message_user(request, f"{rollout.name}: {exc.message}", messages.ERROR)
            else:
                rollout.refresh_from_db()
                modeladmin.message_user(
                    request, f"{rollout.name}: {operation.label.lower()} done ({rollout.state})"
                )
        return None

    action.__name__ = op
    return admin.action(description=operation.label, permissions=[op])(action)


class RolloutForm(forms.ModelForm):
    class Meta:
        model = Rollout
        fields = ["name", "deployment", *CONFIG_FIELDS]

    def clean_plan(self) -> Any:
        try:
            return [s.to_dict() for s in services.parse_plan(self.cleaned_data.get("plan"))]
        except services.RolloutError as exc:
            raise ValidationError(f"{exc.field}: {exc.message}") from exc

    def clean_thresholds(self) -> Any:
        try:
            return services.parse_thresholds(self.cleaned_data.get("thresholds")).to_dict()
        except services.RolloutError as exc:
            raise ValidationError(f"{exc.field}: {exc.message}") from exc

    def clean_strategy_params(self) -> Any:
        value = self.cleaned_data.get("strategy_params")
        if not isinstance(value, dict):
            raise ValidationError("must be a JSON object")
        return value


class PhaseInline(admin.TabularInline):
    model = Phase
    extra = 0
    can_delete = False
    fields = (
        "index",
        "allocation",
        "started_at",
        "ends_at",
        "ended_at",
        "extensions",
        "consecutive_warnings",
        "outcome",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ApprovalInline(admin.TabularInline):
    model = Approval
    extra = 0
    can_delete = False
    fields = ("role", "user", "config_version", "evidence", "created_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Rollout)
class RolloutAdmin(_OperatorActions, _DeskReadable):
    form = RolloutForm
    list_display = (
        "name",
        "deployment",
        "state",
        "current_phase",
        "config_version",
        "rehearsal",
        "created_at",
    )
    list_filter = ("state", "rehearsal")
    search_fields = ("name", "deployment__name")
    date_hierarchy = "created_at"
    inlines = (PhaseInline, ApprovalInline)
    actions = tuple(_rollout_action(op) for op in canary_actions.ROLLOUT_OPS)
    STATUS_FIELDS = (
        "state",
        "state_reason",
        "current_phase",
        "config_version",
        "rehearsal",
        "created_by",
        "created_at",
        "started_by",
        "started_at",
        "ended_at",
    )

    def get_fields(self, request: HttpRequest, obj: Rollout | None = None) -> list[str]:
        if obj is None:
            return ["name", "deployment", *CONFIG_FIELDS]
        return ["name", "deployment", *CONFIG_FIELDS, *self.STATUS_FIELDS]

    def get_readonly_fields(
        self, request: HttpRequest, obj: Rollout | None = None
    ) -> tuple[str, ...]:
        if obj is None:
            return ()
        return ("deployment", *self.STATUS_FIELDS)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Only a PENDING rollout's name and configuration can change."""
        allowed = super().has_change_permission(request, obj)
        return allowed and (obj is None or obj.state == RolloutState.PENDING)

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {
            "plan": services.default_plan(),
            "thresholds": services.parse_thresholds({}).to_dict(),
        }

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Rollout, form: Any, change: bool) -> None:
        data = form.cleaned_data
        if change:
            config = {key: data[key] for key in CONFIG_FIELDS if key in data}
            saved = services.rollout_configure(
                rollout=Rollout.objects.get(pk=obj.pk),
                actor=request.user,
                name=data.get("name"),
                request=request,
                **config,
            )
        else:
            saved = services.rollout_create(
                deployment=data["deployment"],
                name=data["name"],
                plan=data["plan"],
                thresholds=data["thresholds"],
                strategy_params=data["strategy_params"] or None,
                actor=request.user,
                request=request,
            )
        obj.__dict__.update(
            {f.attname: getattr(saved, f.attname) for f in Rollout._meta.concrete_fields}
        )
        obj._state.adding = False


@admin.register(Phase)
class PhaseAdmin(_ReadOnly):
    list_display = (
        "rollout",
        "index",
        "allocation",
        "started_at",
        "ends_at",
        "ended_at",
        "extensions",
        "outcome",
    )
    list_filter = ("outcome",)


@admin.register(GateEvaluation)
class GateEvaluationAdmin(_ReadOnly):
    list_display = ("evaluated_at", "rollout", "phase", "verdict", "action")
    list_filter = ("verdict", "action", "rollout")
    list_select_related = ("rollout", "phase")
    date_hierarchy = "evaluated_at"
    fields = (
        "rollout",
        "phase",
        "evaluated_at",
        "verdict",
        "action",
        "pretty_reasons",
        "pretty_metrics",
    )
    readonly_fields = fields

    @admin.display(description="reasons")
    def pretty_reasons(self, evaluation: GateEvaluation) -> str:
        return _pretty(evaluation.reasons)

    @admin.display(description="metrics")
    def pretty_metrics(self, evaluation: GateEvaluation) -> str:
        return _pretty(evaluation.metrics)


class ApprovalForm(forms.ModelForm):
    """Adding an approval calls ``services.approval_record``; a refusal is a form error."""

    class Meta:
        model = Approval
        fields = ["rollout", "role", "evidence", "comment"]
        help_texts = {
            "evidence": (
                'Alpha trader: {"smc_alignment_pct": >= 80, "reward_risk": > 3, '
                '"liquidation_sweep_errors": 0}'
            )
        }

    request: HttpRequest | None = None
    approval: Approval | None = None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors or self.request is None:
            return data
        try:
            self.approval = services.approval_record(
                rollout=data["rollout"],
                role=data["role"],
                evidence=data.get("evidence") or {},
                comment=data.get("comment") or "",
                actor=self.request.user,
                request=self.request,
            )
        except services.RolloutError as exc:
            raise ValidationError(exc.message) from exc
        return data


@admin.register(Approval)
class ApprovalAdmin(_DeskReadable):
    form = ApprovalForm
    list_display = ("rollout", "role", "user", "config_version", "created_at")
    list_filter = ("role",)
    actions = None

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        form_class = super().get_form(request, obj, change=change, **kwargs)
        return type("BoundApprovalForm", (form_class,), {"request": request})

    def get_readonly_fields(
        self, request: HttpRequest, obj: Approval | None = None
    ) -> tuple[str, ...]:
        if obj is None:
            return ()
        return ("rollout", "role", "user", "evidence", "comment", "config_version", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return any(request.user.has_perm(p) for p in services.PERM_APPROVE.values())

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Approval, form: Any, change: bool) -> None:
        approval = form.approval
        assert approval is not None, "ApprovalForm.clean records the approval"
        obj.__dict__.update(
            {f.attname: getattr(approval, f.attname) for f in Approval._meta.concrete_fields}
        )
        obj._state.adding = False


# --- pre-flight, rollbacks, backups -------------------------------------------------------

STATUS_STYLE = {"PASS": "color:#1a7f37", "WARN": "color:#9a6700", "FAIL": "color:#cf222e"}


@admin.register(PreflightRun)
class PreflightRunAdmin(_ReadOnly):
    """Pre-flight runs; "Run pre-flight" (object tools) runs the checks now."""

    list_display = ("started_at", "decision", "actor", "failed_checks", "duration")
    list_filter = ("decision", "actor")
    date_hierarchy = "started_at"
    fields = ("started_at", "ended_at", "decision", "actor", "report_path", "check_table")
    readonly_fields = fields
    change_list_template = "admin/canary/preflightrun/change_list.html"

    @admin.display(description="failed")
    def failed_checks(self, run: PreflightRun) -> str:
        return ", ".join(c.get("name", "?") for c in run.checks if c.get("status") == "FAIL") or "-"

    @admin.display(description="duration")
    def duration(self, run: PreflightRun) -> str:
        return f"{(run.ended_at - run.started_at).total_seconds():.1f} s"

    @admin.display(description="checks")
    def check_table(self, run: PreflightRun) -> str:
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td style='{}'>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    c.get("name", ""),
                    STATUS_STYLE.get(c.get("status", ""), ""),
                    c.get("status", ""),
                    "critical" if c.get("critical") else "",
                    c.get("duration_ms", ""),
                    c.get("detail", ""),
                )
                for c in run.checks
            ),
        )
        head = "<tr><th>check</th><th>status</th><th></th><th>ms</th><th>detail</th></tr>"
        return format_html("<table>{}{}</table>", mark_safe(head), rows)  # noqa: S308 - constant

    def has_preflight_permission(self, request: HttpRequest) -> bool:
        return holds(request.user, canary_actions.OPERATIONS["preflight"].permission)

    def get_urls(self) -> list[Any]:
        run = self.admin_site.admin_view(self.run_view)
        return [path("run/", run, name="canary_preflightrun_run"), *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        extra = {"can_run_preflight": self.has_preflight_permission(request)}
        return super().changelist_view(request, {**(extra_context or {}), **extra})

    def run_view(self, request: HttpRequest) -> HttpResponse:
        """Confirmation page (GET) and the run (POST) through ``canary.actions``."""
        permission_require(
            actor=request.user,
            perm=canary_actions.OPERATIONS["preflight"].permission,
            op="preflight",
            request=request,
        )
        form = PreflightForm(request.POST if request.method == "POST" else None)
        if not form.is_valid():
            return _confirm_page(self, request, op="preflight", form=form, objects=[])
        run = canary_actions.preflight_act(
            actor=request.user,
            deployment=form.cleaned_data["deployment"],
            names=form.cleaned_data["checks"] or None,
            request=request,
        )
        if run.pk is None:
            self.message_user(request, f"pre-flight {run.decision}, not stored", messages.ERROR)
            return HttpResponseRedirect(reverse("admin:canary_preflightrun_changelist"))
        level = messages.SUCCESS if run.decision == "GO" else messages.WARNING
        self.message_user(request, f"pre-flight: {run.decision}", level)
        return HttpResponseRedirect(reverse("admin:canary_preflightrun_change", args=[run.pk]))


class RollbackStepInline(admin.TabularInline):
    model = RollbackStep
    extra = 0
    can_delete = False
    fields = ("stage", "name", "started_at", "ended_at", "outcome", "pretty_detail")
    readonly_fields = fields

    @admin.display(description="detail")
    def pretty_detail(self, step: RollbackStep) -> str:
        return _pretty(step.detail)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def restore(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Rollback]
) -> HttpResponse | None:
    rollbacks = list(queryset)
    if len(rollbacks) != 1:
        modeladmin.message_user(request, "restore one rollback at a time", messages.ERROR)
        return None
    rollback = rollbacks[0]
    form = RestoreForm(request.POST if "confirm" in request.POST else None)
    if not form.is_valid():
        return _confirm_page(modeladmin, request, op="restore", form=form, objects=rollbacks)
    try:
        restored = canary_actions.rollback_restore_act(
            rollback=rollback,
            backup=form.cleaned_data["backup"],
            actor=request.user,
            reason=form.cleaned_data["reason"],
            request=request,
        )
    except canary_actions.ActionRefused as exc:
        modeladmin.message_user(request, f"restore refused: {exc.message}", messages.ERROR)
        return None
    modeladmin.message_user(request, f"rollback {restored.pk}: {restored.state}")
    return None


@admin.register(Rollback)
class RollbackAdmin(_OperatorActions, _ReadOnly):
    list_display = ("started_at", "deployment", "rollout", "trigger", "state", "requested_by")
    list_filter = ("state", "trigger", "deployment")
    list_select_related = ("deployment", "rollout")
    search_fields = ("cause", "requested_by")
    date_hierarchy = "started_at"
    inlines = (RollbackStepInline,)
    actions = (
        admin.action(
            description=canary_actions.OPERATIONS["restore"].label, permissions=["restore"]
        )(restore),
    )
    fields = (
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
        "report_table",
    )
    readonly_fields = fields

    @admin.display(description="report")
    def report_table(self, rollback: Rollback) -> str:
        """Each section of the report on its own row; the steps are in the table below."""
        report = {k: v for k, v in (rollback.report or {}).items() if k != "steps"}
        if not report:
            return "-"
        rows = format_html_join(
            "",
            "<tr><th style='vertical-align:top'>{}</th><td>{}</td></tr>",
            ((key, _cell(value)) for key, value in sorted(report.items())),
        )
        return format_html("<table>{}</table>", rows)


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return _pretty(value)
    return format_html("{}", json.dumps(value))


@admin.register(Backup)
class BackupAdmin(_ReadOnly):
    list_display = ("created_at", "engine", "path", "size_bytes", "verified_at", "verified_ok")
    list_filter = ("engine", "verified_ok")
    date_hierarchy = "created_at"
    search_fields = ("path", "note", "sha256")
