"""Thin WebSocket consumer: authenticate, join the group, announce presence with the
client's filters, snapshot, relay alerts, and pass operator actions to the services.

Client messages: ``{"type": "subscribe", "symbols": [...], "detectors": [...],
"min_severity": "warning"}``, ``{"type": "ack", "id": ALERT}``, ``{"type": "comment",
"id": ALERT, "text": ...}``, ``{"type": "silence", "symbol": ..., "detector": ...,
"duration_s": ..., "reason": ...}``, ``{"type": "unsilence", "id": SILENCE}``,
``{"type": "ping"}``. Bad, unauthorised or too frequent messages get an error frame and
the connection stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, ValidationError

from . import presence, selectors, services
from .hub import Frame, hub
from .rules import Filters, TokenBucket, parse_filters

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_UNAVAILABLE = 1011
SNAPSHOT_SIZE = 50


def _int_field(content: dict, name: str) -> int:
    value = content.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer")
    return value


def _validation_text(err: ValidationError) -> str:
    if hasattr(err, "message_dict"):
        return "; ".join(f"{k}: {' '.join(v)}" for k, v in err.message_dict.items())
    return " ".join(err.messages)


class AlertConsumer(AsyncJsonWebsocketConsumer):
    user: Any = None
    filters: Filters = Filters()
    _refresher: asyncio.Task | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not await database_sync_to_async(user.has_perm)("audit.view_desk"):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        try:
            await hub().join(self)
        except TimeoutError:
            hub().leave(self)
            await self.close(code=CLOSE_UNAVAILABLE)
            return
        self.user = user
        self.bucket = TokenBucket(
            settings.ALERTS_WS_RATE, settings.ALERTS_WS_BURST, time.monotonic()
        )
        await presence.announce(self.channel_name, user.pk, self.filters)
        self._refresher = asyncio.create_task(self._refresh_presence())
        await self._send_snapshot()

    async def disconnect(self, code: int) -> None:
        if self.user is None:
            return
        if self._refresher is not None:
            self._refresher.cancel()
        hub().leave(self)
        await presence.withdraw(self.channel_name)

    async def _refresh_presence(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(settings.ALERTS_PRESENCE_TTL_S / 3)
                await presence.announce(self.channel_name, self.user.pk, self.filters)

    async def _send_snapshot(self) -> None:
        alerts = await database_sync_to_async(selectors.snapshot)(self.filters, SNAPSHOT_SIZE)
        await self.send_json({"type": "snapshot", "alerts": alerts})

    async def _error(self, error: str, content: Any = None) -> None:
        frame: dict[str, Any] = {"type": "error", "error": error}
        if isinstance(content, dict) and isinstance(content.get("type"), str):
            frame["op"] = content["type"][:20]
        await self.send_json(frame)

    # ----------------------------------------------------------------- inbound

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        if self.user is None:
            return
        if not self.bucket.take(time.monotonic()):
            await self._error("throttled")
            return
        try:
            content = json.loads(text_data if text_data is not None else bytes_data)
        except (ValueError, TypeError):
            await self._error("malformed JSON")
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs) -> None:
        handler = self._handlers().get(content.get("type")) if isinstance(content, dict) else None
        if handler is None:
            await self._error("unknown message type", content)
            return
        try:
            await handler(content)
        except services.AlertActionDenied as err:
            await self._error(f"forbidden: {err}", content)
        except ObjectDoesNotExist:
            await self._error("not found", content)
        except ValidationError as err:
            await self._error(f"invalid: {_validation_text(err)}", content)
        except ValueError as err:
            await self._error(f"invalid: {err}", content)

    def _handlers(self) -> dict[str, Callable[[dict], Awaitable[None]]]:
        return {
            "ping": self._ping,
            "subscribe": self._subscribe,
            "ack": self._ack,
            "comment": self._comment,
            "silence": self._silence,
            "unsilence": self._unsilence,
        }

    async def _ping(self, content: dict) -> None:
        await self.send_json({"type": "pong"})

    async def _subscribe(self, content: dict) -> None:
        self.filters = parse_filters(content)
        await presence.announce(self.channel_name, self.user.pk, self.filters)
        await self.send_json({"type": "subscribed", "filters": self.filters.as_dict()})
        await self._send_snapshot()

    async def _ack(self, content: dict) -> None:
        alert = await database_sync_to_async(services.alert_acknowledge)(
            alert_id=_int_field(content, "id"), actor=self.user
        )
        await self.send_json({"type": "result", "op": "ack", "id": alert.pk, "ok": True})

    async def _comment(self, content: dict) -> None:
        comment = await database_sync_to_async(services.alert_comment)(
            alert_id=_int_field(content, "id"), actor=self.user, text=str(content.get("text", ""))
        )
        await self.send_json(
            {"type": "result", "op": "comment", "id": comment.alert_id, "comment_id": comment.pk}
        )

    async def _silence(self, content: dict) -> None:
        silence = await database_sync_to_async(services.silence_create)(
            actor=self.user,
            symbol=str(content.get("symbol") or ""),
            detector=str(content.get("detector") or ""),
            reason=str(content.get("reason") or ""),
            duration_s=content.get("duration_s"),
        )
        await self.send_json(
            {
                "type": "result",
                "op": "silence",
                "id": silence.pk,
                "expires_at": silence.expires_at.isoformat(),
            }
        )

    async def _unsilence(self, content: dict) -> None:
        silence = await database_sync_to_async(services.silence_end)(
            silence_id=_int_field(content, "id"), actor=self.user
        )
        await self.send_json({"type": "result", "op": "unsilence", "id": silence.pk})

    # ----------------------------------------------------------------- outbound

    async def alerts_received(self, frames: list[Frame]) -> None:
        for alert, frame in frames:
            if self.filters.matches(
                symbol=alert["symbol"], detector=alert["detector"], severity=alert["severity"]
            ):
                await self.send(text_data=frame)
