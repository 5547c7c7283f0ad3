"""Email through Django's configured backend (EMAIL_URL).

Each worker thread keeps its SMTP connection open between deliveries (connecting, the
greeting, EHLO and QUIT are most of a message's round trips). It is opened again when the
email settings change, after IDLE_S without use (servers drop idle clients) and after any
failure; a kept connection found dropped by the server is replaced once, at once."""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.core.mail.backends.base import BaseEmailBackend

from . import Outgoing, Transport, TransportError, register, summary

IDLE_S = 30.0
DROPPED = (smtplib.SMTPServerDisconnected, ConnectionResetError, BrokenPipeError)
SETTINGS = (
    "EMAIL_BACKEND",
    "EMAIL_HOST",
    "EMAIL_PORT",
    "EMAIL_HOST_USER",
    "EMAIL_HOST_PASSWORD",
    "EMAIL_USE_TLS",
    "EMAIL_USE_SSL",
    "ALERTS_EMAIL_TIMEOUT_S",
)


def _body(alert: dict[str, Any]) -> str:
    lines = [summary(alert), ""]
    for key in ("message", "exchange", "symbol", "timeframe", "detector", "direction", "value"):
        if alert.get(key) not in (None, ""):
            lines.append(f"{key}: {alert[key]}")
    for key in ("event_ms", "candle_close_at", "detected_at"):
        if alert.get(key):
            lines.append(f"{key}: {alert[key]}")
    lines.append(f"alert id: {alert['id']}")
    return "\n".join(lines) + "\n"


def _classify(err: Exception) -> TransportError:
    if isinstance(err, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in err.recipients.values()]
        permanent = bool(codes) and all(code >= 500 for code in codes)
        return TransportError(f"recipient refused ({codes})", permanent=permanent)
    if isinstance(err, smtplib.SMTPResponseException):
        return TransportError(
            f"SMTP {err.smtp_code}: {err.smtp_error!r}"[:300], permanent=err.smtp_code >= 500
        )
    return TransportError(f"{type(err).__name__}: {err}"[:300])


class _Kept(threading.local):
    key: tuple[Any, ...] = ()
    backend: BaseEmailBackend | None = None
    used: float = 0.0


_kept = _Kept()


def close_connection() -> None:
    """Close this thread's kept connection, if any."""
    backend, _kept.backend = _kept.backend, None
    if backend is not None:
        with contextlib.suppress(Exception):  # a dropped connection cannot QUIT
            backend.close()


def _connection() -> tuple[BaseEmailBackend, bool]:
    """This thread's open backend, and whether it was kept from an earlier message."""
    key = tuple(getattr(settings, name, None) for name in SETTINGS)
    if _kept.key != key or time.monotonic() - _kept.used > IDLE_S:
        close_connection()
    if _kept.backend is not None:
        return _kept.backend, True
    backend = get_connection(timeout=settings.ALERTS_EMAIL_TIMEOUT_S)
    backend.open()
    _kept.backend, _kept.key = backend, key
    return backend, False


def _send(message: EmailMessage) -> int:
    for _ in range(2):
        message.connection, kept = _connection()
        try:
            sent = message.send(fail_silently=False)
        except DROPPED:
            close_connection()
            if kept:
                continue
            raise
        except BaseException:
            close_connection()
            raise
        _kept.used = time.monotonic()
        return sent
    raise smtplib.SMTPServerDisconnected("connection dropped twice")


@register
class EmailTransport(Transport):
    kind = "email"

    def send(self, outgoing: Outgoing) -> None:
        alert = outgoing.alert
        message = EmailMessage(
            subject=summary(alert)[:200],
            body=_body(alert),
            from_email=settings.DEFAULT_FROM_EMAIL,
            to=[outgoing.recipient],
            headers={"X-Alert-Id": str(alert["id"]), "X-Delivery-Id": str(outgoing.delivery_id)},
        )
        try:
            sent = _send(message)
        except (smtplib.SMTPException, OSError) as err:
            raise _classify(err) from err
        if sent != 1:
            raise TransportError("the email backend accepted no message")
