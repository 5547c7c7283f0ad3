"""The permission trail: a person's action checked against its permission, the refusal
recorded in the audit trail (committed on its own, so it survives the refused change).

Services that already record their refusals (``canary.services``, ``alerts.services``) keep
doing so; this module serves the edges (API, admin) and the services that do not.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.views.defaults import permission_denied
from rest_framework.permissions import BasePermission

from .services import audit_record

REFUSED = "permission.refused"
VIEW_DESK = "audit.view_desk"


class PermissionRefused(PermissionDenied):
    """A person lacks the permission of an action; the refusal is already recorded."""

    recorded = True

    def __init__(self, message: str, *, permission: str, op: str) -> None:
        super().__init__(message)
        self.message = message
        self.permission = permission
        self.op = op


def holds(actor: Any, perm: str) -> bool:
    return bool(
        getattr(actor, "is_authenticated", False) and actor.is_active and actor.has_perm(perm)
    )


def refusal_record(
    *,
    action: str,
    actor: Any,
    op: str,
    reason: str,
    target: Any = None,
    target_type: str = "",
    target_id: Any = "",
    payload: dict[str, Any] | None = None,
    request: Any = None,
) -> None:
    """Record a refused attempt in its own transaction."""
    with transaction.atomic():
        audit_record(
            action=action,
            actor=actor,
            target=target,
            target_type=target_type,
            target_id=target_id,
            payload={"op": op, "reason": reason, **(payload or {})},
            request=request,
        )


def permission_require(
    *,
    actor: Any,
    perm: str,
    op: str,
    target: Any = None,
    target_type: str = "",
    target_id: Any = "",
    request: Any = None,
) -> None:
    """Pass, or record the refusal and raise ``PermissionRefused``."""
    if holds(actor, perm):
        return
    message = f"{op} needs the {perm} permission"
    refusal_record(
        action=REFUSED,
        actor=actor,
        op=op,
        reason=message,
        target=target,
        target_type=target_type,
        target_id=target_id,
        payload={"permission": perm},
        request=request,
    )
    raise PermissionRefused(message, permission=perm, op=op)


class RequiresPermission(BasePermission):
    """DRF: an authenticated person holding ``perm``; a refusal is recorded (403).
    Anonymous requests are answered 401 and not recorded."""

    perm = VIEW_DESK
    message = "permission denied"

    def has_permission(self, request: Any, view: Any) -> bool:
        user = getattr(request, "user", None)
        if not getattr(user, "is_authenticated", False):
            return False
        try:
            permission_require(
                actor=user, perm=self.perm, op=_view_op(request, view), request=request
            )
        except PermissionRefused as exc:
            self.message = exc.message
            return False
        return True


def requires(perm: str) -> type[RequiresPermission]:
    """A ``RequiresPermission`` class for ``perm`` (e.g. ``requires("audit.view_desk")``)."""
    name = "Requires_" + perm.replace(".", "_")
    return type(name, (RequiresPermission,), {"perm": perm})


CanViewDesk = requires(VIEW_DESK)


def _view_op(request: Any, view: Any) -> str:
    return f"{request.method} {request.path}"[:200]


def forbidden_view(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler403: a person's refused request (admin, desk) into the audit trail, unless the
    code that refused it recorded it already."""
    user = getattr(request, "user", None)
    if getattr(user, "is_authenticated", False) and not getattr(exception, "recorded", False):
        refusal_record(
            action=REFUSED,
            actor=user,
            op=f"{request.method} {request.path}"[:200],
            reason=str(exception or "permission denied")[:300],
            request=request,
        )
    return permission_denied(request, exception or PermissionDenied())
