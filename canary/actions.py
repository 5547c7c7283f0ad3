"""The operator actions the admin and the API offer, in one table (name -> permission), and
the calls behind them. Each action is a service call; its permission is checked and a
refusal recorded in the audit trail, by the service itself (rollout lifecycle, approvals)
or here (pre-flight, restore), before anything changes.

Pre-flight has no permission of its own in the matrix: it is part of taking a rollout live,
so it needs ``promote_rollout`` (Planner, Ops), like starting phase 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.utils.functional import LazyObject

from audit.permissions import PermissionRefused, permission_require, refusal_record
from trading.models import Deployment

from . import services
from .models import Approval, ApprovalRole, Backup, PreflightRun, Rollback, Rollout

ERROR_STATUS = {"forbidden": 403, "invalid": 400, "refused": 409}


@dataclass(frozen=True)
class Operation:
    name: str
    permission: str
    label: str
    target: str  # "rollout" | "rollback" | "preflight"
    success_action: str  # the audit action written when it goes through


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation(
            "approve_alpha",
            "audit.approve_alpha",
            "Approve go-live as Alpha trader",
            "rollout",
            "approval.record",
        ),
        Operation(
            "approve_planner",
            "audit.approve_planner",
            "Approve go-live as Planner",
            "rollout",
            "approval.record",
        ),
        Operation("start", services.PERM_PROMOTE, "Start phase 1", "rollout", "rollout.start"),
        Operation(
            "promote", services.PERM_PROMOTE, "Promote a phase", "rollout", "rollout.promote"
        ),
        Operation("pause", services.PERM_PAUSE, "Pause", "rollout", "rollout.pause"),
        Operation("resume", services.PERM_PAUSE, "Resume", "rollout", "rollout.resume"),
        Operation("rollback", services.PERM_ROLLBACK, "Roll back", "rollout", "rollout.rollback"),
        Operation(
            "restore",
            "audit.restore_database",
            "Restore the database (stage 3)",
            "rollback",
            "rollback.restored",
        ),
        Operation(
            "preflight", services.PERM_PROMOTE, "Run pre-flight", "preflight", "preflight.run"
        ),
    )
}
ROLLOUT_OPS = tuple(name for name, op in OPERATIONS.items() if op.target == "rollout")
APPROVAL_ROLES = {"approve_alpha": ApprovalRole.ALPHA, "approve_planner": ApprovalRole.PLANNER}


class ActionRefused(Exception):
    """An action not done; ``status`` is the HTTP answer (403, 400, 409, 503). Recorded."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        field: str | None = None,
        reasons: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field
        self.reasons = reasons or [message]

    @classmethod
    def of(cls, exc: services.RolloutError) -> ActionRefused:
        status = ERROR_STATUS.get(exc.code, 409)
        return cls(exc.message, status=status, field=exc.field, reasons=exc.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field, "reasons": self.reasons}


def check(*, op: str, actor: Any, target: Any = None, request: Any = None) -> None:
    """The permission of ``op`` (refusal recorded): for edges that ask before they show a
    form, so a person without it is refused at once."""
    operation = OPERATIONS[op]
    try:
        permission_require(
            actor=actor, perm=operation.permission, op=op, target=target, request=request
        )
    except PermissionRefused as exc:
        raise ActionRefused(exc.message, status=403) from exc


def rollout_act(
    *,
    op: str,
    rollout: Rollout,
    actor: Any,
    reason: str = "",
    evidence: Any = None,
    request: Any = None,
) -> Rollout | Rollback | Approval:
    """One lifecycle action on a rollout through its service (which checks the permission
    and records a refusal). ``reason`` is the approval's comment for approvals."""
    try:
        if op in APPROVAL_ROLES:
            return services.approval_record(
                rollout=rollout,
                role=APPROVAL_ROLES[op],
                evidence=evidence,
                comment=reason,
                actor=actor,
                request=request,
            )
        if op == "start":
            return services.rollout_start(rollout=rollout, actor=actor, request=request)
        service = {
            "promote": services.rollout_promote,
            "pause": services.rollout_pause,
            "resume": services.rollout_resume,
            "rollback": services.rollout_rollback,
        }[op]
        return service(rollout=rollout, actor=actor, reason=reason, request=request)
    except services.RolloutError as exc:
        raise ActionRefused.of(exc) from exc


def rollback_restore_act(
    *, rollback: Rollback, backup: Backup, actor: Any, reason: str, request: Any = None
) -> Rollback:
    """Stage 3 by a person holding ``restore_database``; every refusal is recorded."""
    from .backup import BackupError, BackupRefused
    from .rollback import RollbackDenied, rollback_restore

    check(op="restore", actor=actor, target=rollback, request=request)
    actor = unwrapped(actor)
    try:
        return rollback_restore(
            rollback=rollback, backup=backup, actor=actor, reason=reason, request=request
        )
    except (RollbackDenied, BackupRefused, BackupError) as exc:
        message = str(getattr(exc, "reason", "") or exc)
        refusal_record(
            action="rollback.refused",
            actor=actor,
            op="restore",
            reason=message[:300],
            target=rollback,
            payload={"backup": backup.pk},
            request=request,
        )
        status = 503 if isinstance(exc, BackupError) else 409
        raise ActionRefused(message, status=status) from exc


def unwrapped(actor: Any) -> Any:
    """``request.user`` of a Django view is a lazy wrapper; ``rollback_restore`` looks at
    the actor's type (``type(actor).objects``), so it gets the user itself."""
    if isinstance(actor, LazyObject):
        bool(actor.is_authenticated)  # forces the wrapped object into place
        return actor._wrapped
    return actor


def preflight_act(
    *,
    actor: Any,
    deployment: Deployment | None = None,
    names: Iterable[str] | None = None,
    request: Any = None,
) -> PreflightRun:
    """Run the pre-flight checks (all, or ``names``) now, by a person allowed to."""
    from .preflight import preflight_run

    check(op="preflight", actor=actor, request=request)
    return preflight_run(actor=actor, deployment=deployment, names=names)
