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
    if not (getattr(actor, "is_authenticated", False) and actor.is_active):
        return False
    if hasattr(actor, "_perm_cache") or not _plain_model_permissions(actor):
        return actor.has_perm(perm)
    if actor.is_superuser:
        return True
    # Read with the person by the authentication (trading.api.IngestTokenAuthentication).
    known = getattr(actor, "granted_permissions", None) or {}
    if perm in known:
        return known[perm]
    return _granted(actor.pk, perm)


_MODEL_BACKEND_METHODS = (
    "has_perm",
    "get_all_permissions",
    "get_user_permissions",
    "get_group_permissions",
    "_get_permissions",
    "_get_user_permissions",
    "_get_group_permissions",
)


def _plain_model_permissions(actor: Any) -> bool:
    """True when ``actor.has_perm`` is Django's: the user model's own, and every configured
    backend a ModelBackend that computes permissions as Django does. ``_granted`` then
    answers the same in one query (ModelBackend loads every permission of the person, in
    two queries, for each request)."""
    from django.contrib.auth import get_backends, get_user_model
    from django.contrib.auth.backends import ModelBackend
    from django.contrib.auth.models import PermissionsMixin

    model = get_user_model()
    if type(actor) is not model or model.has_perm is not PermissionsMixin.has_perm:
        return False
    return all(
        isinstance(backend, ModelBackend)
        and all(
            getattr(type(backend), name) is getattr(ModelBackend, name)
            for name in _MODEL_BACKEND_METHODS
        )
        for backend in get_backends()
    )


def _granted(user_id: int, perm: str) -> bool:
    """``perm`` ("app_label.codename") given to the user directly or through a group."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType
    from django.db import connection

    app_label, _, codename = perm.partition(".")
    q = connection.ops.quote_name
    user_model = get_user_model()
    direct = user_model.user_permissions.through._meta
    member = user_model.groups.through._meta
    group = member.get_field("group").related_model.permissions.through._meta

    def col(meta: Any, name: str) -> str:
        return q(meta.get_field(name).column)

    sql = (
        f"SELECT 1 FROM {q(Permission._meta.db_table)} p"
        f" INNER JOIN {q(ContentType._meta.db_table)} ct"
        f" ON ct.{q(ContentType._meta.pk.column)} = p.{col(Permission._meta, 'content_type')}"
        f" WHERE p.{col(Permission._meta, 'codename')} = %s"
        f" AND ct.{col(ContentType._meta, 'app_label')} = %s AND ("
        f"p.{q(Permission._meta.pk.column)} IN (SELECT d.{col(direct, 'permission')}"
        f" FROM {q(direct.db_table)} d WHERE d.{col(direct, 'user')} = %s)"
        f" OR p.{q(Permission._meta.pk.column)} IN (SELECT g.{col(group, 'permission')}"
        f" FROM {q(group.db_table)} g INNER JOIN {q(member.db_table)} m"
        f" ON m.{col(member, 'group')} = g.{col(group, 'group')}"
        f" WHERE m.{col(member, 'user')} = %s)) LIMIT 1"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [codename, app_label, user_id, user_id])
        return cursor.fetchone() is not None


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
