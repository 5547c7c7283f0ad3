"""Thin WebSocket consumer: authenticate, join the group, announce presence with the
client's filters, snapshot, relay alerts, and pass operator actions to the services.

Client messages: ``{"type": "subscribe", "symbols": [...], "detectors": [...],
"min_severity": "warning"}``, ``{"type": "ack", "id": ALERT}``, ``{"type": "comment",
"id": ALERT, "text": ...}``, ``{"type": "silence", "symbol": ..., "detector": ...,
"duration_s": ..., "reason": ...}``, ``{"type": "unsilence", "id": SILENCE}``,
``{"type": "ping"}``. Bad, unauthorised or too frequent messages get an error frame and
the connection stays open.

Authentication happens at connect, and the user is checked again against the database
before each message other than a ping (and every ALERTS_PRESENCE_TTL_S / 3 seconds): a user
deleted or deactivated since, or whose token was deleted, gets an error frame and the
connection is closed with 4401; one who lost ``audit.view_desk``, with 4403. A refused
message is recorded in the audit trail (``permission.refused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.sessions import InstanceSessionWrapper
from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import DatabaseError, DataError

from audit.permissions import REFUSED, VIEW_DESK, holds, refusal_record
from trading.candles import storable

from . import presence, selectors, services
from .auth import token_key
from .hub import Frame, hub
from .rules import Filters, TokenBucket, parse_filters

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_UNAVAILABLE = 1011
SNAPSHOT_SIZE = 50
PASSIVE = frozenset({"ping"})  # reads and writes nothing: neither re-checked nor validated
log = logging.getLogger(__name__)


def _int_field(content: dict, name: str) -> int:
    value = content.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer")
    return value


def _validation_text(err: ValidationError) -> str:
    if hasattr(err, "message_dict"):
        return "; ".join(f"{k}: {' '.join(v)}" for k, v in err.message_dict.items())
    return " ".join(err.messages)


def _unstorable_field(content: dict) -> str | None:
    """The first top-level field holding text the database cannot store, at any depth."""
    for name, value in content.items():
        stack = [name, value]
        while stack:
            item = stack.pop()
            if isinstance(item, str) and not storable(item):
                return name if storable(name) else "?"
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    return None


def _standing(
    user_pk: Any, token: str | None, session: str | None = None
) -> tuple[Any, int | None, str]:
    """The user as the database has them now, and the close code and reason when they may
    no longer use the desk (None when they may): the connection's API token (``token``) or
    login session (``session``, its key) must still be theirs."""
    user = selectors.user(user_pk)
    if user is None:
        return None, CLOSE_UNAUTHENTICATED, "the user no longer exists"
    if not user.is_active:
        return user, CLOSE_UNAUTHENTICATED, "the user is no longer active"
    if token is not None and not selectors.token_held(token, user.pk):
        return user, CLOSE_UNAUTHENTICATED, "the token is no longer valid"
    if session is not None and not selectors.session_held(session, user):
        return user, CLOSE_UNAUTHENTICATED, "the session has ended"
    if not holds(user, VIEW_DESK):  # user.has_perm's answer, in one query
        return user, CLOSE_FORBIDDEN, f"needs the {VIEW_DESK} permission"
    return user, None, ""


class AlertConsumer(AsyncJsonWebsocketConsumer):
    user: Any = None
    filters: Filters = Filters()
    _refresher: asyncio.Task | None = None
    _token: str | None = None
    _session: str | None = None
    _revoked = False

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
        self._token = token_key(self.scope)
        if self._token is None:  # logged in by the session's cookie
            self._session = getattr(self.scope.get("session"), "session_key", None)
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
                try:
                    _, code, _ = await database_sync_to_async(_standing)(
                        self.user.pk, self._token, self._session
                    )
                except DatabaseError as err:
                    log.warning("alert socket: user not re-checked: %s", err)
                    code = None
                if code is not None:
                    await self._revoke(code)
                    return
                await presence.announce(self.channel_name, self.user.pk, self.filters)

    async def _revoke(self, code: int) -> None:
        """Stop relaying and close: the user may no longer use the desk."""
        self._revoked = True
        if self._refresher is not None and self._refresher is not asyncio.current_task():
            self._refresher.cancel()
        hub().leave(self)
        await presence.withdraw(self.channel_name)
        await self.close(code=code)

    async def _recheck(self, op: str) -> bool:
        """True with ``self.user`` fresh from the database; else the refusal is recorded,
        an error frame sent and the connection closed."""
        stale = self.user
        user, code, reason = await database_sync_to_async(_standing)(
            stale.pk, self._token, self._session
        )
        if code is None:
            self.user = user
            return True
        await database_sync_to_async(refusal_record)(
            action=REFUSED,
            actor=user if user is not None else stale.get_username(),
            op=f"websocket {op}",
            reason=reason,
            payload={"permission": VIEW_DESK},
        )
        await self._error(f"forbidden: {reason}", {"type": op})
        await self._revoke(code)
        return False

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
        if self.user is None or self._revoked:
            return
        if not self.bucket.take(time.monotonic()):
            await self._error("throttled")
            return
        try:
            content = json.loads(text_data if text_data is not None else bytes_data)
        except (ValueError, TypeError, RecursionError):
            await self._error("malformed JSON")
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs) -> None:
        if not isinstance(content, dict):
            await self._error("a message must be a JSON object")
            return
        kind = content.get("type")
        if not isinstance(kind, str):
            await self._error('"type" must be a string naming the message type')
            return
        handler = self._handlers().get(kind)
        if handler is None:
            await self._error("unknown message type", content)
            return
        if kind not in PASSIVE:
            if not await self._recheck(kind):
                return
            if (field := _unstorable_field(content)) is not None:
                await self._error(
                    f"invalid: {field}: NUL characters and lone surrogates are not allowed",
                    content,
                )
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
        except DataError:
            await self._error("invalid: a value the database cannot store", content)

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
        """Frames encoded once per process by the hub; each goes straight to the server."""
        if self._revoked:
            return
        send = _server_send(self.base_send)
        for alert, frame in frames:
            if self.filters.matches(
                symbol=alert["symbol"], detector=alert["detector"], severity=alert["severity"]
            ):
                await send({"type": "websocket.send", "text": frame})


def _server_send(send: Callable[[dict], Awaitable[None]]) -> Callable[[dict], Awaitable[None]]:
    """The ASGI server's send beneath Channels' session middleware, whose wrapper acts on
    HTTP responses only (saving the session, setting its cookie) but reads the session
    for every message: for the pushed frames, one per alert and socket."""
    wrapper = getattr(send, "__self__", None)
    if isinstance(wrapper, InstanceSessionWrapper):
        return wrapper.real_send
    return send
