"""Throttling of failed logins, counted from the audit trail itself.

Every failed login is already an audit event (``user.login_failed``, with the attempted
username and the client IP), so the count is shared by every web process and survives a
restart. After ``LOGIN_FAILURE_LIMIT`` failures of one username from one IP within
``LOGIN_FAILURE_WINDOW_S``, further attempts from there are refused, even with the right
password, until the window has slid past them; each refusal is recorded
(``user.login_throttled``) and counts as a failure itself.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.utils import timezone

from .models import AuditEvent
from .services import RequestMeta, audit_record
from .signals import USERNAME_MAX

FAILED = "user.login_failed"
THROTTLED = "user.login_throttled"


def recent_failures(*, username: str, ip: str | None, now: Any = None) -> int:
    since = (now or timezone.now()) - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW_S)
    return AuditEvent.objects.filter(
        action=FAILED, created_at__gte=since, ip=ip, payload__username=username
    ).count()


def login_throttled(*, username: str, request: HttpRequest | None) -> bool:
    ip = RequestMeta.from_request(request).ip
    return recent_failures(username=username, ip=ip) >= settings.LOGIN_FAILURE_LIMIT


class ThrottledModelBackend(ModelBackend):
    """ModelBackend that refuses a throttled username+IP before checking any password."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        name = str(username or "")[:USERNAME_MAX]
        if name and login_throttled(username=name, request=request):
            audit_record(
                action=THROTTLED,
                actor="anonymous",
                payload={
                    "username": name,
                    "limit": settings.LOGIN_FAILURE_LIMIT,
                    "window_s": settings.LOGIN_FAILURE_WINDOW_S,
                },
                request=request,
            )
            raise PermissionDenied("too many failed logins")
        return super().authenticate(request, username=username, password=password, **kwargs)
