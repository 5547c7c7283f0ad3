"""The desk: the dashboard page, its JSON state, the halt / roll back actions and the
stored daily reports.

Selectors read with a fixed number of queries whatever the table sizes (no N+1); views
check permissions server-side (a refusal answers 403 and is audited) and call services.
The alert feed itself is the WebSocket consumer of the alerts app (/ws/alerts/); this
module only adds the recent acknowledgements so other desks see them.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError
from django.db.models import Count, Q
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from alerts.models import Alert
from audit.models import AuditEvent
from audit.permissions import PermissionRefused, permission_require
from audit.services import audit_record
from trading.models import Deployment, EquitySnapshot, KillSwitch, Order, OrderStatus, Position

from . import killswitch, reports
from .engine import CRITERIA, Criterion, ThresholdError, Thresholds
from .health import health_report
from .models import Approval, GateEvaluation, Phase, PreflightRun, Rollout, RolloutState

VIEW = "audit.view_desk"
TRIGGER = "audit.trigger_rollback"
HANDLE = "audit.handle_alerts"
ERROR_STATUSES = (OrderStatus.ERROR, OrderStatus.REJECTED, OrderStatus.UNKNOWN)
ACTIVE_ROLLOUT_STATES = (
    RolloutState.RUNNING,
    RolloutState.PAUSED,
    RolloutState.ROLLING_BACK,
    RolloutState.PENDING,
    RolloutState.LIVE,
)
# High-volume machine events left out of the desk's "recent actions" list.
NOISY_AUDIT_ACTIONS = (
    "alert.create",
    "candles.ingest",
    "alerts.websocket_sent",
    "alerts.websocket_failed",
)
EQUITY_ROWS = 5000
EQUITY_POINTS = 600
EQUITY_WINDOW = timedelta(hours=24)
VERDICTS_SHOWN = 8
AUDIT_SHOWN = 10
ACKS_WINDOW = timedelta(hours=1)
HEALTH_TTL_S = 2.0


# --------------------------------------------------------------------------- formatting


@dataclass(frozen=True)
class MetricMeta:
    label: str
    unit: str
    scale: float = 1.0
    digits: int = 1


METRICS: dict[str, MetricMeta] = {
    "latency_p95_ms": MetricMeta("Order latency (p95)", "ms", 1, 0),
    "fill_rate": MetricMeta("Fill rate", "%", 100, 1),
    "slippage_bps": MetricMeta("Slippage", "bps", 1, 1),
    "confluence_avg": MetricMeta("Signal confluence", "of 4", 1, 2),
    "drawdown_pct": MetricMeta("Drawdown", "%", 1, 2),
    "error_rate": MetricMeta("Order error rate", "%", 100, 2),
    "critical_errors": MetricMeta("Critical errors", "", 1, 0),
    "stream_gap_s": MetricMeta("Market stream gap", "s", 1, 1),
    "db_ok": MetricMeta("Database check", ""),
}

KILL_SWITCH_WORDS = {
    "ACTIVE": "Trading allowed",
    "REDUCING": "Reducing only: no new entries",
    "HALTED": "Halted: no orders are placed",
    "UNREADABLE": "Unreadable: no orders are placed (fail closed)",
}

ROLLOUT_WORDS = {
    "PENDING": "Awaiting gate #1 approvals",
    "RUNNING": "Running",
    "PAUSED": "Paused",
    "ROLLING_BACK": "Rolling back",
    "ROLLED_BACK": "Rolled back",
    "LIVE": "Live at full size",
}


def fmt_metric(metric: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "ok" if value else "failed"
    meta = METRICS.get(metric, MetricMeta(metric, ""))
    try:
        text = f"{float(value) * meta.scale:,.{meta.digits}f}"
    except (TypeError, ValueError):
        return str(value)
    return f"{text} {meta.unit}".strip()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --------------------------------------------------------------------------- gate metrics


def _bound_text(symbol: str, metric: str, bound: Any) -> str:
    if symbol in ("is", "is not"):
        return f"{symbol} {fmt_metric(metric, bound)}"
    return f"{symbol} {fmt_metric(metric, bound)}"


def _judge(c: Criterion, value: Any, thresholds: Thresholds, phase: int) -> tuple[str, str]:
    """(status, words): pass / warn / fail / none, said in words as well as colour."""
    if value is None:
        return "none", "no data yet"
    try:
        failed = c.fail_reason(value, thresholds)
        missed = c.target_reason(value, thresholds, phase)
    except TypeError:
        return "none", f"unreadable value {value!r}"
    if failed is not None:
        if c.metric == "db_ok":
            return "fail", "database check failed"
        assert c.fail is not None
        bound = _bound_text(c.fail.symbol, c.metric, failed.bound)
        note = "" if failed.note == "fail bound" else f": {failed.note}"
        return "fail", f"past fail bound ({bound}){note}"
    if missed is not None:
        assert c.target is not None
        return (
            "warn",
            f"outside target (needs {_bound_text(c.target.symbol, c.metric, missed.bound)})",
        )
    if c.target is None:
        return "pass", "inside fail bound"
    return "pass", "within target"


def gate_rows(metrics: dict[str, Any], thresholds: Thresholds, phase: int) -> list[dict]:
    rows = []
    for c in CRITERIA:
        value = metrics.get(c.metric)
        status, words = _judge(c, value, thresholds, phase)
        target = thresholds.target(c.metric, phase) if c.target else None
        fail = thresholds.fail_bound(c.metric) if c.fail else None
        rows.append(
            {
                "metric": c.metric,
                "label": METRICS[c.metric].label,
                "value": value,
                "display": fmt_metric(c.metric, value),
                "target": _bound_text(c.target.symbol, c.metric, target) if c.target else "-",
                "fail": _bound_text(c.fail.symbol, c.metric, fail) if c.fail else "-",
                "status": status,
                "words": words,
            }
        )
    return rows


def _thresholds(rollout: Rollout) -> tuple[Thresholds, str]:
    try:
        return Thresholds.from_dict(rollout.thresholds or {}), ""
    except ThresholdError as err:
        return Thresholds(), f"stored thresholds invalid ({err}); showing defaults"


def gates_state(rollout: Rollout, latest: GateEvaluation | None) -> dict:
    thresholds, problem = _thresholds(rollout)
    phase = (latest.phase.index if latest and latest.phase else rollout.current_phase) or 1
    metrics = dict(latest.metrics) if latest and isinstance(latest.metrics, dict) else {}
    orders = metrics.get("orders")
    return {
        "phase": phase,
        "evaluated_at": _iso(latest.evaluated_at) if latest else None,
        "verdict": latest.verdict if latest else None,
        "orders": orders,
        "min_orders": thresholds.min_orders,
        "problem": problem,
        "rows": gate_rows(metrics, thresholds, phase),
    }


def _reason_text(reason: Any) -> str:
    if isinstance(reason, dict):
        return str(reason.get("message") or reason.get("metric") or reason)
    return str(reason)


def verdict_rows(evaluations: list[GateEvaluation]) -> list[dict]:
    return [
        {
            "id": e.pk,
            "at": _iso(e.evaluated_at),
            "phase": e.phase.index if e.phase else None,
            "verdict": e.verdict,
            "action": e.action,
            "reasons": [_reason_text(r) for r in (e.reasons or [])],
        }
        for e in evaluations
    ]


# --------------------------------------------------------------------------- rollout timeline


def _planned_phases(rollout: Rollout) -> list[dict]:
    rows = []
    for i, spec in enumerate(rollout.plan or [], start=1):
        spec = spec if isinstance(spec, dict) else {}
        rows.append(
            {
                "index": i,
                "allocation": float(spec.get("allocation") or 0),
                "min_duration_s": int(spec.get("min_duration_s") or 0),
                "status": "upcoming",
                "words": "not started",
                "started_at": None,
                "ends_at": None,
                "ended_at": None,
                "elapsed_s": None,
                "left_s": None,
                "extensions": 0,
                "outcome": "",
            }
        )
    return rows


def _phase_status(p: Phase) -> tuple[str, str]:
    if p.ended_at:
        return "done", f"done ({p.outcome or 'ended'})"
    if p.started_at:
        return "current", "in progress"
    return "upcoming", "not started"


def phase_row(p: Phase, now: datetime) -> dict:
    status, words = _phase_status(p)
    planned_end = p.ends_at
    if planned_end is None and p.started_at and p.min_duration_s:
        planned_end = p.started_at + timedelta(seconds=p.min_duration_s)
    elapsed = left = None
    if p.started_at:
        elapsed = ((p.ended_at or now) - p.started_at).total_seconds()
    if status == "current" and planned_end is not None:
        left = max(0.0, (planned_end - now).total_seconds())
    return {
        "index": p.index,
        "allocation": p.allocation,
        "min_duration_s": p.min_duration_s,
        "status": status,
        "words": words,
        "started_at": _iso(p.started_at),
        "ends_at": _iso(planned_end),
        "ended_at": _iso(p.ended_at),
        "elapsed_s": elapsed,
        "left_s": left,
        "extensions": p.extensions,
        "outcome": p.outcome,
        "needs_manual_promote": p.needs_manual_promote,
    }


def rollout_state(rollout: Rollout, phases: list[Phase], now: datetime) -> dict:
    return {
        "id": rollout.pk,
        "name": rollout.name,
        "state": rollout.state,
        "words": ROLLOUT_WORDS.get(rollout.state, rollout.state),
        "reason": rollout.state_reason,
        "current_phase": rollout.current_phase,
        "config_version": rollout.config_version,
        "rehearsal": rollout.rehearsal,
        "started_at": _iso(rollout.started_at),
        "phases": [phase_row(p, now) for p in phases] or _planned_phases(rollout),
    }


# --------------------------------------------------------------------------- equity, positions


def _downsample(rows: list[tuple], points: int) -> list[tuple]:
    if len(rows) <= points:
        return rows
    step = len(rows) / points
    picked = [rows[int(i * step)] for i in range(points)]
    worst = min(rows, key=lambda r: r[2])
    if worst not in picked:  # never hide the worst drawdown
        picked.append(worst)
        picked.sort(key=lambda r: r[0])
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    return picked


def equity_state(deployment: Deployment) -> dict:
    """The last 24 h of equity before the newest snapshot (replays use candle time)."""
    latest = list(
        EquitySnapshot.objects.filter(deployment=deployment)
        .order_by("-ts")
        .values_list("ts", "equity", "drawdown_pct")[:EQUITY_ROWS]
    )
    latest.reverse()
    if latest:
        start = latest[-1][0] - EQUITY_WINDOW
        latest = [r for r in latest if r[0] >= start]
    rows = _downsample(latest, EQUITY_POINTS)
    last = rows[-1] if rows else None
    return {
        "t": [r[0].timestamp() for r in rows],
        "equity": [r[1] for r in rows],
        "drawdown": [r[2] for r in rows],
        "last": {"ts": _iso(last[0]), "equity": last[1], "drawdown_pct": last[2]} if last else None,
        "worst_drawdown_pct": min((r[2] for r in latest), default=None),
        "quote": deployment.quote_currency,
    }


def position_rows(deployment: Deployment) -> list[dict]:
    rows = Position.objects.filter(deployment=deployment).exclude(qty=0).order_by("symbol")
    return [
        {
            "symbol": p.symbol,
            "side": "long" if p.qty > 0 else "short",
            "qty": p.qty,
            "avg_entry": p.avg_entry,
            "last_price": p.last_price,
            "unrealised": p.unrealised_pnl if p.last_price is not None else None,
            "realised": p.realised_pnl,
            "updated_at": _iso(p.updated_at),
        }
        for p in rows
    ]


def kill_switch_state(deployment: Deployment) -> dict:
    try:
        live, error = killswitch.read_state(deployment.pk).value, ""
    except killswitch.KillSwitchUnreadable as err:
        live, error = "UNREADABLE", str(err)
    return {
        "state": live,
        "words": KILL_SWITCH_WORDS.get(live, live),
        "error": error,
        "mirror": deployment.kill_switch,
        "mirror_differs": live != deployment.kill_switch,
        "allocation": deployment.allocation,
    }


def today_counts(deployment: Deployment, now: datetime) -> dict:
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    orders = Order.objects.filter(deployment=deployment, created_at__gte=midnight).aggregate(
        orders=Count("id"), errors=Count("id", filter=Q(status__in=ERROR_STATUSES))
    )
    alerts = Alert.objects.aggregate(
        today=Count("id", filter=Q(detected_at__gte=midnight)),
        unacked=Count("id", filter=Q(acknowledged_at__isnull=True, suppressed=False)),
    )
    return {"since": _iso(midnight), **orders, "alerts": alerts["today"], **alerts}


# --------------------------------------------------------------------------- gate #1, pre-flight


CHECK_KIND = {"pass": "pass", "ok": "pass", "go": "pass", "warn": "warn", "skip": "none"}


def _check_row(name: str, raw: Any) -> dict:
    """One pre-flight check, as canary.preflight stores it ({name, status PASS | WARN |
    FAIL, critical, detail, duration_ms}); older shapes ({ok: bool}) are read too."""
    data = raw if isinstance(raw, dict) else {"ok": bool(raw)}
    status = str(data.get("status") or "").lower()
    if not status:
        status = "pass" if data.get("ok") else "fail"
    detail = data.get("detail") or data.get("message") or data.get("error") or ""
    return {
        "name": str(data.get("name") or name),
        "status": status,
        "kind": CHECK_KIND.get(status, "fail"),
        "ok": CHECK_KIND.get(status) in ("pass", "warn"),
        "critical": bool(data.get("critical", True)),
        "detail": str(detail)[:300],
        "duration_ms": data.get("duration_ms"),
    }


def preflight_state(run: PreflightRun | None) -> dict | None:
    if run is None:
        return None
    raw = run.checks
    items = list(raw.items()) if isinstance(raw, dict) else [("", c) for c in (raw or [])]
    return {
        "id": run.pk,
        "decision": run.decision,
        "go": run.decision.upper() == "GO",
        "started_at": _iso(run.started_at),
        "ended_at": _iso(run.ended_at),
        "actor": run.actor,
        "report_path": run.report_path,
        "checks": [_check_row(name, check) for name, check in items],
    }


EVIDENCE_LABELS = {
    "smc_alignment_pct": "SMC alignment",
    "reward_risk": "Reward:risk",
    "liquidation_sweep_errors": "Liquidation-sweep errors",
    "team_ready": "Team ready",
}


def _evidence(evidence: Any) -> list[list[str]]:
    if not isinstance(evidence, dict):
        return [["evidence", str(evidence)]] if evidence else []
    rows = []
    for key, value in evidence.items():
        label = EVIDENCE_LABELS.get(key, key.replace("_", " "))
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif key.endswith("_pct") and isinstance(value, int | float):
            text = f"{value:g} %"
        else:
            text = str(value)
        rows.append([label, text[:200]])
    return rows


def _lifecycle() -> Any:
    """canary.services (the lifecycle engineer's module) when present."""
    if importlib.util.find_spec("canary.services") is None:
        return None
    return importlib.import_module("canary.services")


def _signal_check(approval: Approval) -> list[str] | None:
    """Why the Alpha trader's evidence misses a go-live bound ([] when it meets them)."""
    lifecycle = _lifecycle()
    if approval.role != "alpha" or lifecycle is None:
        return None
    return list(lifecycle.alpha_evidence_problems(approval.evidence))


def approval_rows(rollout: Rollout, approvals: list[Approval]) -> list[dict]:
    return [
        {
            "role": a.role,
            "role_label": a.get_role_display(),
            "user": a.user.get_username(),
            "at": _iso(a.created_at),
            "comment": a.comment,
            "evidence": _evidence(a.evidence),
            "evidence_problems": _signal_check(a),
            "config_version": a.config_version,
            "current": a.config_version == rollout.config_version,
        }
        for a in approvals
    ]


def gate1_state(rollout: Rollout) -> dict | None:
    """Whether gate #1 would open now (shown while the rollout awaits it)."""
    lifecycle = _lifecycle()
    if rollout.state != RolloutState.PENDING or lifecycle is None:
        return None
    return lifecycle.gate1_check(rollout=rollout).to_dict()


# --------------------------------------------------------------------------- health, audit, acks

_health_cache: dict[str, Any] = {}


def health_state() -> dict:
    """The health report, reused for HEALTH_TTL_S so that many open desks cost one check."""
    now = time.monotonic()
    if _health_cache.get("until", 0.0) > now:
        return _health_cache["report"]
    healthy, report = health_report()
    report = {"ok": healthy, **report}
    _health_cache.update(until=now + HEALTH_TTL_S, report=report)
    return report


def audit_rows() -> list[dict]:
    rows = (
        AuditEvent.objects.exclude(action__in=NOISY_AUDIT_ACTIONS)
        .exclude(action__startswith="delivery.")
        .order_by("-seq")
        .values("seq", "created_at", "actor", "action", "target_type", "target_id", "payload")[
            :AUDIT_SHOWN
        ]
    )
    return [
        {
            "seq": r["seq"],
            "at": _iso(r["created_at"]),
            "actor": r["actor"],
            "action": r["action"],
            "target": f"{r['target_type']} {r['target_id']}".strip(),
            "reason": str((r["payload"] or {}).get("reason", ""))[:120]
            if isinstance(r["payload"], dict)
            else "",
        }
        for r in rows
    ]


def recent_acks(now: datetime) -> list[dict]:
    rows = (
        Alert.objects.filter(acknowledged_at__gte=now - ACKS_WINDOW)
        .order_by("-acknowledged_at")
        .values_list("pk", "acknowledged_by__username", "acknowledged_at")[:200]
    )
    return [{"id": pk, "by": by or "", "at": _iso(at)} for pk, by, at in rows]


# --------------------------------------------------------------------------- the whole state


def current_rollout() -> Rollout | None:
    """The newest rollout still in play, else the newest one."""
    qs = Rollout.objects.select_related("deployment").order_by("-created_at", "-id")
    return qs.filter(state__in=ACTIVE_ROLLOUT_STATES).first() or qs.first()


def _permissions(user: Any) -> dict[str, bool]:
    perms = user.get_all_permissions()
    has = user.is_superuser or TRIGGER in perms
    return {
        "halt": has,
        "rollback": has,
        "handle_alerts": user.is_superuser or HANDLE in perms,
    }


def _rollout_parts(rollout: Rollout, now: datetime) -> dict:
    phases = list(rollout.phases.order_by("index"))
    evaluations = list(
        GateEvaluation.objects.filter(rollout=rollout)
        .select_related("phase")
        .order_by("-evaluated_at", "-id")[:VERDICTS_SHOWN]
    )
    approvals = list(
        Approval.objects.filter(rollout=rollout).select_related("user").order_by("created_at")
    )
    return {
        "rollout": rollout_state(rollout, phases, now),
        "gates": gates_state(rollout, evaluations[0] if evaluations else None),
        "verdicts": verdict_rows(evaluations),
        "approvals": approval_rows(rollout, approvals),
        "gate1": gate1_state(rollout),
    }


def _deployment_parts(deployment: Deployment, now: datetime) -> dict:
    return {
        "deployment": {
            "id": deployment.pk,
            "name": deployment.name,
            "exchange": deployment.exchange,
            "symbols": deployment.symbols,
            "timeframe": deployment.timeframe,
            "quote": deployment.quote_currency,
        },
        "kill_switch": kill_switch_state(deployment),
        "equity": equity_state(deployment),
        "positions": position_rows(deployment),
        "today": today_counts(deployment, now),
    }


def desk_state(user: Any, now: datetime | None = None) -> dict:
    """Everything the page shows except the alert feed (which comes over the WebSocket)."""
    now = now or timezone.now()
    rollout = current_rollout()
    deployment = rollout.deployment if rollout else Deployment.objects.order_by("-id").first()
    state: dict[str, Any] = {
        "now": _iso(now),
        "user": {"name": user.get_username(), "can": _permissions(user)},
        "poll_s": settings.DESK_POLL_S,
        "rollout": None,
        "gates": None,
        "verdicts": [],
        "approvals": [],
        "gate1": None,
        "deployment": None,
    }
    if rollout is not None:
        state.update(_rollout_parts(rollout, now))
    if deployment is not None:
        state.update(_deployment_parts(deployment, now))
    runs = PreflightRun.objects.filter(decision__in=("GO", "NO-GO")).order_by("-started_at")
    state["preflight"] = preflight_state(runs.first())
    state["health"] = health_state()
    state["audit"] = audit_rows()
    state["acks"] = recent_acks(now)
    state["reports"] = reports.report_list(limit=10)
    return state


# --------------------------------------------------------------------------- views


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _refuse(request: HttpRequest, op: str, perm: str) -> HttpResponse | None:
    """None when the user holds ``perm``; else 403, the refusal recorded in the
    permission trail (audit.permissions, committed on its own)."""
    try:
        permission_require(
            actor=request.user,
            perm=perm,
            op=op,
            target_type="desk",
            target_id=op,
            request=request,
        )
    except PermissionRefused as err:
        if _wants_json(request) or request.method != "GET":
            return JsonResponse({"error": str(err)}, status=403)
        return render(request, "desk/forbidden.html", {"message": str(err)}, status=403)
    return None


def _session_expired(request: HttpRequest) -> JsonResponse:
    login = f"{settings.LOGIN_URL}?next=/"
    return JsonResponse({"error": "session expired", "login_url": login}, status=401)


@never_cache
@login_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    if refused := _refuse(request, "view the desk", VIEW):
        return refused
    return render(request, "desk/dashboard.html", {"state": desk_state(request.user)})


@never_cache
@require_GET
def state_json(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return _session_expired(request)
    if refused := _refuse(request, "view the desk", VIEW):
        return refused
    return JsonResponse(desk_state(request.user))


class ActionForm(forms.Form):
    deployment = forms.IntegerField(min_value=1)
    reason = forms.CharField(min_length=3, max_length=300, strip=True)
    confirm = forms.BooleanField(
        required=True, error_messages={"required": "tick the box to confirm"}
    )


def _halt(deployment: Deployment, reason: str, request: HttpRequest) -> str:
    killswitch.set_state(
        deployment=deployment,
        state=KillSwitch.HALTED,
        actor=request.user,
        reason=reason,
        request=request,
    )
    return f"{deployment.name} halted: no new orders"


def _rollback_module() -> Any:
    if importlib.util.find_spec("canary.rollback") is None:
        return None
    return importlib.import_module("canary.rollback")


def _rollback_service() -> Callable[..., Any] | None:
    """canary.rollback.rollback_request once the safety module exists, else None."""
    return getattr(_rollback_module(), "rollback_request", None)


def _refusals() -> tuple[type[Exception], ...]:
    """What the services raise when they refuse an action (answered 409)."""
    denied = getattr(_rollback_module(), "RollbackDenied", None)
    base: tuple[type[Exception], ...] = (IntegrityError, ValueError, PermissionDenied)
    return (*base, denied) if isinstance(denied, type) else base


def _rollback(deployment: Deployment, reason: str, request: HttpRequest) -> str:
    """The staged rollback through canary.rollback.rollback_request; until that exists,
    a thin adapter that does what stage 1 starts with (halt: stop new entries) and
    records the request."""
    rollout = (
        Rollout.objects.filter(deployment=deployment, state__in=ACTIVE_ROLLOUT_STATES)
        .order_by("-created_at")
        .first()
    )
    rollback_request = _rollback_service()
    if rollback_request is not None:
        rollback = rollback_request(
            deployment=deployment,
            rollout=rollout,
            trigger="person",
            cause=reason,
            reasons=(),
            actor=request.user,
            request=request,
        )
        return f"rollback #{rollback.pk} of {deployment.name} started"
    _halt(deployment, f"rollback requested: {reason}", request)
    audit_record(
        action="desk.rollback_requested",
        actor=request.user,
        target=deployment,
        payload={"reason": reason, "rollout": rollout.pk if rollout else None, "runner": None},
        request=request,
    )
    return (
        f"{deployment.name} halted. The staged rollback runner is not installed: "
        "flatten positions by hand (docs/RUNBOOK.md, Rollback)"
    )


ACTIONS = {"halt": _halt, "rollback": _rollback}


def _answer(request: HttpRequest, ok: bool, message: str, status: int = 200) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse({"ok": ok, "message": message}, status=status)
    (messages.success if ok else messages.error)(request, message)
    return redirect("desk")


def _form_errors(form: forms.Form) -> str:
    return "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())


@require_POST
def desk_action(request: HttpRequest, op: str) -> HttpResponse:
    if not request.user.is_authenticated:
        return _session_expired(request)
    if refused := _refuse(request, op, TRIGGER):
        return refused
    form = ActionForm(request.POST)
    if not form.is_valid():
        return _answer(request, False, _form_errors(form), status=400)
    deployment = Deployment.objects.filter(pk=form.cleaned_data["deployment"]).first()
    if deployment is None:
        return _answer(request, False, "no such deployment", status=404)
    try:
        message = ACTIONS[op](deployment, form.cleaned_data["reason"], request)
    except redis.RedisError as err:
        audit_record(
            action=f"desk.{op}_failed",
            actor=request.user,
            target=deployment,
            payload={"reason": form.cleaned_data["reason"], "error": type(err).__name__},
            request=request,
        )
        text = f"{op} NOT applied: the kill-switch store (Redis) is unreachable ({err})"
        return _answer(request, False, text, status=503)
    except _refusals() as err:
        return _answer(request, False, f"{op} refused: {err}", status=409)
    return _answer(request, True, message)


def _report_day(day: str) -> date:
    try:
        return date.fromisoformat(day)
    except ValueError:
        raise Http404("not a date") from None


def _may_view(request: HttpRequest) -> HttpResponse | None:
    return _refuse(request, "view reports", VIEW)


@login_required
@require_GET
def report_html(request: HttpRequest, day: str) -> HttpResponse:
    if refused := _may_view(request):
        return refused
    path = reports.report_path(_report_day(day), "html")
    if not path.exists():
        raise Http404("no report for that day")
    return HttpResponse(path.read_text(encoding="utf-8"))


@login_required
@require_GET
def report_chart(request: HttpRequest, day: str) -> HttpResponse:
    if refused := _may_view(request):
        return refused
    path = reports.report_path(_report_day(day), "png")
    if not path.exists():
        raise Http404("no chart for that day")
    return FileResponse(path.open("rb"), content_type="image/png")
