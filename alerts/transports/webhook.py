"""Webhook: POST JSON signed with HMAC-SHA256, or a Slack-compatible payload.

Signature header: ``X-Alerts-Signature: sha256=<hex>`` of ``<timestamp>.<body>`` with the
shared secret ``ALERTS_WEBHOOK_SECRET``; the timestamp is in ``X-Alerts-Timestamp``.
Recipients are ``webhook:<n>``, the n-th of ``ALERTS_WEBHOOK_URLS`` (URLs can embed
tokens, so they are never stored or logged).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from typing import Any

from django.conf import settings

from . import Outgoing, Transport, TransportError, register, summary

SIGNATURE_HEADER = "X-Alerts-Signature"
TIMESTAMP_HEADER = "X-Alerts-Timestamp"
TRANSIENT_HTTP = frozenset({408, 425, 429})


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def payload(alert: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "slack":
        text = summary(alert)
        if alert.get("message"):
            text += f"\n{alert['message']}"
        return {"text": f"{text}\n(alert {alert['id']})"}
    return {"type": "alert", "alert": alert}


def recipient_label(index: int) -> str:
    return f"webhook:{index}"


def url_for(recipient: str) -> str:
    urls = settings.ALERTS_WEBHOOK_URLS
    try:
        return urls[int(recipient.removeprefix("webhook:"))]
    except (ValueError, IndexError):
        raise TransportError(f"no webhook configured for {recipient}", permanent=True) from None


@register
class WebhookTransport(Transport):
    kind = "webhook"

    def send(self, outgoing: Outgoing) -> None:
        body = json.dumps(payload(outgoing.alert, settings.ALERTS_WEBHOOK_FORMAT)).encode()
        timestamp = str(int(time.time()))
        request = urllib.request.Request(url_for(outgoing.recipient), data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        request.add_header("User-Agent", "canary-alerts/1")
        request.add_header(TIMESTAMP_HEADER, timestamp)
        request.add_header("X-Alert-Id", str(outgoing.alert["id"]))
        if settings.ALERTS_WEBHOOK_SECRET:
            request.add_header(
                SIGNATURE_HEADER, sign(settings.ALERTS_WEBHOOK_SECRET, timestamp, body)
            )
        try:
            with urllib.request.urlopen(request, timeout=settings.ALERTS_WEBHOOK_TIMEOUT_S) as resp:
                resp.read(1024)
        except urllib.error.HTTPError as err:
            code = err.code
            transient = code >= 500 or code in TRANSIENT_HTTP
            raise TransportError(f"HTTP {code}", permanent=not transient) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TransportError(f"{type(reason).__name__}: {reason}"[:300]) from None
