"""Authentication events into the audit trail. Thin receivers: each calls audit_record.

A failed login records the attempted username only; the credentials dict is never
stored, whatever it holds."""

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver
from django.http import HttpRequest

from .services import audit_record

USERNAME_MAX = 150


@receiver(user_logged_in, dispatch_uid="audit.user_logged_in")
def record_login(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    audit_record(action="user.login", actor=user, target=user, request=request)


@receiver(user_logged_out, dispatch_uid="audit.user_logged_out")
def record_logout(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    if user is None:
        return
    audit_record(action="user.logout", actor=user, target=user, request=request)


@receiver(user_login_failed, dispatch_uid="audit.user_login_failed")
def record_login_failed(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    audit_record(
        action="user.login_failed",
        actor="anonymous",
        payload={"username": attempted_username(credentials)},
        request=request,
    )


def attempted_username(credentials: dict[str, Any]) -> str:
    field = get_user_model().USERNAME_FIELD
    value = credentials.get(field, credentials.get("username", ""))
    return str(value or "")[:USERNAME_MAX]
