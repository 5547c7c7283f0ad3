"""Rollout lifecycle: plan, approvals (gate #1), start, promote, extend, pause, resume, roll
back, live. Each service is one transaction that writes its audit record; kill-switch
writes (Redis) and rollback runners happen after commit.

Pause: the kill switch goes to REDUCING (position-reducing orders only: stops and targets
still close positions), the phase allocation is kept; resume sets it ACTIVE again.

A person (a ``User``) needs the permission of the action; the monitor acts as the system
actor ``SYSTEM_ACTOR`` (a string). Refused actions raise ``RolloutError`` subclasses and are
recorded in the audit trail in their own transaction (call services outside any outer
``atomic`` block for that record to survive the refusal).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import audit_record
from trading.models import Deployment, KillSwitch
from trading.numbers import is_finite_number
from trading.rows import ModelRows, fetch_one, prep_save

from .engine import ThresholdError, Thresholds
from .models import (
    Approval,
    ApprovalRole,
    Phase,
    PreflightRun,
    Rollback,
    RollbackState,
    Rollout,
    RolloutState,
)

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

SYSTEM_ACTOR = "canary-monitor"
PERM_APPROVE = {
    ApprovalRole.ALPHA: "audit.approve_alpha",
    ApprovalRole.PLANNER: "audit.approve_planner",
}
PERM_PROMOTE = "audit.promote_rollout"  # also starts phase 1
PERM_PAUSE = "audit.pause_rollout"
PERM_ROLLBACK = "audit.trigger_rollback"
PERM_CREATE = "canary.add_rollout"
PERM_CONFIGURE = "canary.change_rollout"

ACTIVE_STATES = (RolloutState.RUNNING, RolloutState.PAUSED)
MONITORED_STATES = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.LIVE)
BUSY_ROLLBACK_STATES = (RollbackState.RUNNING, RollbackState.STAGE1_DONE)


# --- errors -------------------------------------------------------------------------------


class RolloutError(Exception):
    """A refused rollout action; ``code`` says why (API: forbidden -> 403, else 409/400)."""

    code = "refused"

    def __init__(self, message: str, *, field: str | None = None, reasons: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.reasons = reasons or [message]


class RolloutForbidden(RolloutError):
    code = "forbidden"


class RolloutInvalid(RolloutError):
    code = "invalid"


class ApprovalRefused(RolloutError):
    pass


class GateRefused(RolloutError):
    pass


# --- plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    allocation: float
    min_duration_s: int
    extension_s: int
    needs_manual_promote: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocation": self.allocation,
            "min_duration_s": self.min_duration_s,
            "extension_s": self.extension_s,
            "needs_manual_promote": self.needs_manual_promote,
        }


DEFAULT_PLAN: tuple[PhaseSpec, ...] = (
    PhaseSpec(allocation=0.10, min_duration_s=30 * 60, extension_s=15 * 60),
    PhaseSpec(allocation=0.50, min_duration_s=2 * 3600, extension_s=30 * 60),
    PhaseSpec(allocation=1.00, min_duration_s=4 * 3600, extension_s=60 * 60),
)
PLAN_KEYS = frozenset({"allocation", "min_duration_s", "extension_s", "needs_manual_promote"})
MAX_PHASES = 10


def default_plan() -> list[dict[str, Any]]:
    return [spec.to_dict() for spec in DEFAULT_PLAN]


def parse_plan(raw: Any) -> tuple[PhaseSpec, ...]:
    """Validate a plan: 2..10 phases, allocations strictly increasing in (0, 1] and ending
    at 1 (never from zero to full size in one step), positive integer durations."""
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_PHASES:
        raise RolloutInvalid(f"must be a list of 2 to {MAX_PHASES} phases", field="plan")
    specs = tuple(_parse_phase_spec(index, item) for index, item in enumerate(raw, start=1))
    for index, (before, after) in enumerate(zip(specs, specs[1:], strict=False), start=2):
        if after.allocation <= before.allocation:
            raise RolloutInvalid(
                "allocation must be above the previous phase's", field=f"plan.{index}.allocation"
            )
    if specs[-1].allocation != 1.0:
        raise RolloutInvalid("the last phase must be at allocation 1", field="plan.allocation")
    return specs


def _parse_phase_spec(index: int, item: Any) -> PhaseSpec:
    where = f"plan.{index}"
    if not isinstance(item, Mapping):
        raise RolloutInvalid("must be an object", field=where)
    unknown = sorted(str(k) for k in item if k not in PLAN_KEYS)
    if unknown:
        raise RolloutInvalid(f"unknown key(s): {', '.join(unknown)}", field=f"{where}.{unknown[0]}")
    allocation = item.get("allocation")
    if not is_finite_number(allocation) or not 0 < allocation <= 1:
        raise RolloutInvalid("must be a number in (0, 1]", field=f"{where}.allocation")
    durations = {}
    for key in ("min_duration_s", "extension_s"):
        value = item.get(key)
        if not is_finite_number(value) or value != int(value) or value < 1:
            raise RolloutInvalid("must be a whole number of seconds >= 1", field=f"{where}.{key}")
        durations[key] = int(value)
    manual = item.get("needs_manual_promote", False)
    if not isinstance(manual, bool):
        raise RolloutInvalid("must be true or false", field=f"{where}.needs_manual_promote")
    return PhaseSpec(float(allocation), needs_manual_promote=manual, **durations)


def parse_thresholds(raw: Any) -> Thresholds:
    try:
        return Thresholds.from_dict(raw or {})
    except ThresholdError as exc:
        raise RolloutInvalid(exc.message, field=f"thresholds.{exc.field}") from exc
    except TypeError as exc:
        raise RolloutInvalid(str(exc), field="thresholds") from exc


# --- alpha evidence -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvidenceBound:
    key: str
    test: Callable[[float], bool]
    text: str
    lo: float
    hi: float | None = None
    integer: bool = False


ALPHA_EVIDENCE: tuple[EvidenceBound, ...] = (
    EvidenceBound("smc_alignment_pct", lambda v: v >= 80, ">= 80", lo=0, hi=100),
    EvidenceBound("reward_risk", lambda v: v > 3, "> 3", lo=0),
    EvidenceBound("liquidation_sweep_errors", lambda v: v == 0, "= 0", lo=0, integer=True),
)


def alpha_evidence_problems(evidence: Any) -> list[str]:
    """Why the Alpha trader's signal validation does not allow the go-live (empty: it does)."""
    if not isinstance(evidence, Mapping):
        return ["evidence: must be an object"]
    problems = []
    for bound in ALPHA_EVIDENCE:
        value = evidence.get(bound.key)
        if not is_finite_number(value):
            problems.append(f"{bound.key}: must be a number, got {value!r}")
        elif value < bound.lo or (bound.hi is not None and value > bound.hi):
            limit = f"{bound.lo:g}..{bound.hi:g}" if bound.hi is not None else f">= {bound.lo:g}"
            problems.append(f"{bound.key}: out of range ({limit}), got {value!r}")
        elif bound.integer and value != int(value):
            problems.append(f"{bound.key}: must be a whole number, got {value!r}")
        elif not bound.test(value):
            problems.append(f"{bound.key}: {value!r} does not meet {bound.text}")
    return problems


# --- helpers ------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return now if now is not None else timezone.now()


def is_person(actor: Any) -> bool:
    return bool(getattr(actor, "is_authenticated", False))


def actor_name(actor: Any) -> str:
    if is_person(actor):
        return actor.get_username()
    return str(actor) if actor else SYSTEM_ACTOR


def _require_permission(actor: Any, perm: str, op: str) -> None:
    """People need ``perm``; the system actor (a string) is trusted."""
    if isinstance(actor, str) and actor:
        return
    if is_person(actor) and actor.is_active and actor.has_perm(perm):
        return
    raise RolloutForbidden(f"{op} needs the {perm} permission")


def _record_refusal(
    *,
    op: str,
    actor: Any,
    rollout: Rollout | None,
    error: RolloutError,
    payload: dict,
    request: Any,
) -> None:
    """The refusal, committed on its own (the refused change was rolled back)."""
    with transaction.atomic():
        audit_record(
            action="approval.refused" if op == "approve" else "rollout.refused",
            actor=actor,
            target=rollout,
            target_type="canary.Rollout",
            payload={
                "op": op,
                "code": error.code,
                "reason": error.message,
                "reasons": error.reasons,
                **payload,
            },
            request=request,
        )


def _refusable(op: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator: a ``RolloutError`` raised by the service is recorded, then re-raised."""

    def wrap(func: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(func)
        def service(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return func(*args, **kwargs)
            except RolloutError as exc:
                _record_refusal(
                    op=op,
                    actor=kwargs.get("actor"),
                    rollout=kwargs.get("rollout"),  # type: ignore[arg-type]
                    error=exc,
                    payload=_refusal_payload(kwargs),
                    request=kwargs.get("request"),
                )
                raise

        return service

    return wrap


def _refusal_payload(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("role", "evidence", "reason", "comment")
    return {k: json_safe(kwargs[k]) for k in keep if kwargs.get(k) not in (None, "")}


def json_safe(value: Any) -> Any:
    """Plain JSON: non-finite numbers and unknown objects become their repr."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


ROLLOUT_ROWS = ModelRows(Rollout, "r")
DEPLOYMENT_ROWS = ModelRows(Deployment, "d")
PHASE_ROWS = ModelRows(Phase, "p")


def for_update(connection: Any) -> str:
    return " FOR UPDATE" if connection.features.has_select_for_update else ""


def lock_rollout(rollout_id: int) -> Rollout:
    """``Rollout.objects.select_for_update().select_related("deployment").get(pk=...)``:
    the rollout and its deployment, their rows locked (PostgreSQL) until the end of the
    transaction."""
    connection = transaction.get_connection()

    def build() -> str:
        qn = connection.ops.quote_name
        return (
            f"SELECT {ROLLOUT_ROWS.columns(connection)}, {DEPLOYMENT_ROWS.columns(connection)}"
            f" FROM {qn(Rollout._meta.db_table)} r"
            f" INNER JOIN {qn(Deployment._meta.db_table)} d"
            f" ON d.{qn('id')} = r.{qn('deployment_id')}"
            f" WHERE r.{qn('id')} = %s{for_update(connection)}"
        )

    row = fetch_one(connection, ("lock_rollout",), build, [rollout_id])
    if row is None:
        raise Rollout.DoesNotExist(f"{Rollout._meta.object_name} matching query does not exist.")
    n = len(ROLLOUT_ROWS.fields)
    rollout = ROLLOUT_ROWS.instance(connection, row[:n])
    Rollout.deployment.field.set_cached_value(
        rollout, DEPLOYMENT_ROWS.instance(connection, row[n:])
    )
    return rollout


def _lock(rollout: Rollout) -> Rollout:
    return lock_rollout(rollout.pk)


def _refresh(target: Rollout, source: Rollout) -> Rollout:
    """Copy the committed state into the caller's instance and return it."""
    for f in Rollout._meta.concrete_fields:
        setattr(target, f.attname, getattr(source, f.attname))
    return target


def current_phase(rollout: Rollout) -> Phase | None:
    if not rollout.current_phase:
        return None
    return read_phase("p.rollout_id = %s AND p.{index} = %s", [rollout.pk, rollout.current_phase])


def read_phase(where: str, params: list[Any], *, lock: bool = False) -> Phase | None:
    """The phase matching ``where`` (on alias ``p``; ``{index}`` is the quoted column)."""
    connection = transaction.get_connection()

    def build() -> str:
        qn = connection.ops.quote_name
        return (
            f"SELECT {PHASE_ROWS.columns(connection)} FROM {qn(Phase._meta.db_table)} p"
            f" WHERE {where.format(index=qn('index'))}{for_update(connection) if lock else ''}"
        )

    row = fetch_one(connection, ("read_phase", where, lock), build, params)
    return None if row is None else PHASE_ROWS.instance(connection, row)


def _require_state(rollout: Rollout, allowed: tuple[str, ...], op: str) -> None:
    if rollout.state not in allowed:
        raise RolloutError(
            f"cannot {op} a rollout in state {rollout.state} "
            f"(allowed: {', '.join(str(s) for s in allowed)})"
        )


def _require_reason(actor: Any, reason: str, op: str) -> None:
    if is_person(actor) and not (reason or "").strip():
        raise RolloutInvalid(f"{op} needs a reason", field="reason")


def _audit(action: str, *, actor: Any, rollout: Rollout, payload: dict, request: Any) -> None:
    audit_record(action=action, actor=actor, target=rollout, payload=payload, request=request)


# --- side effects: kill switch, alerts, rollback -------------------------------------------


def _kill_switch_on_commit(deployment_id: int, state: KillSwitch, actor: Any, reason: str) -> None:
    def apply() -> None:
        from . import killswitch

        deployment = Deployment.objects.get(pk=deployment_id)
        try:
            killswitch.set_state(deployment=deployment, state=state, actor=actor, reason=reason)
        except Exception as exc:  # noqa: BLE001 - reported as a critical alert, never hidden
            logger.exception("kill switch of deployment %s not set to %s", deployment_id, state)
            canary_alert(
                key=f"deployment:{deployment_id}:killswitch:{timezone.now().timestamp()}",
                severity="critical",
                message=f"kill switch of {deployment.name} could not be set to {state}: {exc}",
                payload={"deployment": deployment_id, "state": state.value},
            )

    transaction.on_commit(apply)


def canary_alert(
    *, key: str, severity: str, message: str, payload: dict | None = None, symbol: str = ""
) -> None:
    """Raise through the alerts pipeline (joins the caller's transaction). An alert that
    cannot be raised is logged; it never undoes the change it reports."""
    try:
        from alerts.services import alert_raise
    except ImportError:  # pragma: no cover - the alerts app is part of the project
        logger.warning("alerts pipeline unavailable: %s", message)
        return
    try:
        with transaction.atomic():
            alert_raise(
                source="canary",
                key=key,
                severity=severity,
                message=message[:300],
                payload=payload or {},
                symbol=symbol,
            )
    except Exception:  # noqa: BLE001 - see docstring
        logger.exception("canary alert not raised: %s", message)


def rollout_alert(
    rollout: Rollout,
    *,
    kind: str,
    severity: str,
    message: str,
    now: datetime,
    payload: dict | None = None,
) -> None:
    stamp = int(now.timestamp() * 1000)
    canary_alert(
        key=f"rollout:{rollout.pk}:{kind}:{rollout.current_phase}:{stamp}",
        severity=severity,
        message=f"{rollout.name}: {message}",
        payload={
            "rollout": rollout.pk,
            "kind": kind,
            "phase": rollout.current_phase,
            **(payload or {}),
        },
    )


def request_rollback(
    *,
    deployment: Deployment,
    rollout: Rollout | None,
    trigger: str,
    cause: str,
    reasons: list,
    actor: Any,
) -> Rollback:
    """canary.rollback.rollback_request (idempotent; queues the runner on commit). Until the
    safety module exists: a Rollback row and the kill switch HALTED after commit."""
    try:
        from .rollback import rollback_request
    except ImportError:
        return _rollback_fallback(
            deployment=deployment,
            rollout=rollout,
            trigger=trigger,
            cause=cause,
            reasons=reasons,
            actor=actor,
        )
    return rollback_request(
        deployment=deployment,
        rollout=rollout,
        trigger=trigger,
        cause=cause,
        reasons=reasons,
        actor=actor,
    )


def _rollback_fallback(
    *,
    deployment: Deployment,
    rollout: Rollout | None,
    trigger: str,
    cause: str,
    reasons: list,
    actor: Any,
) -> Rollback:
    running = Rollback.objects.filter(deployment=deployment, state=RollbackState.RUNNING).first()
    if running is not None:
        return running
    rollback = Rollback.objects.create(
        deployment=deployment,
        rollout=rollout,
        trigger=trigger,
        cause=cause[:300],
        reasons=reasons,
        requested_by=actor_name(actor)[:150],
        started_at=timezone.now(),
    )
    _kill_switch_on_commit(deployment.pk, KillSwitch.HALTED, actor, f"rollback: {cause}"[:200])
    return rollback


# --- create and configure -----------------------------------------------------------------


def _validated_config(plan: Any, thresholds: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    specs = parse_plan(plan)
    return [s.to_dict() for s in specs], parse_thresholds(thresholds).to_dict()


@_refusable("create")
def rollout_create(
    *,
    deployment: Deployment,
    name: str,
    actor: Any,
    plan: Any = None,
    thresholds: Any = None,
    strategy_params: Any = None,
    rehearsal: bool = False,
    now: datetime | None = None,
    request: Any = None,
) -> Rollout:
    """A PENDING rollout. Defaults: ``DEFAULT_PLAN``, default thresholds, the deployment's
    current parameters (the ones the approvals will be about)."""
    _require_permission(actor, PERM_CREATE, "create a rollout")
    plan_data, threshold_data = _validated_config(
        plan if plan is not None else default_plan(), thresholds
    )
    params = deployment.params if strategy_params is None else strategy_params
    if not isinstance(params, Mapping):
        raise RolloutInvalid("must be an object", field="strategy_params")
    with transaction.atomic():
        rollout = Rollout.objects.create(
            deployment=deployment,
            name=name,
            plan=plan_data,
            thresholds=threshold_data,
            strategy_params=dict(params),
            rehearsal=rehearsal,
            created_by=actor if is_person(actor) else None,
            created_at=_now(now),
        )
        _audit(
            "rollout.create",
            actor=actor,
            rollout=rollout,
            payload={"deployment": deployment.pk, "plan": plan_data, "thresholds": threshold_data},
            request=request,
        )
    return rollout


@_refusable("configure")
def rollout_configure(
    *,
    rollout: Rollout,
    actor: Any,
    plan: Any = None,
    thresholds: Any = None,
    strategy_params: Any = None,
    name: str | None = None,
    request: Any = None,
) -> Rollout:
    """Change the plan, thresholds or strategy parameters of a PENDING rollout. A change
    bumps ``config_version``: approvals given before it are void."""
    _require_permission(actor, PERM_CONFIGURE, "configure a rollout")
    with transaction.atomic():
        locked = _lock(rollout)
        _require_state(locked, (RolloutState.PENDING,), "configure")
        new_plan, new_thresholds = _validated_config(
            locked.plan if plan is None else plan,
            locked.thresholds if thresholds is None else thresholds,
        )
        new_params = locked.strategy_params if strategy_params is None else strategy_params
        if not isinstance(new_params, Mapping):
            raise RolloutInvalid("must be an object", field="strategy_params")
        changed = sorted(
            key
            for key, old, new in (
                ("plan", locked.plan, new_plan),
                ("thresholds", locked.thresholds, new_thresholds),
                ("strategy_params", locked.strategy_params, dict(new_params)),
            )
            if old != new
        )
        locked.plan, locked.thresholds, locked.strategy_params = (
            new_plan,
            new_thresholds,
            dict(new_params),
        )
        if name:
            locked.name = name
        if changed:
            locked.config_version += 1
        locked.save()
        _audit(
            "rollout.configure",
            actor=actor,
            rollout=locked,
            payload={"changed": changed, "config_version": locked.config_version},
            request=request,
        )
    return _refresh(rollout, locked)


# --- gate #1 ------------------------------------------------------------------------------


@dataclass
class GateStatus:
    ok: bool
    problems: list[str] = field(default_factory=list)
    preflight_id: int | None = None
    alpha_id: int | None = None
    planner_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "preflight": self.preflight_id,
            "alpha_approval": self.alpha_id,
            "planner_approval": self.planner_id,
        }


def valid_approvals(rollout: Rollout) -> dict[str, Approval]:
    """The latest approval per role given for the rollout's current configuration."""
    found: dict[str, Approval] = {}
    rows = (
        Approval.objects.filter(rollout=rollout, config_version=rollout.config_version)
        .select_related("user")
        .order_by("-created_at", "-id")
    )
    for approval in rows:
        found.setdefault(approval.role, approval)
    return found


def gate1_check(*, rollout: Rollout, now: datetime | None = None) -> GateStatus:
    """Gate #1: a GO pre-flight younger than CANARY_PREFLIGHT_MAX_AGE_S and no NO-GO after
    it (the newest report decides), a valid Alpha and Planner approval of the current
    configuration by two different people who still hold their role's permission."""
    now = _now(now)
    status = GateStatus(ok=False)
    max_age = timedelta(seconds=settings.CANARY_PREFLIGHT_MAX_AGE_S)
    preflight = (
        PreflightRun.objects.filter(ended_at__gt=now - max_age, ended_at__lte=now)
        .order_by("-ended_at", "-id")
        .first()
    )
    if preflight is None:
        status.problems.append(
            f"no GO pre-flight report younger than {max_age.total_seconds() / 60:g} min"
        )
    elif preflight.decision != "GO":
        status.problems.append(
            f"the newest pre-flight report ({preflight.pk}, {preflight.ended_at.isoformat()}) "
            f"says {preflight.decision}"
        )
    else:
        status.preflight_id = preflight.pk
    approvals = valid_approvals(rollout)
    for role in (ApprovalRole.ALPHA, ApprovalRole.PLANNER):
        approval = approvals.get(role)
        if approval is None:
            status.problems.append(
                f"no {role.label} approval of configuration v{rollout.config_version}"
            )
        elif not (approval.user.is_active and approval.user.has_perm(PERM_APPROVE[role])):
            status.problems.append(f"{approval.user} no longer holds {PERM_APPROVE[role]}")
    alpha, planner = approvals.get(ApprovalRole.ALPHA), approvals.get(ApprovalRole.PLANNER)
    if alpha and planner and alpha.user_id == planner.user_id:
        status.problems.append("the Alpha and Planner approvals are by the same person")
    status.alpha_id = alpha.pk if alpha else None
    status.planner_id = planner.pk if planner else None
    status.ok = not status.problems
    return status


@_refusable("approve")
def approval_record(
    *,
    rollout: Rollout,
    role: str,
    actor: Any,
    evidence: Any = None,
    comment: str = "",
    now: datetime | None = None,
    request: Any = None,
) -> Approval:
    """Approve the go-live in one role. Refused (and recorded): an unknown role, a person
    without the role's permission, a rollout not PENDING, the same person approving twice
    (in either role) for this configuration, an Alpha approval whose signal validation is
    below the bounds (SMC alignment >= 80 %, reward:risk > 3, no liquidation-sweep errors)."""
    if role not in ApprovalRole.values:
        raise ApprovalRefused(f"unknown role {role!r}", field="role")
    role = ApprovalRole(role)
    if not is_person(actor):
        raise RolloutForbidden("an approval needs a signed-in person")
    _require_permission(actor, PERM_APPROVE[role], f"approve as {role.label}")
    evidence = {} if evidence is None else evidence
    if role == ApprovalRole.ALPHA:
        problems = alpha_evidence_problems(evidence)
        if problems:
            raise ApprovalRefused(
                "signal validation below the bounds: " + "; ".join(problems),
                field="evidence",
                reasons=problems,
            )
    elif not isinstance(evidence, Mapping):
        raise ApprovalRefused("evidence must be an object", field="evidence")
    with transaction.atomic():
        locked = _lock(rollout)
        _require_state(locked, (RolloutState.PENDING,), "approve")
        existing = valid_approvals(locked)
        if role in existing:
            raise ApprovalRefused(
                f"{role.label} approval already given by {existing[role].user} "
                f"for configuration v{locked.config_version}"
            )
        if any(a.user_id == actor.pk for a in existing.values()):
            raise ApprovalRefused("the same person cannot give both approvals (four eyes)")
        approval = Approval.objects.create(
            rollout=locked,
            role=role,
            user=actor,
            comment=comment or "",
            evidence=json_safe(dict(evidence)),
            config_version=locked.config_version,
            created_at=_now(now),
        )
        _audit(
            "approval.record",
            actor=actor,
            rollout=locked,
            payload={
                "approval": approval.pk,
                "role": role.value,
                "evidence": approval.evidence,
                "config_version": locked.config_version,
                "rehearsal": locked.rehearsal,
            },
            request=request,
        )
    return approval


# --- lifecycle ----------------------------------------------------------------------------


def _plan_spec(rollout: Rollout, index: int) -> PhaseSpec:
    return parse_plan(rollout.plan)[index - 1]


def _open_phase(rollout: Rollout, index: int, now: datetime) -> Phase:
    spec = _plan_spec(rollout, index)
    phase = Phase.objects.create(
        rollout=rollout,
        index=index,
        allocation=spec.allocation,
        min_duration_s=spec.min_duration_s,
        extension_s=spec.extension_s,
        needs_manual_promote=spec.needs_manual_promote,
        started_at=now,
        ends_at=now + timedelta(seconds=spec.min_duration_s),
    )
    Deployment.objects.filter(pk=rollout.deployment_id).update(allocation=spec.allocation)
    rollout.current_phase = index
    return phase


def _close_phase(phase: Phase | None, outcome: str, now: datetime) -> None:
    if phase is None:
        return
    phase.outcome = outcome
    phase.ended_at = now
    phase.save(update_fields=["outcome", "ended_at"])


def _busy_rollout(rollout: Rollout) -> str | None:
    other = (
        Rollout.objects.filter(
            deployment_id=rollout.deployment_id,
            state__in=[*MONITORED_STATES, RolloutState.ROLLING_BACK],
        )
        .exclude(pk=rollout.pk)
        .first()
    )
    if other is not None:
        return f"rollout {other.pk} of this deployment is {other.state}"
    if Rollback.objects.filter(
        deployment_id=rollout.deployment_id, state__in=BUSY_ROLLBACK_STATES
    ).exists():
        return "a rollback of this deployment is not finished"
    return None


def _require_no_rollback(rollout: Rollout, op: str) -> None:
    """A rollout that a rollback has taken over (linked to it, or one of its deployment not
    finished) is not promoted or resumed: the monitor's next step makes it follow the
    rollback, and the kill switch stays where the rollback put it (a resume or a promote
    would set it ACTIVE again while, or after, the positions are closed)."""
    rollback = (
        Rollback.objects.filter(
            Q(rollout_id=rollout.pk)
            | Q(deployment_id=rollout.deployment_id, state__in=BUSY_ROLLBACK_STATES)
        )
        .order_by("-pk")
        .first()
    )
    if rollback is not None:
        raise RolloutError(
            f"cannot {op}: rollback {rollback.pk} of this deployment is {rollback.state} "
            f"({rollback.trigger}: {rollback.cause})"
        )


@_refusable("start")
def rollout_start(
    *, rollout: Rollout, actor: Any, now: datetime | None = None, request: Any = None
) -> Rollout:
    """Gate #1 passed: phase 1 starts. The deployment gets the rollout's strategy
    parameters and phase 1's allocation; the kill switch goes ACTIVE after commit."""
    _require_permission(actor, PERM_PROMOTE, "start a rollout")
    now = _now(now)
    with transaction.atomic():
        locked = _lock(rollout)
        _require_state(locked, (RolloutState.PENDING,), "start")
        busy = _busy_rollout(locked)
        if busy:
            raise GateRefused(busy)
        gate = gate1_check(rollout=locked, now=now)
        if not gate.ok:
            raise GateRefused(
                "gate #1 not passed: " + "; ".join(gate.problems), reasons=gate.problems
            )
        phase = _open_phase(locked, 1, now)
        Deployment.objects.filter(pk=locked.deployment_id).update(params=locked.strategy_params)
        locked.state = RolloutState.RUNNING
        locked.state_reason = "gate #1 passed"
        locked.started_at = now
        locked.started_by = actor if is_person(actor) else None
        locked.save()
        _audit(
            "rollout.start",
            actor=actor,
            rollout=locked,
            payload={"gate": gate.to_dict(), "phase": 1, "allocation": phase.allocation},
            request=request,
        )
        rollout_alert(
            locked,
            kind="state",
            severity="warning",
            message=f"started: phase 1 at {phase.allocation:.0%}",
            now=now,
            payload={"state": locked.state},
        )
        _kill_switch_on_commit(
            locked.deployment_id, KillSwitch.ACTIVE, actor, f"rollout {locked.pk} started"
        )
    return _refresh(rollout, locked)


@_refusable("promote")
def rollout_promote(
    *,
    rollout: Rollout,
    actor: Any,
    reason: str = "",
    now: datetime | None = None,
    request: Any = None,
) -> Rollout:
    """Next phase (its allocation), or LIVE from the last phase. People need
    ``promote_rollout`` and a reason (promoting early or out of a pause is theirs to do)."""
    _require_permission(actor, PERM_PROMOTE, "promote a rollout")
    _require_reason(actor, reason, "promote")
    now = _now(now)
    with transaction.atomic():
        locked = _lock(rollout)
        _require_state(locked, ACTIVE_STATES, "promote")
        _require_no_rollback(locked, "promote")
        was_paused = locked.state == RolloutState.PAUSED
        phase = current_phase(locked)
        last = locked.current_phase >= len(locked.plan)
        if last:
            _mark_live(locked, phase, actor=actor, reason=reason, now=now, request=request)
        else:
            _close_phase(phase, "PROMOTED", now)
            new_phase = _open_phase(locked, locked.current_phase + 1, now)
            locked.state = RolloutState.RUNNING
            locked.state_reason = reason or "promoted"
            locked.save()
            _audit(
                "rollout.promote",
                actor=actor,
                rollout=locked,
                payload={
                    "from_phase": new_phase.index - 1,
                    "phase": new_phase.index,
                    "allocation": new_phase.allocation,
                    "reason": reason,
                    "automatic": not is_person(actor),
                    "early": bool(phase and phase.ends_at and now < phase.ends_at),
                },
                request=request,
            )
            rollout_alert(
                locked,
                kind="state",
                severity="warning",
                message=f"promoted to phase {new_phase.index} at {new_phase.allocation:.0%}"
                + (f" ({reason})" if reason else ""),
                now=now,
                payload={"state": locked.state},
            )
        if was_paused:
            _kill_switch_on_commit(
                locked.deployment_id, KillSwitch.ACTIVE, actor, "rollout promoted"
            )
    return _refresh(rollout, locked)


def _mark_live(
    locked: Rollout, phase: Phase | None, *, actor: Any, reason: str, now: datetime, request: Any
) -> None:
    """The last phase keeps running (breaker armed); the rollout is LIVE."""
    if phase is not None:
        phase.outcome = "LIVE"
        phase.save(update_fields=["outcome"])
    locked.state = RolloutState.LIVE
    locked.state_reason = reason or "last phase passed"
    locked.save()
    _audit(
        "rollout.live",
        actor=actor,
        rollout=locked,
        payload={
            "phase": locked.current_phase,
            "reason": reason,
            "automatic": not is_person(actor),
        },
        request=request,
    )
    rollout_alert(
        locked,
        kind="state",
        severity="warning",
        message="LIVE at full size",
        now=now,
        payload={"state": locked.state},
    )


def rollout_mark_live(
    *, rollout: Rollout, actor: Any, reason: str, now: datetime | None = None, request: Any = None
) -> Rollout:
    """The monitor's MARK_LIVE: the last phase passed at the end of its minimum duration."""
    return rollout_promote(rollout=rollout, actor=actor, reason=reason, now=now, request=request)


def phase_extend(
    *,
    rollout: Rollout,
    phase: Phase,
    warning: bool,
    reason: str,
    now: datetime,
    actor: Any = SYSTEM_ACTOR,
) -> Phase:
    """WARNING or INCONCLUSIVE at the end: the phase runs ``extension_s`` longer. Counts
    WARNINGs in a row (an INCONCLUSIVE breaks the row). No savepoint inside a caller's
    transaction (the monitor step's): a failure here fails that step, as its audit record's
    would."""
    with transaction.atomic(savepoint=False):
        locked = _phase_extended(phase, warning=warning, now=now)
        if locked is None:
            locked = read_phase("p.id = %s", [phase.pk], lock=True)
            if locked is None:
                raise Phase.DoesNotExist("Phase matching query does not exist.")
            locked.ends_at = now + timedelta(seconds=locked.extension_s)
            locked.extensions += 1
            locked.consecutive_warnings = locked.consecutive_warnings + 1 if warning else 0
            PHASE_ROWS.update(
                transaction.get_connection(),
                locked,
                ["ends_at", "extensions", "consecutive_warnings"],
            )
        _audit(
            "rollout.extend",
            actor=actor,
            rollout=rollout,
            payload={
                "phase": locked.index,
                "extensions": locked.extensions,
                "ends_at": locked.ends_at.isoformat(),
                "warning": warning,
                "reason": reason,
            },
            request=None,
        )
    return locked


_UPDATE_RETURNING = ("postgresql", "sqlite")  # SQLite since 3.35, as Django 5.2 requires
_ENDS_AT = Phase._meta.get_field("ends_at")


def _phase_extended(phase: Phase, *, warning: bool, now: datetime) -> Phase | None:
    """``phase_extend``'s read of the locked row and its update as one statement: the
    UPDATE locks the row and counts from its values, ``ends_at`` from the caller's
    ``extension_s`` (a condition of the statement); the row as written, or None when the
    statement cannot say (no such row, another ``extension_s``, no UPDATE ... RETURNING)."""
    connection = transaction.get_connection()
    if connection.vendor not in _UPDATE_RETURNING:
        return None

    def build() -> str:
        qn = connection.ops.quote_name
        returning = ", ".join(qn(f.column) for f in PHASE_ROWS.fields)
        return (
            f"UPDATE {qn(Phase._meta.db_table)} SET {qn('ends_at')} = %s,"
            f" {qn('extensions')} = {qn('extensions')} + 1,"
            f" {qn('consecutive_warnings')} = CASE WHEN %s"
            f" THEN {qn('consecutive_warnings')} + 1 ELSE 0 END"
            f" WHERE {qn('id')} = %s AND {qn('extension_s')} = %s RETURNING {returning}"
        )

    ends_at = prep_save(_ENDS_AT, now + timedelta(seconds=phase.extension_s), connection)
    row = fetch_one(
        connection,
        ("phase_extended",),
        build,
        [ends_at, bool(warning), phase.pk, phase.extension_s],
    )
    return None if row is None else PHASE_ROWS.instance(connection, row)


def phase_reset_warnings(*, phase: Phase) -> None:
    if phase.consecutive_warnings:
        Phase.objects.filter(pk=phase.pk).update(consecutive_warnings=0)
        phase.consecutive_warnings = 0


@_refusable("pause")
def rollout_pause(
    *,
    rollout: Rollout,
    actor: Any,
    reason: str = "",
    now: datetime | None = None,
    request: Any = None,
) -> Rollout:
    """RUNNING -> PAUSED: positions are kept, the kill switch goes REDUCING (no new
    entries) after commit, the allocation is kept for the resume."""
    _require_permission(actor, PERM_PAUSE, "pause a rollout")
    _require_reason(actor, reason, "pause")
    now = _now(now)
    with transaction.atomic():
        locked = _lock(rollout)
        _require_state(locked, (RolloutState.RUNNING,), "pause")
        locked.state = RolloutState.PAUSED
        locked.state_reason = reason or "paused"
        locked.save()
        _audit(
            "rollout.pause",
            actor=actor,
            rollout=locked,
            payload={"phase": locked.current_phase, "reason": reason},
            request=request,
        )
        rollout_alert(
            locked,
            kind="state",
            severity="warning",
            message=f"PAUSED in phase {locked.current_phase}: {reason}",
            now=now,
            payload={"state": locked.state},
        )
        _kill_switch_on_commit(
            locked.deployment_id, KillSwitch.REDUCING, actor, f"paused: {reason}"[:200]
        )
    return _refresh(rollout, locked)


@_refusable("resume")
def rollout_resume(
    *,
    rollout: Rollout,
    actor: Any,
    reason: str = "",
    now: datetime | None = None,
    request: Any = None,
) -> Rollout:
    """PAUSED -> RUNNING in the same phase: the WARNING count starts again and the phase
    runs at least one more extension; the kill switch goes ACTIVE after commit."""
    _require_permission(actor, PERM_PAUSE, "resume a rollout")
    _require_reason(actor, reason, "resume")
    now = _now(now)
    with transaction.atomic():
        locked = _lock(rollout)
        _require_state(locked, (RolloutState.PAUSED,), "resume")
        _require_no_rollback(locked, "resume")
        phase = current_phase(locked)
        if phase is not None:
            phase.consecutive_warnings = 0
            phase.ends_at = max(phase.ends_at or now, now + timedelta(seconds=phase.extension_s))
            phase.save(update_fields=["consecutive_warnings", "ends_at"])
        locked.state = RolloutState.RUNNING
        locked.state_reason = reason or "resumed"
        locked.save()
        _audit(
            "rollout.resume",
            actor=actor,
            rollout=locked,
            payload={
                "phase": locked.current_phase,
                "reason": reason,
                "ends_at": phase.ends_at.isoformat() if phase and phase.ends_at else None,
            },
            request=request,
        )
        rollout_alert(
            locked,
            kind="state",
            severity="warning",
            message=f"resumed in phase {locked.current_phase}",
            now=now,
            payload={"state": locked.state},
        )
        _kill_switch_on_commit(locked.deployment_id, KillSwitch.ACTIVE, actor, "rollout resumed")
    return _refresh(rollout, locked)


@_refusable("rollback")
def rollout_rollback(
    *,
    rollout: Rollout,
    actor: Any,
    reason: str = "",
    reasons: list | None = None,
    trigger: str = "person",
    now: datetime | None = None,
    request: Any = None,
) -> Rollback:
    """-> ROLLING_BACK, and the staged rollback through ``rollback_request`` (which joins a
    rollback already running for the deployment)."""
    _require_permission(actor, PERM_ROLLBACK, "roll back a rollout")
    _require_reason(actor, reason, "roll back")
    now = _now(now)
    with transaction.atomic():
        locked = _lock(rollout)
        _require_state(locked, MONITORED_STATES, "roll back")
        _close_phase(current_phase(locked), "ROLLED_BACK", now)
        locked.state = RolloutState.ROLLING_BACK
        locked.state_reason = (reason or trigger)[:300]
        locked.save()
        rollback = request_rollback(
            deployment=locked.deployment,
            rollout=locked,
            trigger=trigger,
            cause=reason or trigger,
            reasons=list(reasons or []),
            actor=actor,
        )
        _audit(
            "rollout.rollback",
            actor=actor,
            rollout=locked,
            payload={
                "phase": locked.current_phase,
                "trigger": trigger,
                "reason": reason,
                "reasons": list(reasons or []),
                "rollback": rollback.pk,
            },
            request=request,
        )
        rollout_alert(
            locked,
            kind="state",
            severity="critical",
            message=f"ROLLING BACK from phase {locked.current_phase} ({trigger}): {reason}",
            now=now,
            payload={
                "state": locked.state,
                "rollback": rollback.pk,
                "reasons": list(reasons or []),
            },
        )
    _refresh(rollout, locked)
    return rollback


def rollout_join_rollback(*, rollout: Rollout, rollback: Rollback, now: datetime) -> Rollout:
    """A rollback of the deployment started elsewhere (watchdog, person): the rollout
    follows it into ROLLING_BACK."""
    with transaction.atomic():
        locked = _lock(rollout)
        if locked.state not in MONITORED_STATES:
            return _refresh(rollout, locked)
        _close_phase(current_phase(locked), "ROLLED_BACK", now)
        locked.state = RolloutState.ROLLING_BACK
        locked.state_reason = f"rollback {rollback.pk} ({rollback.trigger}): {rollback.cause}"[:300]
        locked.save()
        _audit(
            "rollout.rollback",
            actor=SYSTEM_ACTOR,
            rollout=locked,
            payload={
                "phase": locked.current_phase,
                "trigger": rollback.trigger,
                "joined": rollback.pk,
            },
            request=None,
        )
        rollout_alert(
            locked,
            kind="state",
            severity="critical",
            message=f"ROLLING BACK: {locked.state_reason}",
            now=now,
            payload={"state": locked.state, "rollback": rollback.pk},
        )
    return _refresh(rollout, locked)


def rollout_settle_rollback(*, rollout: Rollout, now: datetime) -> Rollout:
    """ROLLING_BACK -> ROLLED_BACK once the rollback is flat (stage 1 done or later)."""
    with transaction.atomic():
        locked = _lock(rollout)
        if locked.state != RolloutState.ROLLING_BACK:
            return _refresh(rollout, locked)
        rollback = Rollback.objects.filter(rollout=locked).order_by("-started_at", "-id").first()
        if rollback is None:
            rollback = (
                Rollback.objects.filter(deployment_id=locked.deployment_id)
                .order_by("-started_at", "-id")
                .first()
            )
        done = (RollbackState.STAGE1_DONE, RollbackState.COMPLETED, RollbackState.RESTORED)
        if rollback is None or rollback.state not in done:
            return _refresh(rollout, locked)
        locked.state = RolloutState.ROLLED_BACK
        locked.ended_at = rollback.stage1_ended_at or now
        locked.save()
        _audit(
            "rollout.rolled_back",
            actor=SYSTEM_ACTOR,
            rollout=locked,
            payload={"rollback": rollback.pk, "rollback_state": rollback.state},
            request=None,
        )
        rollout_alert(
            locked,
            kind="state",
            severity="critical",
            message=f"ROLLED BACK (rollback {rollback.pk}: {rollback.cause})",
            now=now,
            payload={"state": locked.state, "rollback": rollback.pk},
        )
    return _refresh(rollout, locked)


# --- reads: status and export -------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def metric_rows(metrics: Mapping[str, Any], thresholds: Thresholds, phase: int) -> list[dict]:
    """Each metric against its bounds: value, target, fail bound and where it stands."""
    from .engine import CRITERIA_BY_METRIC, METRIC_NAMES

    rows = []
    for name in METRIC_NAMES:
        value = metrics.get(name)
        row: dict[str, Any] = {"metric": name, "value": value, "target": "", "fail": ""}
        criterion = CRITERIA_BY_METRIC.get(name)
        if name == "orders":
            row["target"] = f">= {thresholds.min_orders}"
            short = value is None or value < thresholds.min_orders
            row["state"] = "too few" if short else "ok"
        elif criterion is None:
            row["state"] = "no data" if value is None else "ok"
        else:
            if criterion.target is not None:
                row["target"] = f"{criterion.target.symbol} {thresholds.target(name, phase)}"
            if criterion.fail is not None:
                row["fail"] = f"{criterion.fail.symbol} {thresholds.fail_bound(name)}"
            row["state"] = (
                "no data" if value is None else _metric_state(criterion, value, thresholds, phase)
            )
        rows.append(row)
    return rows


def _metric_state(criterion: Any, value: Any, thresholds: Thresholds, phase: int) -> str:
    if criterion.fail_reason(value, thresholds) is not None:
        return "FAIL"
    if criterion.target_reason(value, thresholds, phase) is not None:
        return "outside target"
    return "ok"


def _evaluation_dict(evaluation: Any, phase_index: int | None = None) -> dict[str, Any]:
    return {
        "id": evaluation.pk,
        "at": _iso(evaluation.evaluated_at),
        "phase": phase_index,
        "verdict": evaluation.verdict,
        "action": evaluation.action,
        "reasons": evaluation.reasons,
        "metrics": evaluation.metrics,
    }


def _open_canary_alerts(rollout: Rollout, limit: int = 20) -> list[dict[str, Any]]:
    try:
        from alerts.models import Alert
    except ImportError:  # pragma: no cover
        return []
    rows = Alert.objects.filter(
        source="canary",
        acknowledged_at__isnull=True,
        dedupe_key__startswith=f"canary:rollout:{rollout.pk}:",
    ).order_by("-detected_at", "-id")[:limit]
    return [
        {
            "id": a.pk,
            "severity": a.severity,
            "message": a.message,
            "at": _iso(a.detected_at),
            "suppressed": a.suppressed,
        }
        for a in rows
    ]


def _phase_clock(phase: Phase | None, now: datetime) -> dict[str, Any] | None:
    if phase is None:
        return None
    end = phase.ended_at or now
    started = phase.started_at or now
    left = (phase.ends_at - now).total_seconds() if phase.ends_at and not phase.ended_at else 0
    return {
        "index": phase.index,
        "allocation": phase.allocation,
        "started_at": _iso(phase.started_at),
        "ends_at": _iso(phase.ends_at),
        "ended_at": _iso(phase.ended_at),
        "in_phase_s": round(max(0.0, (end - started).total_seconds()), 1),
        "left_s": round(max(0.0, left), 1),
        "min_duration_s": phase.min_duration_s,
        "extensions": phase.extensions,
        "consecutive_warnings": phase.consecutive_warnings,
        "needs_manual_promote": phase.needs_manual_promote,
        "outcome": phase.outcome,
    }


def rollout_summary(rollout: Rollout) -> dict[str, Any]:
    return {
        "id": rollout.pk,
        "name": rollout.name,
        "deployment": rollout.deployment_id,
        "state": rollout.state,
        "state_reason": rollout.state_reason,
        "current_phase": rollout.current_phase,
        "phases": len(rollout.plan or []),
        "config_version": rollout.config_version,
        "rehearsal": rollout.rehearsal,
        "created_at": _iso(rollout.created_at),
        "started_at": _iso(rollout.started_at),
        "ended_at": _iso(rollout.ended_at),
    }


def rollout_status(*, rollout: Rollout, now: datetime | None = None, live: bool = True) -> dict:
    """Phase, time in phase and left, each metric against its bounds (computed now for an
    active rollout when ``live``, else the last evaluation's), last verdicts, open alerts."""
    from .metrics import phase_metrics

    now = _now(now)
    phase = current_phase(rollout)
    thresholds = parse_thresholds(rollout.thresholds)
    evaluations = list(rollout.evaluations.select_related("phase")[:5])
    metrics: dict[str, Any] = {}
    metrics_at: datetime | None = None
    if phase is not None and live and rollout.state in MONITORED_STATES:
        computed = phase_metrics(deployment=rollout.deployment, since=phase.started_at, now=now)
        metrics, metrics_at = _metrics_dict(computed), now
    elif evaluations:
        metrics, metrics_at = evaluations[0].metrics, evaluations[0].evaluated_at
    status: dict[str, Any] = {
        "rollout": rollout_summary(rollout),
        "now": _iso(now),
        "phase": _phase_clock(phase, now),
        "metrics_at": _iso(metrics_at),
        "metrics": metric_rows(metrics, thresholds, phase.index if phase else 1) if metrics else [],
        "last_verdicts": [
            _evaluation_dict(e, e.phase.index if e.phase else None) for e in evaluations
        ],
        "open_alerts": _open_canary_alerts(rollout),
    }
    if rollout.state == RolloutState.PENDING:
        status["gate"] = gate1_check(rollout=rollout, now=now).to_dict()
    return status


def _metrics_dict(metrics: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(metrics)


def rollout_export(*, rollout: Rollout) -> dict[str, Any]:
    """One JSON document: the rollout, its approvals, each phase's final metrics, every
    evaluation and decision, the people's actions (audit trail) and the rollbacks."""
    from audit.models import AuditEvent

    evaluations_by_phase: dict[int | None, list[dict]] = {}
    for evaluation in rollout.evaluations.order_by("evaluated_at", "id"):
        evaluations_by_phase.setdefault(evaluation.phase_id, []).append(
            _evaluation_dict(evaluation)
        )
    phases = []
    for phase in rollout.phases.order_by("index"):
        rows = evaluations_by_phase.get(phase.pk, [])
        for row in rows:
            row["phase"] = phase.index
        phases.append(
            {
                **(_phase_clock(phase, phase.ended_at or phase.started_at or timezone.now()) or {}),
                "metrics": rows[-1]["metrics"] if rows else None,
                "verdict": rows[-1]["verdict"] if rows else None,
                "evaluations": rows,
                "decisions": [r for r in rows if r["action"] not in ("", "NONE")],
            }
        )
    actions = AuditEvent.objects.filter(
        target_type="canary.Rollout", target_id=str(rollout.pk)
    ).order_by("seq")
    return {
        "rollout": {
            **rollout_summary(rollout),
            "plan": rollout.plan,
            "thresholds": rollout.thresholds,
            "strategy_params": rollout.strategy_params,
        },
        "approvals": [
            {
                "id": a.pk,
                "role": a.role,
                "user": a.user.get_username(),
                "evidence": a.evidence,
                "comment": a.comment,
                "config_version": a.config_version,
                "valid": a.config_version == rollout.config_version,
                "at": _iso(a.created_at),
            }
            for a in rollout.approvals.select_related("user").order_by("created_at", "id")
        ],
        "phases": phases,
        "actions": [
            {
                "seq": e.seq,
                "at": _iso(e.created_at),
                "actor": e.actor,
                "action": e.action,
                "payload": e.payload,
            }
            for e in actions
        ],
        "rollbacks": [
            {
                "id": rb.pk,
                "trigger": rb.trigger,
                "cause": rb.cause,
                "reasons": rb.reasons,
                "state": rb.state,
                "requested_by": rb.requested_by,
                "started_at": _iso(rb.started_at),
                "stage1_ended_at": _iso(rb.stage1_ended_at),
                "ended_at": _iso(rb.ended_at),
                "report": rb.report,
            }
            for rb in rollout.rollbacks.order_by("started_at", "id")
        ],
    }
